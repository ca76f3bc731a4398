"""fastmae's Triton kernels, one module per fused op (installed as ``fastmae.kernels``).

Each module holds, top to bottom: a docstring with the forward and backward math, the ``@triton.jit`` kernels,
launchers that validate, allocate and launch, and the autograd layer exposing a function with the signature of
the eager op in :mod:`fastmae.reference`. Nothing here imports fastmae's model code or queries the GPU at import.

- ``patch_embed.patch_embed``: patchify + gather of the visible patches fused with the embedding GEMM.
- ``attention.attention``: flash attention from the packed qkv projection, for MAE's short sequences.
- ``masked_mse.masked_mse``: the masked-only, per-patch normalized MSE read straight from the image, also of
  predictions made for the masked patches only (``ids=``); ``masked_mse.check_mask_errors`` raises a pending
  all-zero-mask error found on the GPU.
- ``decoder_assembly.decoder_assembly``: visible tokens + mask tokens, unshuffled, + positions, in one pass.
- ``layer_norm.layer_norm``: LayerNorm fused with the residual add before it, output in the next GEMM's dtype.
- ``gelu.gelu``: exact GELU, optionally of ``x + bias`` (fc1's bias), one read and one write each way.
"""
