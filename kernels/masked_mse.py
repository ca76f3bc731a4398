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
- ``Σ w = 0`` (an all-zero mask) is an error. The loss is then NaN, as the reference's 0/0, and dpred is NaN. On the
  CPU the ValueError is raised at once. On CUDA checking would cost a host sync per step (and break CUDA-graph
  capture), so ``Σ w`` is copied to pinned host memory without blocking and the ValueError is raised by the next
  call into this module (forward or backward) that finds the copy complete, or by :func:`check_mask_errors`.
- ``imgs`` gets no gradient: MAE's images never require one, and a call with ``imgs.requires_grad`` under grad
  mode raises a ValueError rather than silently dropping it. Likewise for ``mask``.
- ``ids`` (optional): int64 ``[N, R]``; range checked on the CPU; on CUDA an out-of-range entry never addresses
  memory, its row gives a NaN loss and NaN gradient.
- Offsets along the batch are computed in int64.

Tuning: one tile of about 4096 elements per program (BLOCK_R = 4096 / BLOCK_D rows, at most 16), 8 warps for the
large tiles; chosen from D alone (no autotuning, so the reduction order is the same in every process).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import check_float, check_same_device, empty, unsupported_float

__all__ = ["check_mask_errors", "masked_mse", "unsupported"]

EPS = 1.0e-6
REDUCE_BLOCK = 1024


