"""fastmae's Triton kernels, one module per fused op (installed as ``fastmae.kernels``).

The ops, each named alike everywhere (``fastmae.reference.<op>``, ``fastmae.kernels.<op>.<op>``,
``fastmae.ops.<op>`` and its ``KERNELS`` entry, ``tests/test_<op>.py``, and ``benches/bench_<op>.py`` with
``benches.harness.OPS[<op>]`` where it is benchmarked):

- ``patch_embed``: patchify + gather of the visible patches fused with the embedding GEMM.
- ``attention``: flash attention from the packed qkv projection, for MAE's short sequences.
- ``masked_mse``: the masked-only, per-patch normalized MSE read straight from the image, also of predictions made
  for the masked patches only (``ids=``).
- ``decoder_assembly``: visible tokens + mask tokens, unshuffled, + positions, in one pass.
- ``layer_norm``: LayerNorm fused with the residual add before it, output in the next GEMM's dtype.
- ``gelu``: exact GELU, optionally of ``x + bias`` (fc1's bias), one read and one write each way.
- ``resized_crop``: the input views of a batch of decoded images of any sizes (crop, antialiased bicubic resize,
  flip, normalize) in one launch; no autograd (nothing differentiates through the data).

Every module has the same layers, with the same names, top to bottom:

1. a docstring with the math of the forward and backward, the constraints and the backward strategy;
2. the ``@triton.jit`` kernels: ``_fwd_kernel``, ``_bwd_kernel`` and ``_bwd_<part>_kernel`` (``_fwd_<part>_kernel``
   for a second forward pass), after the device helpers they call (or those in a ``_<op>_tiles.py`` module);
3. the tuning: ``CONFIGS`` and/or ``tiling(...)``, the reasoning behind them in a comment above;
4. ``unsupported(*args)``: why the kernel does not take arguments the eager op accepts (float64, a head dim outside
   16..128, ...), from shapes, dtypes and flags alone; ``impl="auto"`` then runs the eager op (fastmae.ops);
5. ``_check(*args)``: a ValueError/TypeError naming the argument for anything else the kernels cannot take, and
   the host-side checks of index and mask values (see below);
6. ``_launch_fwd`` / ``_launch_bwd``: allocate the outputs (``_common.empty``) and launch, through ``wrap_triton``
   by the kernel's own name (torch.compile's caches hash the kernels found that way), or directly under the
   interpreter, with annotated arguments;
7. ``<CamelOp>Function``: the ``torch.autograd.Function`` calling the registered ops, with
   ``torch.amp.custom_fwd/custom_bwd(device_type="cuda")``;
8. the op registration: ``<op>_fwd = register_op("fastmae::<op>_fwd")(_launch_fwd)`` and ``<op>_bwd`` alike
   (:func:`fastmae.kernels._common.register_op`: a ``triton_op``, an opaque ``custom_op`` under the interpreter),
   with the integration reasoning in a comment above, so that torch.compile captures the op in one graph;
9. the public op, named like the module, with the eager op's signature and an ``Args:`` docstring.

Bad indices and empty masks follow one policy (:mod:`fastmae.kernels._common`): validated on the host where that is
free (CPU tensors; fastmae's own masks are valid by construction); on CUDA never waited for: the kernels mask bad
indices so nothing is read or written out of bounds, give NaN rows, and flag the error on the device;
:func:`check_errors` reports the flags (a sync), and ``FASTMAE_CHECK=1`` checks after every op that flags.

Nothing here imports fastmae's model code or queries the GPU at import.
"""

from fastmae.kernels._common import check_errors

__all__ = ["check_errors"]
