"""Dispatch of each fused op to its Triton kernel or its eager form, by ``impl``.

``impl`` is ``"auto"`` (Triton for CUDA tensors when a kernel exists for the op and takes the arguments, eager
otherwise), ``"triton"`` (Triton wherever a kernel exists; on the CPU only under ``TRITON_INTERPRET=1``; a kernel
refusing its arguments raises) or ``"eager"``. The environment variable ``FASTMAE_IMPL`` overrides what a
constructor was given. Kernel modules are imported lazily, on first use, so that ``TRITON_INTERPRET`` may be set
after ``import fastmae`` and nothing touches the GPU at import.

Under ``"auto"`` each kernel module's ``unsupported(*args)`` names what its kernel does not take among arguments
the eager op accepts (an attention head dim outside 16..128, float64 tensors, ...) from shapes, dtypes and flags
alone: no GPU sync, a few integer comparisons per call, and under ``torch.compile`` decided once per traced shape.
The op then runs its eager form, with one :class:`EagerFallbackWarning` per (op, reason). Values (indices, masks)
are not looked at here: the kernels' policy for bad ones is in :mod:`fastmae.kernels._common`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from fastmae.kernels._common import interpreting

from . import reference

IMPLS = ("auto", "triton", "eager")
ENV_VAR = "FASTMAE_IMPL"

# op name -> (module, function) of its Triton kernel; the function takes the eager op's arguments.
KERNELS: dict[str, tuple[str, str]] = {
    "patch_embed": ("fastmae.kernels.patch_embed", "patch_embed"),
    "attention": ("fastmae.kernels.attention", "attention"),
    "masked_mse": ("fastmae.kernels.masked_mse", "masked_mse"),
    "decoder_assembly": ("fastmae.kernels.decoder_assembly", "decoder_assembly"),
    "layer_norm": ("fastmae.kernels.layer_norm", "layer_norm"),
    "gelu": ("fastmae.kernels.gelu", "gelu"),
    "resized_crop": ("fastmae.kernels.resized_crop", "resized_crop"),
}


def resolve_impl(impl: str) -> str:
    """The impl to use: ``$FASTMAE_IMPL`` when set, else ``impl``; validated."""
    chosen = os.environ.get(ENV_VAR) or impl
    if chosen not in IMPLS:
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "impl"
        raise ValueError(f"{source} must be one of {IMPLS}, got {chosen!r}")
    return chosen


# op name -> (kernel, its module's ``unsupported`` check), or None without a kernel; filled by has_kernel.
_loaded: dict[str, tuple[Callable, Callable[..., str | None]] | None] = {}


@torch.compiler.assume_constant_result
def has_kernel(op: str) -> bool:
    """Whether fastmae ships a kernel for ``op`` (and Triton is installed); imports its module on first use. Under
    torch.compile this runs while tracing (its result is a constant), so no import machinery enters the graph."""
    if op not in _loaded:
        module, name = KERNELS[op]
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec(module) is None:
            _loaded[op] = None
        else:
            mod = importlib.import_module(module)
            _loaded[op] = (getattr(mod, name), mod.unsupported)
    return _loaded[op] is not None


def triton_kernel(op: str) -> Callable | None:
    """The Triton implementation of ``op``, or None when fastmae ships no kernel for it (or Triton is missing)."""
    return _loaded[op][0] if has_kernel(op) else None


class EagerFallbackWarning(UserWarning):
    """``impl="auto"`` ran an op's eager form because its Triton kernel does not take the arguments."""


def kernel_limits(op: str) -> Callable[..., str | None]:
    """The ``unsupported`` check of ``op``'s kernel module (a kernel must exist): the op's arguments → a reason
    the kernel does not take them, or None."""
    has_kernel(op)
    return _loaded[op][1]


_warned: set[tuple[str, str]] = set()


