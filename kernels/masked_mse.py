"""MAE's loss read straight from the image: masked rows only, per-patch normalization in registers.

Math (names as in the code). ``pred [N, R, D]`` with ``D = P·P·C`` in (i, j, c) order, ``imgs [N, C, H, W]``,
grid ``GH × GW`` patches (``L = GH·GW``). Row ``(n, r)`` scores patch ``l = r`` (R = L) or, given ``ids``,
``l = ids[n, r]``, with weight ``w = mask[n, r]`` (1 when there is no mask)::

    t_q     = imgs[n, c, hh·P + i, ww·P + j]            hh = l // GW, ww = l % GW
    target  = t                                          (norm_pix_loss off)
    target  = (t − mean) · rstd                          mean = Σ t / D, var = Σ (t − mean)² / (D − 1),
                                                         rstd = 1 / sqrt(var + 1e-6)   (unbiased, as the original)
    err     = pred − target;   row_loss = Σ err² / D
    loss    = Σ w · row_loss / Σ w
    dpred   = g · 2 · err · w / (D · Σ w)               (zeros where w = 0)

Forward: ``_fwd_kernel`` handles BLOCK_R rows × BLOCK_D (next power of two ≥ D, lanes ≥ D masked) per program. Rows
with ``w = 0`` are masked out of every load, so no byte of an unmasked patch's pred or pixels moves. Each program
writes its partial ``Σ w·row_loss`` and ``Σ w`` (fp32); ``_fwd_reduce_kernel`` (one program) sums the partials in a
fixed order and writes ``loss`` and ``Σ w``: deterministic, no atomics. Accumulation is fp32 whatever the input dtypes.
Lanes are laid out in (c, i, j) order so that image loads run along contiguous pixel rows; pred is addressed
through the (i, j, c) index of the same lane (any consistent lane permutation gives the same sums).

Backward: ``_bwd_kernel`` recomputes mean/rstd from the pixels (the row is re-read anyway to form the target, so
saving ``[N, L]`` statistics would only add traffic) and writes dpred in pred's dtype, zeros for rows with
``w = 0``. Nothing of size ``[N, L, D]`` is saved: only pred, imgs, the mask and a scalar ``Σ w``.

Semantics and constraints:
- Masks may hold any weights (bool, int or float; fractional weights give the reference's weighted mean). Rows
  with ``w = 0`` are never read, so a NaN in an unscored row of pred does not reach the loss (the reference's
  ``0 · NaN`` would).
- ``Σ w = 0`` (an all-zero mask) is an error, as is an ``ids`` entry outside ``[0, L)``; the policy of
  :mod:`fastmae.kernels._common`: CPU tensors are checked on the host (a ValueError at once); on CUDA the loss is
  NaN (the reference's 0/0; a bad index never addresses memory, its row's loss and gradient are NaN) and the
  forward kernels set a flag that ``fastmae.kernels.check_errors()`` reports.
- ``imgs`` gets no gradient: MAE's images never require one, and a call with ``imgs.requires_grad`` under grad
  mode raises a ValueError rather than silently dropping it. Likewise for ``mask``.
- Offsets along the batch are computed in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmae.kernels._common import (
    check_device,
    check_float,
    check_same_device,
    debug_check,
    empty,
    error_flags,
    host_checks,
    interpreting,
    launch_skipped,
    register_op,
    unsupported_float,
)

__all__ = ["masked_mse", "unsupported"]


@triton.jit
def _rows_err(
    PRED, IMGS, MASK, IDS, pid, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
    P: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Load BLOCK_R rows (live ones only) and return (rows, in_range, bad, w, err [BLOCK_R, BLOCK_D], j, q_ok)."""
    D = P * P * C
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # flat row index n·R + r
    in_range = rows < total_rows
    rows64 = rows.to(tl.int64)
    n = rows64 // R
    r = rows64 % R
    if HAS_MASK:
        w = tl.load(MASK + rows64, mask=in_range, other=0.0)
    else:
        w = tl.where(in_range, 1.0, 0.0)
    if HAS_IDS:
        patch = tl.load(IDS + rows64, mask=in_range, other=0)
        valid = in_range & (patch >= 0) & (patch < L)
    else:
        patch = r
        valid = in_range
    bad = in_range & (valid == 0)
    live = valid & (w != 0.0)
    hh = patch // GW
    ww = patch % GW

    q = tl.arange(0, BLOCK_D)  # lane in (c, i, j) order
    c = q // (P * P)
    i = (q // P) % P
    jj = q % P
    q_ok = q < D
    j = (i * P + jj) * C + c  # the same element's index in pred's (i, j, c) order
    ld = live[:, None] & q_ok[None, :]

    pred = tl.load(PRED + n[:, None] * s_pn + r[:, None] * s_pr + j[None, :] * s_pd, mask=ld, other=0.0)
    pix = (
        IMGS
        + n[:, None] * s_in
        + c[None, :] * s_ic
        + (hh[:, None] * P + i[None, :]) * s_ih
        + (ww[:, None] * P + jj[None, :]) * s_iw
    )
    t = tl.load(pix, mask=ld, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(t, axis=1) / D
        diff = tl.where(ld, t - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / (D - 1)
        rstd = 1.0 / tl.sqrt_rn(var + 1.0e-6)
        t = diff * rstd[:, None]
    err = pred.to(tl.float32) - t  # zero outside live rows and lanes
    return rows64, in_range, bad, w, err, j, q_ok


@triton.jit
def _fwd_kernel(
    PRED, IMGS, MASK, IDS, PART, ERR, total_rows, num_programs, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
    P: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """PART[0, pid] = Σ w·row_loss over this program's rows, PART[1, pid] = Σ w; ERR[0] = 1 on an index outside
    [0, L)."""
    D = P * P * C
    pid = tl.program_id(0)
    rows, in_range, bad, w, err, j, q_ok = _rows_err(
        PRED, IMGS, MASK, IDS, pid, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
        P, C, NORM, HAS_MASK, HAS_IDS, BLOCK_R, BLOCK_D,
    )  # fmt: skip
    if HAS_IDS:
        tl.store(ERR + tl.zeros([BLOCK_R], dtype=tl.int32), 1, mask=bad)
    row_loss = tl.sum(err * err, axis=1) / D
    contrib = tl.where(w != 0.0, w * row_loss, 0.0)
    contrib = tl.where(bad, float("nan"), contrib)
    tl.store(PART + pid, tl.sum(contrib, axis=0))
    tl.store(PART + num_programs + pid, tl.sum(w, axis=0))


@triton.jit
def _fwd_reduce_kernel(PART, LOSS, WSUM, ERR, num_programs, BLOCK: tl.constexpr):
    """LOSS = Σ PART[0] / Σ PART[1], WSUM = Σ PART[1]: one program, fixed order; ERR[1] = 1 when Σ w = 0."""
    acc_l = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_programs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < num_programs
        acc_l += tl.load(PART + offs, mask=ok, other=0.0)
        acc_w += tl.load(PART + num_programs + offs, mask=ok, other=0.0)
    total = tl.sum(acc_l, axis=0)
    wsum = tl.sum(acc_w, axis=0)
    tl.store(LOSS, total / wsum)
    tl.store(WSUM, wsum)
    tl.store(ERR + 1, 1, mask=wsum == 0.0)


@triton.jit
def _bwd_kernel(
    PRED, IMGS, MASK, IDS, GRAD, WSUM, DPRED, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
    P: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """DPRED[n, r] = g · 2 · err · w / (D · Σ w), contiguous [N, R, D], every row written."""
    D = P * P * C
    pid = tl.program_id(0)
    rows, in_range, bad, w, err, j, q_ok = _rows_err(
        PRED, IMGS, MASK, IDS, pid, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
        P, C, NORM, HAS_MASK, HAS_IDS, BLOCK_R, BLOCK_D,
    )  # fmt: skip
    g = tl.load(GRAD).to(tl.float32)
    wsum = tl.load(WSUM)
    coef = (2.0 * g / (D * wsum)) * w  # [BLOCK_R]
    coef = tl.where(bad, float("nan"), coef)
    d = coef[:, None] * err
    out = DPRED + rows[:, None] * D + j[None, :]
    tl.store(out, d.to(DPRED.dtype.element_ty), mask=in_range[:, None] & q_ok[None, :])


# Tuning: one tile of about 4096 elements per program (BLOCK_R = 4096 / BLOCK_D rows, at most 16), 8 warps for the
# large tiles; chosen from D alone (no autotuning, so the reduction order is the same in every process). The final
# sum of the per-program partials runs in one program over REDUCE_BLOCK lanes.
REDUCE_BLOCK = 1024


def tiling(d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of d elements: a ~4096-element tile."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 4096 // block_d))
    return block_r, block_d, (8 if block_r * block_d >= 4096 else 4)


# triton.jit turned the kernels into interpreted functions when this was set at import.
_INTERPRETED = interpreting()


def unsupported(pred, imgs, *args) -> str | None:
    """Why :func:`masked_mse` does not take arguments the eager loss accepts (a float64 tensor, images that require
    grad), or None."""
    reason = unsupported_float(pred=pred, imgs=imgs)
    if reason is None and isinstance(imgs, torch.Tensor) and imgs.requires_grad and torch.is_grad_enabled():
        reason = "imgs requires grad; the kernel gives the images no gradient"
    return reason


ZERO_MASK_MSG = "mask sums to zero: no patch is scored (the loss would be 0/0)"


def _check(pred, imgs, mask, patch_size, norm_pix_loss, ids) -> tuple[int, int]:
    """Raise a clear TypeError/ValueError for arguments the kernels do not take (bad ids and an all-zero mask: on
    the host); return (C, GW)."""
    check_float("pred", pred)
    check_float("imgs", imgs)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise TypeError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    if pred.dim() != 3:
        raise ValueError(f"pred must be 3-D [N, L, p²·C], got shape {list(pred.shape)}")
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be 4-D [N, C, H, W], got shape {list(imgs.shape)}")
    check_same_device(pred=pred, imgs=imgs)
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"imgs is {h}x{w}: both sides must be positive multiples of patch_size={p}")
    if n == 0 or pred.shape[0] != n:
        raise ValueError(f"pred has batch {pred.shape[0]}, imgs has {n}; both must be equal and non-zero")
    d, num_rows, gh, gw = p * p * c, pred.shape[1], h // p, w // p
    if pred.shape[2] != d:
        raise ValueError(f"pred's last dim must be patch_size²·C = {p}²·{c} = {d}, got {pred.shape[2]}")
    if norm_pix_loss and d < 2:
        raise ValueError("norm_pix_loss needs at least 2 values per patch (unbiased variance)")
    if imgs.requires_grad and torch.is_grad_enabled():
        raise ValueError("imgs requires grad, but this loss gives no gradient to the images; pass imgs.detach()")
    if ids is None and num_rows != gh * gw:
        raise ValueError(f"pred has {num_rows} patches but imgs holds {gh}x{gw} = {gh * gw} of size {patch_size}")
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise TypeError(f"ids must be an int64 tensor [N, R], got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.shape != (n, num_rows) or num_rows == 0:
            raise ValueError(f"ids must have shape [N, R] = [{n}, {num_rows}] with R ≥ 1, got {list(ids.shape)}")
        check_same_device(pred=pred, ids=ids)
        if host_checks(ids) and ((ids < 0).any() or (ids >= gh * gw).any()):
            raise ValueError(f"ids must lie in [0, {gh * gw}) (the patches of a {gh}x{gw} grid)")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor [N, R] or None, got {type(mask).__name__}")
        if mask.shape != (n, num_rows):
            raise ValueError(f"mask must have shape [N, R] = [{n}, {num_rows}], got {list(mask.shape)}")
        if mask.is_complex():
            raise TypeError(f"mask must be bool, integer or real floating, got {mask.dtype}")
        check_same_device(pred=pred, mask=mask)
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("mask requires grad, but this loss gives no gradient to the mask; pass mask.detach()")
        if host_checks(mask) and mask.to(torch.float32).sum() == 0:
            raise ValueError(ZERO_MASK_MSG)
    check_device("pred", pred, _INTERPRETED)
    return c, gw


def _plan(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, gw: int) -> tuple[int, int, tuple, dict]:
    """(programs, num_warps, the row arguments R, L, GW and strides, the tile constexprs) of a launch."""
    n, rows, d = pred.shape
    block_r, block_d, warps = tiling(d)
    row_args = (rows, imgs.shape[2] // patch_size * gw, gw, *pred.stride(), *imgs.stride())
    return triton.cdiv(n * rows, block_r), warps, row_args, {"BLOCK_R": block_r, "BLOCK_D": block_d}


def _launch_fwd(
    pred: torch.Tensor, imgs: torch.Tensor, weights: torch.Tensor | None, ids: torch.Tensor | None, err: torch.Tensor,
    patch_size: int, c: int, gw: int, norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """loss ``[1]`` and Σ w ``[1]`` (fp32); ``err[0]`` set on an index outside [0, L), ``err[1]`` on Σ w = 0."""
    progs, warps, row_args, tiles = _plan(pred, imgs, patch_size, gw)
    consts = dict(P=patch_size, C=c, NORM=norm, HAS_MASK=weights is not None, HAS_IDS=ids is not None, **tiles)
    part = empty(2, progs, dtype=torch.float32, device=pred.device)  # [2, programs]
    mask_, ids_ = pred if weights is None else weights, pred if ids is None else ids
    args = (pred, imgs, mask_, ids_, part, err, pred.shape[0] * pred.shape[1], progs, *row_args)
    if not _INTERPRETED:
        wrap_triton(_fwd_kernel)[(progs,)](*args, **consts, num_warps=warps)
    elif not launch_skipped(*args):
        _fwd_kernel[(progs,)](*args, **consts)
    loss = empty(1, dtype=torch.float32, device=pred.device)
    wsum = empty(1, dtype=torch.float32, device=pred.device)
    args = (part, loss, wsum, err, progs)
    if not _INTERPRETED:
        wrap_triton(_fwd_reduce_kernel)[(1,)](*args, BLOCK=REDUCE_BLOCK, num_warps=4)
    elif not launch_skipped(*args):
        _fwd_reduce_kernel[(1,)](*args, BLOCK=REDUCE_BLOCK)
    return loss, wsum


def _launch_bwd(
    grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, weights: torch.Tensor | None,
    ids: torch.Tensor | None, wsum: torch.Tensor, patch_size: int, c: int, gw: int, norm: bool,
) -> torch.Tensor:  # fmt: skip
    """dpred, contiguous ``[N, R, D]`` in pred's dtype, for the upstream gradient ``grad [1]``."""
    progs, warps, row_args, tiles = _plan(pred, imgs, patch_size, gw)
    consts = dict(P=patch_size, C=c, NORM=norm, HAS_MASK=weights is not None, HAS_IDS=ids is not None, **tiles)
    dpred = empty(*pred.shape, dtype=pred.dtype, device=pred.device)  # [N, R, D]
    mask_, ids_ = pred if weights is None else weights, pred if ids is None else ids
    args = (pred, imgs, mask_, ids_, grad.to(torch.float32), wsum, dpred, pred.shape[0] * pred.shape[1], *row_args)
    if not _INTERPRETED:
        wrap_triton(_bwd_kernel)[(progs,)](*args, **consts, num_warps=warps)
    elif not launch_skipped(*args):
        _bwd_kernel[(progs,)](*args, **consts)
    return dpred


class MaskedMSEFunction(torch.autograd.Function):
    """Autograd of the fused loss (a ``[1]`` tensor): the gradient of pred only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, pred, imgs, weights, ids, patch_size, c, gw, norm):
        err = error_flags("masked_mse", pred.device)
        loss, wsum = masked_mse_fwd(pred, imgs, weights, ids, err, patch_size, c, gw, norm)
        ctx.save_for_backward(pred, imgs, weights, ids, wsum)
        ctx.meta = (patch_size, c, gw, norm)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        pred, imgs, weights, ids, wsum = ctx.saved_tensors
        dpred = masked_mse_bwd(grad, pred, imgs, weights, ids, wsum, *ctx.meta) if ctx.needs_input_grad[0] else None
        return dpred, None, None, None, None, None, None, None


# Torch integration (see fastmae.kernels._common.register_op): the forward op writes the error flags it is given
# (mutates_args) and returns the loss with Σ w, which MaskedMSEFunction saves with pred, imgs, mask and ids.
masked_mse_fwd = register_op("fastmae::masked_mse_fwd", mutates_args=("err",))(_launch_fwd)
masked_mse_bwd = register_op("fastmae::masked_mse_bwd")(_launch_bwd)


def masked_mse(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: int,
    norm_pix_loss: bool = False,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's loss, read from the image for the scored patches only; see :func:`fastmae.reference.masked_mse`.

    Args:
        pred: ``[N, R, p²·C]`` predictions, (i, j, c) order within a patch, of every patch (``R = L``) or with
            ``ids`` of the patches ``ids`` names; any strides, fp32/fp16/bf16.
        imgs: ``[N, C, H, W]``, any strides, fp32/fp16/bf16; must not require grad.
        mask: ``[N, R]`` weights of pred's rows, 1 = removed (scored), 0 = visible (never read); bool, int or float;
            None scores every row. A mask summing to zero is an error (on CUDA: a NaN loss and a flag for
            ``fastmae.kernels.check_errors``).
        patch_size: p.
        norm_pix_loss: normalize each target patch by its mean and unbiased variance (+1e-6).
        ids: optional ``[N, R]`` int64 patch indices in ``[0, L)`` (raster order of the patch grid): row r of pred
            predicts patch ``ids[n, r]``. With the masked patches of a 0/1 mask (and no ``mask``) this is the loss
            of the full prediction, without the decoder ever predicting the visible patches.

    Returns:
        A float32 scalar: ``Σ mask · mean_j (pred − target)² / Σ mask``.
    """
    c, gw = _check(pred, imgs, mask, patch_size, norm_pix_loss, ids)
    weights = None if mask is None else mask.to(torch.float32).contiguous()  # [N, R]
    ids = None if ids is None else ids.contiguous()  # [N, R]
    loss = MaskedMSEFunction.apply(pred, imgs, weights, ids, patch_size, c, gw, norm_pix_loss).view(())  # []
    debug_check()
    return loss
