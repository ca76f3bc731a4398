"""Helpers shared by the kernel modules: output allocation (with NaN poisoning for tests) and dtype checks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

_poison = False


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within this context every output a launcher allocates is NaN-filled (ints: -1) before the launch."""
    global _poison
    prev, _poison = _poison, True
    try:
        yield
    finally:
        _poison = prev


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, NaN-poisoned inside :func:`poison_outputs` so unwritten elements show in tests."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise a TypeError unless ``t`` is a tensor of a supported floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def unsupported_float(**tensors) -> str | None:
    """For a kernel module's ``unsupported`` check: the first floating tensor of a dtype the kernels do not take
    (float64, ...) that the eager ops accept, named, or None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
            return f"{name} is {t.dtype}; the kernel takes float32, float16 or bfloat16"
    return None


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the tensors when they are not all on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k}: {v}" for k, v in devices.items()))