@torch.compiler.assume_constant_result
def _warn_fallback(op: str, reason: str) -> bool:
    """Warn once per (op, reason); under torch.compile it runs while tracing (its result is a constant)."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"impl='auto' runs {op} eagerly: {reason}", EagerFallbackWarning, stacklevel=4)
    return True


def check_device(impl: str, x: torch.Tensor) -> None:
    """Raise a clear error when ``impl="triton"`` is asked for where kernels cannot run."""
    if impl == "triton" and not x.is_cuda and not interpreting():
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got a tensor on {x.device}); use impl='auto' or 'eager', "
            "or set TRITON_INTERPRET=1 before importing fastmae's kernels to run them on the CPU"
        )


def auto_device(x: torch.Tensor) -> bool:
    """Whether ``impl="auto"`` runs kernels on ``x``'s device: CUDA. (Tests point it at the CPU tensors of the
    interpreter to exercise the ``"auto"`` path.)"""
    return x.is_cuda


def use_triton(impl: str, op: str, x, *args, device_of: torch.Tensor | None = None) -> bool:
    """Whether ``op`` runs its Triton kernel under ``impl``, given its arguments ``x, *args``; the device is
    ``x``'s (``device_of``'s when the first argument is not a tensor). Under ``"auto"`` a kernel that does not
    take them (see the module docstring) leaves the op to its eager form, with a warning."""
    if impl == "eager":
        return False
    probe = x if device_of is None else device_of
    if impl == "auto" and not auto_device(probe):
        return False
    check_device(impl, probe)
    if triton_kernel(op) is None:
        return False
    if impl == "auto":
        reason = kernel_limits(op)(x, *args)
        if reason is not None:
            _warn_fallback(op, reason)
            return False
    return True


def patch_embed(impl: str, imgs, ids_keep, weight, bias, pos_embed, cls_token) -> torch.Tensor:
    """See :func:`fastmae.reference.patch_embed`."""
    args = (imgs, ids_keep, weight, bias, pos_embed, cls_token)
    fn = triton_kernel("patch_embed") if use_triton(impl, "patch_embed", *args) else reference.patch_embed
    return fn(*args)


def attention(impl: str, qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """See :func:`fastmae.reference.attention`; the eager path is :func:`fastmae.reference.sdpa_attention`."""
    use = use_triton(impl, "attention", qkv, num_heads, scale)
    fn = triton_kernel("attention") if use else reference.sdpa_attention
    return fn(qkv, num_heads, scale)


def masked_mse(impl: str, pred, imgs, mask, patch_size: int, norm_pix_loss: bool, ids=None) -> torch.Tensor:
    """See :func:`fastmae.reference.masked_mse`."""
    args = (pred, imgs, mask, patch_size, norm_pix_loss, ids)
    fn = triton_kernel("masked_mse") if use_triton(impl, "masked_mse", *args) else reference.masked_mse
    return fn(*args)


def decoder_assembly(impl: str, x, ids_restore, mask_token, pos_embed) -> torch.Tensor:
    """See :func:`fastmae.reference.decoder_assembly`."""
    args = (x, ids_restore, mask_token, pos_embed)
    use = use_triton(impl, "decoder_assembly", *args)
    fn = triton_kernel("decoder_assembly") if use else reference.decoder_assembly
    return fn(*args)


def layer_norm(impl: str, x, weight, bias, branch=None, eps: float = 1e-6, out_dtype=None):
    """See :func:`fastmae.reference.layer_norm`; under CUDA autocast the kernel writes y in the autocast dtype."""
    args = (x, weight, bias, branch, eps, out_dtype)
    fn = triton_kernel("layer_norm") if use_triton(impl, "layer_norm", *args) else reference.layer_norm
    return fn(*args)


def gelu(impl: str, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`fastmae.reference.gelu`; the kernel returns x's dtype."""
    fn = triton_kernel("gelu") if use_triton(impl, "gelu", x, bias) else reference.gelu
    return fn(x, bias)


def resized_crop(impl: str, images, boxes, flips, size: int, mean, std, dtype=torch.float32) -> torch.Tensor:
    """See :func:`fastmae.reference.resized_crop`: the input path's views of decoded uint8 images (the kernel
    for images on CUDA under ``"auto"``)."""
    args = (images, boxes, flips, size, mean, std, dtype)
    use = use_triton(impl, "resized_crop", *args, device_of=images[0] if len(images) else boxes)
    fn = triton_kernel("resized_crop") if use else reference.resized_crop
    return fn(*args)
