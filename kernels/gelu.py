"""Exact (erf) GELU, optionally of ``x + bias`` (fc1's bias), one read and one write each way.

Math, elementwise over ``x [M, H]`` (fc1's output) with an optional ``bias [H]``, in fp32 registers::

    z    = x + bias                           (x without a bias)
    y    = 0.5 · z · (1 + erf(z / √2))        -> written in x's dtype (the activation dtype)

Backward (``_bwd_kernel``), given ``dy = ∂L/∂y``, with ``z`` recomputed from the saved x (and bias)::

    Φ(z) = 0.5 · (1 + erf(z / √2)),  φ(z) = exp(−z² / 2) / √(2π)
    dx   = dy · (Φ(z) + z · φ(z))            -> written in x's dtype
    dbias = Σ_rows dx                         (of the fp32 dx, before its rounding to x's dtype; accumulated in
                                               fp32, returned in bias's dtype)

Fused: the bias add, the activation and the casts; with the bias here fc1 runs as a plain GEMM (no bias epilogue)
and its bias gradient comes out of this backward instead of a separate column reduction re-reading dx. Both
forms are offered (``bias=None``: the GEMM adds it); which is faster is to be settled by measurement on the GPU.
Saved for the backward: x (the GEMM output eager saves as well) and the bias; nothing else.

Numerics: the same formulas as PyTorch's CUDA GELU (fp32 opmath); with a fused bias z stays fp32 instead of
being rounded to the activation dtype as fc1's output is in eager, which is at least as accurate.

Constraints: any ``[..., H]`` with H >= 1, the last dim unit-stride (rows may be strided); int64 row offsets.

Tiling: tiles of ``BLOCK_M × BLOCK_N`` (BLOCK_N = min(1024, next power of two >= H), BLOCK_M = TILE / BLOCK_N),
grid ``(row tiles, column blocks)`` in the forward. With 16-byte aligned rows (H a multiple of 8, as 3072/2048)
loads and stores are 128-bit vectors.

Backward strategy: without a bias one program per tile. With a bias a fixed number P = min(row tiles,
BWD_PROGRAMS) of programs per column block walk row tiles p, p + P, ..., keep their share of dbias in fp32
registers and write one row of a ``[P, H]`` fp32 partial buffer; ``_bwd_dbias_kernel`` sums it over P in a fixed
order: no atomics, bitwise deterministic, no host sync, CUDA-graph safe.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmae.kernels._common import (
    as_rows,
    check_device,
    check_float,
    check_same_device,
    empty,
    interpreting,
    launch_skipped,
    register_op,
    unsupported_float,
)

SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))
INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


@triton.jit
def _fwd_kernel(
    X, Bias, Y, M, N, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y of one ``BLOCK_M × BLOCK_N`` tile; grid ``(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    r = rows.to(tl.int64)[:, None]
    z = tl.load(X + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(Bias + cols[None, :], mask=col_ok[None, :], other=0.0).to(tl.float32)
    y = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    tl.store(Y + r * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    X, Bias, DY, DX, DBiasPart, M, N, stride_x, stride_dy, stride_dx,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dx of row tiles pid, pid + P, ... in one column block, and (with a bias) their partial dbias;
    grid ``(P, cdiv(N, BLOCK_N))``."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_BIAS:
        bias = tl.load(Bias + cols[None, :], mask=col_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), n_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        z = tl.load(X + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += bias
        dy = tl.load(DY + r * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
        dx = dy * (cdf + z * pdf)
        tl.store(DX + r * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DBiasPart + pid * N + cols, acc, mask=col_ok)


@triton.jit
def _bwd_dbias_kernel(DBiasPart, DBias, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dbias of columns ``pid·BLOCK_N ..``: the ``[P, N]`` partials summed over P in a fixed order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_ok[None, :]
        acc += tl.load(DBiasPart + parts[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(DBias + cols, tl.sum(acc, axis=0).to(DBias.dtype.element_ty), mask=col_ok)


# Tuning (H100, not yet measured on a GPU): elementwise and memory-bound; tiles of TILE = 4096 elements (32 per
# thread at 4 warps: four 16-byte bf16 vectors per tensor), no autotuning. BWD_PROGRAMS programs per column block
# when a bias is fused: the [P, H] fp32 partials are ~2% of the backward's traffic at ViT-B's 12800 × 3072.
# ptxas (sm_80/sm_90, bf16, H = 3072/2048): forward 35-71 registers, backward 72-128, no spills; 128-bit vectors
# throughout; 4 KB shared memory where the fp32 bias changes layout to match the bf16 tile.
TILE = 4096
MAX_BLOCK_N = 1024
NUM_WARPS = 4
BWD_PROGRAMS = 256
DBIAS_BLOCK_P, DBIAS_BLOCK_N = 64, 32


def tiling(n: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` for rows of width n."""
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(n))
    return max(1, TILE // block_n), block_n


# triton.jit turned the kernels into interpreted functions when this was set at import.
_INTERPRETED = interpreting()


def unsupported(x, bias=None) -> str | None:
    """Why :func:`gelu` does not take arguments the eager op accepts (float64), from dtypes alone; None when it
    does or when they are malformed (both then raise)."""
    return unsupported_float(x=x, bias=bias)


def _check(x, bias) -> None:
    """Raise a clear TypeError/ValueError for arguments the kernels do not take."""
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last dim H >= 1, got shape {tuple(x.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"bias must be [H] = [{x.shape[-1]}] (x's last dim), got shape {tuple(bias.shape)}")
        check_same_device(x=x, bias=bias)
    check_device("x", x, _INTERPRETED)


def _launch_fwd(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y ``[M, H]`` in x's dtype from validated ``[M, H]`` rows with unit-stride columns."""
    m, n = x.shape
    y = empty(m, n, dtype=x.dtype, device=x.device)  # [M, H]
    if m == 0:
        return y
    block_m, block_n = tiling(n)
    args = (x, bias if bias is not None else x, y, m, n, x.stride(0), y.stride(0))
    consts = {"HAS_BIAS": bias is not None, "BLOCK_M": block_m, "BLOCK_N": block_n}
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    if not _INTERPRETED:
        wrap_triton(_fwd_kernel)[grid](*args, **consts, num_warps=NUM_WARPS)
    elif not launch_skipped(*args):
        _fwd_kernel[grid](*args, **consts)
    return y


def _launch_bwd(x: torch.Tensor, bias: torch.Tensor | None, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx ``[M, H]`` in x's dtype and dbias ``[H]`` in bias's dtype (an empty placeholder without a bias)."""
    m, n = x.shape
    has_bias = bias is not None
    dx = empty(m, n, dtype=x.dtype, device=x.device)  # [M, H]
    dbias = empty(n if has_bias else 0, dtype=bias.dtype if has_bias else x.dtype, device=x.device)  # [H]
    block_m, block_n = tiling(n)
    tiles = triton.cdiv(m, block_m)
    progs = max(1, min(tiles, BWD_PROGRAMS) if has_bias else tiles)
    part = empty(progs if has_bias else 0, n, dtype=torch.float32, device=x.device)  # [P, H]
    args = (x, bias if has_bias else x, dy, dx, part if has_bias else dx, m, n, x.stride(0), dy.stride(0))
    args = (*args, dx.stride(0))
    consts = {"HAS_BIAS": has_bias, "BLOCK_M": block_m, "BLOCK_N": block_n}
    grid = (progs, triton.cdiv(n, block_n))
    if not _INTERPRETED:
        wrap_triton(_bwd_kernel)[grid](*args, **consts, num_warps=NUM_WARPS)
    elif not launch_skipped(*args):
        _bwd_kernel[grid](*args, **consts)
    if has_bias:
        args = (part, dbias, progs, n)
        consts = {"BLOCK_P": DBIAS_BLOCK_P, "BLOCK_N": DBIAS_BLOCK_N}
        grid = (triton.cdiv(n, DBIAS_BLOCK_N),)
        if not _INTERPRETED:
            wrap_triton(_bwd_dbias_kernel)[grid](*args, **consts, num_warps=4)
        elif not launch_skipped(*args):
            _bwd_dbias_kernel[grid](*args, **consts)
    return dx, dbias


class GeluFunction(torch.autograd.Function):
    """Autograd of the fused op on ``[M, H]`` rows."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, bias):
        ctx.save_for_backward(x, bias)
        return gelu_fwd(x, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = gelu_bwd(x, bias, as_rows(dy))
        return dx, dbias if bias is not None and ctx.needs_input_grad[1] else None


# Torch integration (see fastmae.kernels._common.register_op): the two ops, tied by GeluFunction, which saves x and
# the bias; the public op has the signature of fastmae.reference.gelu.
gelu_fwd = register_op("fastmae::gelu_fwd")(_launch_fwd)
gelu_bwd = register_op("fastmae::gelu_bwd")(_launch_bwd)


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (erf) GELU of ``x + bias`` in one pass; see ``fastmae.reference.gelu``.

    Args:
        x: ``[..., H]`` float32/float16/bfloat16 on CUDA (or the CPU under ``TRITON_INTERPRET=1``): fc1's output.
        bias: optional ``[H]`` (fc1's bias when fc1 runs without it), any float dtype.

    Returns:
        ``gelu(x + bias)`` in x's dtype (the reference returns the promoted dtype of x and bias; under autocast
        the next Linear casts it to x's dtype anyway). Differentiable in x and bias.
    """
    _check(x, bias)
    out = GeluFunction.apply(as_rows(x), bias.contiguous() if bias is not None else None)
    return out.view(x.shape)
