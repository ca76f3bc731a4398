"""LayerNorm over the last dim, optionally fused with the residual add before it, in one pass each way.

Math, per row of width ``D`` (``x``, ``branch``, ``x_new``, ``y`` rows; ``w``, ``b`` the affine weight and bias):

Forward (``_fwd_kernel``)::

    x_new = x + branch                  (with a branch; rounded to the promoted dtype of x and branch, as eager
                                         ``x + branch``; without one x_new is x itself and is not written)
    mean  = Σ x_new / D
    xc    = x_new − mean
    rstd  = 1 / sqrt(Σ xc² / D + eps)   (biased variance, as ``nn.LayerNorm``; eps = 1e-6 in MAE)
    xhat  = xc · rstd
    y     = xhat · w + b                -> written in ``out_dtype``; mean and rstd (fp32, [M]) are saved

Backward (``_bwd_kernel``), given ``dy = ∂L/∂y`` and ``dres = ∂L/∂x_new`` from x_new's other consumers (the
residual stream: the next block's add reads x_new), with ``xhat`` recomputed from x_new, mean and rstd::

    g     = dy · w
    dx    = rstd · (g − mean(g) − xhat · mean(g · xhat)) + dres      (means over the row's D columns)
    dbranch = dx                        (x_new = x + branch; written again only when branch's dtype differs)
    dw    = Σ_rows dy · xhat,  db = Σ_rows dy

Fused: the residual add and the norm (forward), the norm's backward and the residual gradient (backward), and
the cast to the next GEMM's dtype: under CUDA autocast ``y`` is written in the autocast dtype (bf16/fp16), which is
what eager's fp32 ``F.layer_norm`` output rounds to when the next Linear casts it; the statistics stay fp32 and
the residual stream (x_new) keeps its dtype. Every input is read in its own dtype and computed in fp32.

Constraints: ``1 <= D <= 8192`` (D is a compile-time constant: one compilation per width, masks vanish when D is
a power of two); the last dim unit-stride (rows may be strided); any number of rows M (int64 row offsets).

Tiling: one tile of ``BLOCK_M × D_PAD`` (``D_PAD`` = next power of two >= D) per program: several rows per program
for small D (8 rows at D = 192, 4 at 384/512, 2 at 768/1024), one row from D = 1025 (ViT-H's 1280 pads to 2048);
each row is reduced whole in registers, so x_new is read once. With 16-byte aligned rows (row strides a multiple
of 16 elements, as every ViT width) loads and stores are 128-bit vectors.

Backward strategy: ``_bwd_kernel`` runs a fixed number of programs P = min(row tiles, BWD_PROGRAMS); program p
walks tiles p, p + P, ... and keeps its share of dw and db in fp32 registers, then writes one row of a ``[P, D]``
fp32 partial buffer (no atomics). ``_bwd_dwdb_kernel`` sums the partials over P in a fixed order. P depends on
M only, so the result is bitwise the same run to run; no host sync, no data-dependent launch: CUDA-graph safe.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmae.kernels._common import (
    FLOAT_DTYPES,
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

MAX_D = 8192


@triton.jit
def _fwd_kernel(
    X, Branch, XNew, Y, W, B, Mean, Rstd, M, stride_x, stride_branch, stride_xnew, stride_y, eps,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BRANCH: tl.constexpr,
):  # fmt: skip
    """x_new (with a branch), y, mean and rstd of rows ``pid·BLOCK_M ..``; grid ``(cdiv(M, BLOCK_M),)``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < D)[None, :]
    r = rows.to(tl.int64)[:, None]
    x = tl.load(X + r * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_BRANCH:
        branch = tl.load(Branch + r * stride_branch + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + branch.to(tl.float32)).to(XNew.dtype.element_ty)
        tl.store(XNew + r * stride_xnew + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + r * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_kernel(
    DY, DRes, XNew, W, Mean, Rstd, DX, DBranch, DWPart, DBPart, M,
    stride_dy, stride_dres, stride_xnew, stride_dx, stride_dbranch,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DRES: tl.constexpr, HAS_DBRANCH: tl.constexpr,
):  # fmt: skip
    """dx (and dbranch) of row tiles pid, pid + P, ...; this program's partial dw, db; grid ``(P,)``."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([D_PAD], dtype=tl.float32)
    db = tl.zeros([D_PAD], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), n_progs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        x = tl.load(XNew + r * stride_xnew + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / D
        c2 = tl.sum(g, axis=1) / D
        dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRes + r * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DBRANCH:
            tl.store(DBranch + r * stride_dbranch + cols[None, :], dx.to(DBranch.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DWPart + pid * D + cols, dw, mask=col_ok)
    tl.store(DBPart + pid * D + cols, db, mask=col_ok)


@triton.jit
def _bwd_dwdb_kernel(
    DWPart, DBPart, DW, DB, P, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """dw, db of columns ``pid·BLOCK_N ..``: the ``[P, D]`` partials summed over P in a fixed order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    dw = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_ok[None, :]
        offs = parts[:, None] * D + cols[None, :]
        dw += tl.load(DWPart + offs, mask=mask, other=0.0)
        db += tl.load(DBPart + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_ok)


# Tuning (H100, not yet measured on a GPU): memory-bound, so each program moves one tile of TILE = 2048 elements
# (16 fp32 values per thread per live tensor at 4 warps), one warp per 256 padded columns from D_PAD = 2048 up, no
# autotuning (the configs follow D, and the dw/db reduction order with them). BWD_PROGRAMS bounds the partial
# buffer: 512 programs (~4 per H100 SM) keep enough loads in flight while the [P, D] fp32 partials stay ~4% of
# the backward's traffic at ViT-B's 12800 rows. ptxas (sm_80/sm_90, bf16 under autocast, D = 512/768/1280): forward
# 38-56 registers, backward 64-122, no spills; 4-8 KB shared memory for the cross-warp row sums; every row load and
# store a 128-bit vector.
TILE = 2048
BWD_PROGRAMS = 512
DWDB_BLOCK_P, DWDB_BLOCK_N = 64, 32


def tiling(d: int) -> tuple[int, int, int]:
    """``(D_PAD, BLOCK_M, num_warps)`` for rows of width d."""
    d_pad = triton.next_power_of_2(d)
    return d_pad, max(1, TILE // d_pad), max(4, min(16, d_pad // 256))


# triton.jit turned the kernels into interpreted functions when this was set at import.
_INTERPRETED = interpreting()


def unsupported(x, weight, bias, branch=None, eps=1e-6, out_dtype=None) -> str | None:
    """Why :func:`layer_norm` does not take arguments the eager op accepts (float64, a row wider than MAX_D), from
    shapes and dtypes alone; None when it does or when they are malformed (both then raise)."""
    reason = unsupported_float(x=x, weight=weight, bias=bias, branch=branch)
    if reason is None and isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] > MAX_D:
        reason = f"x's last dim D = {x.shape[-1]} exceeds the kernel's maximum {MAX_D}"
    return reason


def _check(x, weight, bias, branch, eps, out_dtype) -> None:
    """Raise a clear TypeError/ValueError for arguments the kernels do not take."""
    check_float("x", x)
    check_float("weight", weight)
    check_float("bias", bias)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last dim D >= 1 to normalize, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d > MAX_D:
        raise ValueError(f"x's last dim D = {d} exceeds the kernel's maximum {MAX_D}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (d,):
            raise ValueError(f"{name} must be [D] = [{d}] (x's last dim), got shape {tuple(t.shape)}")
    tensors = {"x": x, "weight": weight, "bias": bias}
    if branch is not None:
        check_float("branch", branch)
        if branch.shape != x.shape:
            raise ValueError(f"branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
        tensors["branch"] = branch
    check_same_device(**tensors)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    check_device("x", x, _INTERPRETED)


def _launch_fwd(
    x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """x_new ``[M, D]`` (an empty placeholder without a branch), y ``[M, D]`` in out_dtype, mean and rstd ``[M]``
    (fp32) of validated ``[M, D]`` rows with unit-stride columns."""
    m, d = x.shape
    has_branch = branch is not None
    new_dtype = torch.promote_types(x.dtype, branch.dtype) if has_branch else x.dtype
    x_new = empty(m if has_branch else 0, d, dtype=new_dtype, device=x.device)  # [M, D]
    y = empty(m, d, dtype=out_dtype, device=x.device)  # [M, D]
    mean = empty(m, dtype=torch.float32, device=x.device)  # [M]
    rstd = empty(m, dtype=torch.float32, device=x.device)  # [M]
    if m == 0:
        return x_new, y, mean, rstd
    d_pad, block_m, num_warps = tiling(d)
    branch_ = branch if has_branch else x
    xnew_ = x_new if has_branch else y
    args = (x, branch_, xnew_, y, weight, bias, mean, rstd, m, x.stride(0), branch_.stride(0), xnew_.stride(0))
    args = (*args, y.stride(0), eps)
    consts = {"D": d, "D_PAD": d_pad, "BLOCK_M": block_m, "HAS_BRANCH": has_branch}
    grid = (triton.cdiv(m, block_m),)
    if not _INTERPRETED:
        wrap_triton(_fwd_kernel)[grid](*args, **consts, num_warps=num_warps)
    elif not launch_skipped(*args):
        _fwd_kernel[grid](*args, **consts)
    return x_new, y, mean, rstd


def _launch_bwd(
    dy: torch.Tensor, dres: torch.Tensor | None, x_new: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, x_dtype: torch.dtype, branch_dtype: torch.dtype | None, bias_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dx ``[M, D]`` in x_dtype, dbranch in branch_dtype (an empty placeholder unless branch_dtype is given and
    differs from x_dtype: then dbranch is dx), dw in weight's dtype, db in bias_dtype."""
    m, d = x_new.shape
    write_dbranch = branch_dtype is not None and branch_dtype != x_dtype
    dx = empty(m, d, dtype=x_dtype, device=dy.device)  # [M, D]
    dbranch = empty(m if write_dbranch else 0, d, dtype=branch_dtype or x_dtype, device=dy.device)  # [M, D]
    dw = empty(d, dtype=weight.dtype, device=dy.device)  # [D]
    db = empty(d, dtype=bias_dtype, device=dy.device)  # [D]
    d_pad, block_m, num_warps = tiling(d)
    progs = max(1, min(triton.cdiv(m, block_m), BWD_PROGRAMS))
    dw_part = empty(progs, d, dtype=torch.float32, device=dy.device)  # [P, D]
    db_part = empty(progs, d, dtype=torch.float32, device=dy.device)  # [P, D]
    dres_ = dres if dres is not None else dy
    dbranch_ = dbranch if write_dbranch else dx
    args = (dy, dres_, x_new, weight, mean, rstd, dx, dbranch_, dw_part, db_part, m, dy.stride(0), dres_.stride(0))
    args = (*args, x_new.stride(0), dx.stride(0), dbranch_.stride(0))
    consts = {"D": d, "D_PAD": d_pad, "BLOCK_M": block_m, "HAS_DRES": dres is not None, "HAS_DBRANCH": write_dbranch}
    if not _INTERPRETED:
        wrap_triton(_bwd_kernel)[(progs,)](*args, **consts, num_warps=num_warps)
    elif not launch_skipped(*args):
        _bwd_kernel[(progs,)](*args, **consts)
    args = (dw_part, db_part, dw, db, progs)
    consts = {"D": d, "BLOCK_P": DWDB_BLOCK_P, "BLOCK_N": DWDB_BLOCK_N}
    grid = (triton.cdiv(d, DWDB_BLOCK_N),)
    if not _INTERPRETED:
        wrap_triton(_bwd_dwdb_kernel)[grid](*args, **consts, num_warps=4)
    elif not launch_skipped(*args):
        _bwd_dwdb_kernel[grid](*args, **consts)
    return dx, dbranch, dw, db


class LayerNormFunction(torch.autograd.Function):
    """Autograd of the fused op on ``[M, D]`` rows: outputs ``(x_new, y)`` with a branch, ``y`` without."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, branch, weight, bias, eps, out_dtype):
        x_new, y, mean, rstd = layer_norm_fwd(x, branch, weight, bias, eps, out_dtype)
        has_branch = branch is not None
        ctx.save_for_backward(x_new if has_branch else x, weight, mean, rstd)
        ctx.meta = (has_branch, x.dtype, branch.dtype if has_branch else None, bias.dtype)
        ctx.set_materialize_grads(False)
        return (x_new, y) if has_branch else y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grads):
        x_new, weight, mean, rstd = ctx.saved_tensors
        has_branch, x_dtype, branch_dtype, bias_dtype = ctx.meta
        dres, dy = grads if has_branch else (None, grads[0])
        if dy is None:  # y unused: only the residual stream's gradient passes through
            dx = None if dres is None else dres.to(x_dtype)
            dbranch = None if dres is None else dres.to(branch_dtype)
            return dx, dbranch, None, None, None, None
        dy = as_rows(dy)
        if dres is not None:
            dres = as_rows(dres)
        dx, dbranch, dw, db = layer_norm_bwd(dy, dres, x_new, weight, mean, rstd, x_dtype, branch_dtype, bias_dtype)
        if not has_branch:
            dbranch = None
        elif branch_dtype == x_dtype:  # not written separately: the same gradient
            dbranch = dx
        need = ctx.needs_input_grad
        return dx, dbranch, dw if need[2] else None, db if need[3] else None, None, None


# Torch integration (see fastmae.kernels._common.register_op): the two ops, tied by LayerNormFunction, which saves
# x_new (or x), mean and rstd; the public op has the signature of fastmae.reference.layer_norm.
layer_norm_fwd = register_op("fastmae::layer_norm_fwd")(_launch_fwd)
layer_norm_bwd = register_op("fastmae::layer_norm_bwd")(_launch_bwd)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    branch: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim, fused with the residual add before it; see ``fastmae.reference.layer_norm``.

    Args:
        x: ``[..., D]`` float32/float16/bfloat16 on CUDA (or the CPU under ``TRITON_INTERPRET=1``), 1 <= D <= 8192:
            the residual stream.
        weight, bias: ``[D]``, the affine parameters (any float dtype; their gradients come in their dtypes).
        branch: optional ``[..., D]`` added to x first (``x_new = x + branch`` in the promoted dtype).
        eps: added to the variance, >= 0 (MAE: 1e-6).
        out_dtype: the dtype of the normalized output; None: the CUDA autocast dtype when autocast is on (what the
            next Linear consumes), else x_new's dtype.

    Returns:
        ``y = (x_new − mean) / sqrt(var + eps) · weight + bias`` without a branch; ``(x_new, y)`` with one.
        Differentiable in x, branch, weight and bias; backward passes x_new's own gradient through in one pass.
    """
    _check(x, weight, bias, branch, eps, out_dtype)
    has_branch = branch is not None
    new_dtype = torch.promote_types(x.dtype, branch.dtype) if has_branch else x.dtype
    if out_dtype is None:
        autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
        out_dtype = torch.get_autocast_dtype("cuda") if autocast else new_dtype
    shape = x.shape
    out = LayerNormFunction.apply(
        as_rows(x),
        as_rows(branch) if has_branch else None,
        weight.contiguous(),
        bias.contiguous(),
        float(eps),
        out_dtype,
    )
    if not has_branch:
        return out.view(shape)
    x_new, y = out
    return x_new.view(shape), y.view(shape)