@triton.jit
def _rows_err(
    PRED,
    IMGS,
    MASK,
    IDS,
    pid,
    total_rows,
    R,
    L,
    GW,
    s_pn,
    s_pr,
    s_pd,
    s_in,
    s_ic,
    s_ih,
    s_iw,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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
    PRED,
    IMGS,
    MASK,
    IDS,
    PART,
    total_rows,
    num_programs,
    R,
    L,
    GW,
    s_pn,
    s_pr,
    s_pd,
    s_in,
    s_ic,
    s_ih,
    s_iw,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """PART[0, pid] = Σ w·row_loss over this program's rows, PART[1, pid] = Σ w."""
    D = P * P * C
    pid = tl.program_id(0)
    rows, in_range, bad, w, err, j, q_ok = _rows_err(
        PRED, IMGS, MASK, IDS, pid, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
        P, C, NORM, HAS_MASK, HAS_IDS, BLOCK_R, BLOCK_D,
    )  # fmt: skip
    row_loss = tl.sum(err * err, axis=1) / D
    contrib = tl.where(w != 0.0, w * row_loss, 0.0)
    contrib = tl.where(bad, float("nan"), contrib)
    tl.store(PART + pid, tl.sum(contrib, axis=0))
    tl.store(PART + num_programs + pid, tl.sum(w, axis=0))


@triton.jit
def _fwd_reduce_kernel(PART, LOSS, WSUM, num_programs, BLOCK: tl.constexpr):
    """LOSS = Σ PART[0] / Σ PART[1], WSUM = Σ PART[1]: one program, fixed order."""
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


@triton.jit
def _bwd_kernel(
    PRED,
    IMGS,
    MASK,
    IDS,
    GRAD,
    WSUM,
    DPRED,
    total_rows,
    R,
    L,
    GW,
    s_pn,
    s_pr,
    s_pd,
    s_in,
    s_ic,
    s_ih,
    s_iw,
    P: tl.constexpr,
    C: tl.constexpr,
    NORM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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


def tiling(d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of d elements: a ~4096-element tile."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 4096 // block_d))
    return block_r, block_d, (8 if block_r * block_d >= 4096 else 4)


def _check(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool) -> tuple:
    """Validate pred/imgs/patch_size; return (N, R, D, C, GH, GW)."""
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
    d = p * p * c
    if pred.shape[2] != d:
        raise ValueError(f"pred's last dim must be patch_size²·C = {p}²·{c} = {d}, got {pred.shape[2]}")
    if norm_pix_loss and d < 2:
        raise ValueError("norm_pix_loss needs at least 2 values per patch (unbiased variance)")
    if imgs.requires_grad and torch.is_grad_enabled():
        raise ValueError("imgs requires grad, but this loss gives no gradient to the images; pass imgs.detach()")
    return n, pred.shape[1], d, c, h // p, w // p


# Σ w results on CUDA not yet checked for zero: (event recorded after the copy, pinned host copy).
_pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []

ZERO_MASK_MSG = "mask sums to zero: no patch is scored (the loss would be 0/0)"


def check_mask_errors(wait: bool = True) -> None:
    """Raise the ValueError of an earlier CUDA call whose mask summed to zero.

    Args:
        wait: wait for pending results (a host sync); False checks only those already complete.
    """
    bad = False
    keep = []
    for event, host in _pending:
        if wait or event.query():
            event.synchronize()
            bad = bad or host.item() == 0.0
        else:
            keep.append((event, host))
    _pending[:] = keep
    if bad:
        raise ValueError(ZERO_MASK_MSG + " (raised late: on CUDA the check does not block the step)")


def _flag_zero_weight(wsum: torch.Tensor) -> None:
    """Raise at once on the CPU; on CUDA queue a non-blocking check (see the module docstring)."""
    if wsum.device.type != "cuda":
        if wsum.item() == 0.0:
            raise ValueError(ZERO_MASK_MSG)
        return
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return
    host = torch.empty(1, dtype=torch.float32, pin_memory=True)
    host.copy_(wsum, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((event, host))


def _launch_args(pred, imgs, gw, patch_size, c, norm, has_mask, has_ids):
    n, rows, d = pred.shape
    block_r, block_d, warps = tiling(d)
    total = n * rows
    grid = triton.cdiv(total, block_r)
    ints = (total, rows, imgs.shape[2] // patch_size * gw, gw, *pred.stride(), *imgs.stride())
    meta = dict(P=patch_size, C=c, NORM=norm, HAS_MASK=has_mask, HAS_IDS=has_ids, BLOCK_R=block_r, BLOCK_D=block_d)
    return grid, ints, meta, warps


def _launch_fwd(pred, imgs, weights, ids, patch_size, c, gw, norm):
    """Launch the forward kernels; return (loss [1] fp32, Σ w [1] fp32)."""
    grid, ints, meta, warps = _launch_args(pred, imgs, gw, patch_size, c, norm, weights is not None, ids is not None)
    part = empty(2, grid, dtype=torch.float32, device=pred.device)  # [2, programs]
    total, rows, num_patches, gw_ = ints[:4]
    _fwd_kernel[(grid,)](
        pred, imgs, pred if weights is None else weights, pred if ids is None else ids, part,
        total, grid, rows, num_patches, gw_, *ints[4:], **meta, num_warps=warps,
    )  # fmt: skip
    loss = empty(1, dtype=torch.float32, device=pred.device)
    wsum = empty(1, dtype=torch.float32, device=pred.device)
    _fwd_reduce_kernel[(1,)](part, loss, wsum, grid, BLOCK=REDUCE_BLOCK, num_warps=4)
    return loss, wsum


def _launch_bwd(grad, pred, imgs, weights, ids, wsum, patch_size, c, gw, norm):
    """Launch the backward kernel; return dpred, contiguous [N, R, D] in pred's dtype."""
    grid, ints, meta, warps = _launch_args(pred, imgs, gw, patch_size, c, norm, weights is not None, ids is not None)
    dpred = empty(*pred.shape, dtype=pred.dtype, device=pred.device)  # [N, R, D]
    grad = grad.detach().to(torch.float32).reshape(1)
    _bwd_kernel[(grid,)](
        pred, imgs, pred if weights is None else weights, pred if ids is None else ids, grad, wsum, dpred,
        *ints, **meta, num_warps=warps,
    )  # fmt: skip
    return dpred


class MaskedMSEFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, pred, imgs, weights, ids, patch_size, c, gw, norm):
        loss, wsum = _launch_fwd(pred, imgs, weights, ids, patch_size, c, gw, norm)
        ctx.save_for_backward(pred, imgs, weights, ids, wsum)
        ctx.meta = (patch_size, c, gw, norm)
        if weights is not None:
            _flag_zero_weight(wsum)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        pred, imgs, weights, ids, wsum = ctx.saved_tensors
        dpred = None
        if ctx.needs_input_grad[0]:
            if pred.is_cuda and _pending:
                check_mask_errors(wait=False)
            dpred = _launch_bwd(grad, pred, imgs, weights, ids, wsum, *ctx.meta)
        return dpred, None, None, None, None, None, None, None


def unsupported(pred, imgs, *args) -> str | None:
    """Why :func:`masked_mse` does not take arguments the eager loss accepts
    (a float64 tensor, images that require grad), or None."""
    reason = unsupported_float(pred=pred, imgs=imgs)
    if reason is None and isinstance(imgs, torch.Tensor) and imgs.requires_grad and torch.is_grad_enabled():
        reason = "imgs requires grad; the kernel gives the images no gradient"
    return reason


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
            None scores every row. A mask summing to zero raises a ValueError (on CUDA, late: see
            :func:`check_mask_errors`).
        patch_size: p.
        norm_pix_loss: normalize each target patch by its mean and unbiased variance (+1e-6).
        ids: optional ``[N, R]`` int64 patch indices in ``[0, L)`` (raster order of the patch grid): row r of pred
            predicts patch ``ids[n, r]``. With the masked patches of a 0/1 mask (and no ``mask``) this is the loss
            of the full prediction, without the decoder ever predicting the visible patches.

    Returns:
        A float32 scalar: ``Σ mask · mean_j (pred − target)² / Σ mask``.
    """
    n, num_rows, _, c, gh, gw = _check(pred, imgs, patch_size, norm_pix_loss)
    if ids is None and num_rows != gh * gw:
        raise ValueError(f"pred has {num_rows} patches but imgs holds {gh}x{gw} = {gh * gw} of size {patch_size}")
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise TypeError(f"ids must be an int64 tensor [N, R], got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.shape != (n, num_rows) or num_rows == 0:
            raise ValueError(f"ids must have shape [N, R] = [{n}, {num_rows}] with R ≥ 1, got {list(ids.shape)}")
        check_same_device(pred=pred, ids=ids)
        if not ids.is_cuda and ((ids < 0).any() or (ids >= gh * gw).any()):
            raise ValueError(f"ids must lie in [0, {gh * gw}) (the patches of a {gh}x{gw} grid)")
        ids = ids.contiguous()
    weights = None
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
        weights = mask.to(torch.float32).contiguous()  # [N, R]
    if pred.is_cuda and _pending:
        check_mask_errors(wait=False)
    return MaskedMSEFunction.apply(pred, imgs, weights, ids, patch_size, c, gw, norm_pix_loss).view(())  # []
