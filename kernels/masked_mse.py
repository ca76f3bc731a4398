"""MAE's loss read straight from the image: masked rows only, per-patch normalization in registers; the gradient
of pred formed in the same pass.

Math (names as in the code). ``pred [N, R, D]`` with ``D = P·P·C`` in (i, j, c) order, ``imgs [N, C, H, W]``,
grid ``GH × GW`` patches (``L = GH·GW``). Row ``(n, r)`` scores patch ``l = r`` (R = L) or, given ``ids``,
``l = ids[n, r]``, with weight ``w = mask[n, r]`` (1 when there is no mask)::

    t_q     = imgs[n, c, hh·P + i, ww·P + j]            hh = l // GW, ww = l % GW
    target  = t                                          (norm_pix_loss off)
    target  = (t − mean) · rstd                          mean = Σ t / D, var = Σ (t − mean)² / (D − 1),
                                                         rstd = 1 / sqrt(var + 1e-6)   (unbiased, as the original)
    err     = pred − target;   row_loss = Σ err² / D
    loss    = Σ w · row_loss / Σ w
    dpred   = g · d0,   d0 = 2 · err · w / (D · Σ w)     (zeros where w = 0)

Forward. ``Σ w`` comes first: with a mask, ``_fwd_wsum_kernel`` writes the sums of blocks of WSUM_BLOCK weights
(padded with zeros to WPARTS entries), and every later program adds those WPARTS partials in the same fixed order,
so each gets the same bits; without one, ``Σ w`` is the row count. ``_fwd_kernel`` then handles a tile of BLOCK_R
rows × BLOCK_I patch rows i × BLOCK_M lanes m per program (powers of two ≥ P and P·C, the lanes past them masked).
Rows with ``w = 0`` are masked out of every load, so no byte of an unmasked patch's pred or pixels moves. The lanes
follow pred's order, m = j·C + c, so pred is read along each patch row's P·C contiguous elements (16-byte vectors
where the row is 16-byte aligned: P = 16) and d0 written the same way. The pixels of a patch row lie in C runs of
P along image rows: they are read as BLOCK_S lanes c·BLOCK_I + j (16-byte vectors for P = 16) and moved to pred's
order by a gather along that short axis (``tl.gather``: 32 warp shuffles per thread at P = 16, C = 3, where one
along the whole 768-element row compiles to ~1000; none for C = 1). Each program writes its partial ``Σ w·row_loss``
(fp32) and, when pred needs a gradient, ``d0`` of its rows in pred's dtype (every row, zeros where ``w = 0``);
``_fwd_reduce_kernel`` (one program) sums the partials in a fixed order and writes the loss: deterministic, no
atomics. Accumulation is fp32 whatever the input dtypes.

Backward: ``dpred = g · d0`` in place in the buffer the forward wrote, which the backward hands out. The upstream
gradient ``g`` is known only on the device, so ``_bwd_scale_kernel`` reads it there: for ``g = 1``
(``loss.backward()`` of an unscaled loss) every program exits at once and nothing moves; otherwise it scales the
rows with ``w ≠ 0`` (the others hold exact zeros and stay, unless g is not finite, when they become 0·g = NaN as
in the reference). Under torch.compile (:func:`form_gradient`) the forward forms nothing and saves pred and the
image, and ``_bwd_kernel`` recomputes the rows and writes ``g · d0`` (d0 rounded to pred's dtype first, so both
ways give the same bits): Inductor copies a saved tensor that the backward mutates, a read and a write of d0 more
than the recomputation's extra read of pred and pixels.

Bytes at ViT-B/16, batch 256, bf16, mask 0.75 (147 of 196 rows scored, D = 768): the scored rows of pred and their
pixels are 57.8 MB each, dpred 77.1 MB (the rows path: 57.8 MB), the mask 0.2 MB. Recomputing in the backward
moves 115.8 + 192.9 = 308.7 MB (as under torch.compile); forming d0 moves 193.1 MB for g = 1 (the minimum: what
the forward must read and the gradient written once) and 308.9 MB otherwise (the scale pass reads and writes the
scored rows: 115.6 MB), which is also the least any scheme moves when g is unknown until the backward (in place
under Inductor it would move 347 MB for g = 1). Memory: d0 (pred's size and dtype) lives from the forward to the
backward, and pred is no longer saved for the backward, so it is freed there unless the caller keeps it (MAE's
training loop does not).

Semantics and constraints:
- Masks may hold any weights (bool, int or float; fractional weights give the reference's weighted mean). Rows
  with ``w = 0`` are never read, so a NaN in an unscored row of pred does not reach the loss (the reference's
  ``0 · NaN`` would).
- ``Σ w = 0`` (an all-zero mask) is an error, as is an ``ids`` entry outside ``[0, L)``; the policy of
  :mod:`fastmae.kernels._common`: CPU tensors are checked on the host (a ValueError at once); on CUDA the loss is
  NaN (the reference's 0/0; a bad index never addresses memory, its row's loss and gradient are NaN) and the
  forward kernels set a flag that ``fastmae.kernels.check_errors()`` reports.
- In eager mode the gradient buffer is scaled in place and handed out by the backward, so the graph can be
  backpropagated once per forward (a second backward, with ``retain_graph=True``, raises a RuntimeError).
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
def _wsum(WPART, total_rows, HAS_MASK: tl.constexpr, WPARTS: tl.constexpr):
    """Σ w: the WPARTS block sums of the mask added in one fixed order (the same bits in every program), or the
    row count without a mask."""
    if HAS_MASK:
        wsum = tl.sum(tl.load(WPART + tl.arange(0, WPARTS)), axis=0)
    else:
        wsum = total_rows * 1.0
    return wsum


@triton.jit
def _rows_err(
    PRED, IMGS, MASK, IDS, pid, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
    P: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Load BLOCK_R rows (live ones only) and return (rows, in_range, bad, w, err, offs, ok): err
    [BLOCK_R, BLOCK_I, BLOCK_M] in pred's order (patch row i, element m = j·C + c of it), offs = i·P·C + m and ok
    its lanes in the patch."""
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
    live = (valid & (w != 0.0))[:, None, None]
    hh = patch // GW
    ww = patch % GW

    i = tl.arange(0, BLOCK_I)[:, None]  # [BLOCK_I, 1]: the patch row
    m = tl.arange(0, BLOCK_M)[None, :]  # [1, BLOCK_M]: pred's element j·C + c of the patch row
    offs = i * (P * C) + m
    ok = (i < P) & (m < P * C)
    ld = live & ok[None, :, :]
    pred = tl.load(
        PRED + n[:, None, None] * s_pn + r[:, None, None] * s_pr + offs[None, :, :] * s_pd, mask=ld, other=0.0
    )

    s = tl.arange(0, BLOCK_S)[None, :]  # [1, BLOCK_S]: the pixels' lane c·BLOCK_I + j, runs along image rows
    c_s = s // BLOCK_I
    j_s = s % BLOCK_I
    pix = (
        IMGS
        + n[:, None, None] * s_in
        + (c_s * s_ic + i * s_ih)[None, :, :]
        + (hh[:, None, None] * P) * s_ih
        + (ww[:, None, None] * P + j_s[None, :, :]) * s_iw
    )
    t = tl.load(pix, mask=live & ((i < P) & (c_s < C) & (j_s < P))[None, :, :], other=0.0)
    if C > 1:  # to pred's order within each patch row: element m = j·C + c is the pixel lane c·BLOCK_I + j
        src = tl.where(m < P * C, (m % C) * BLOCK_I + m // C, 0)
        t = tl.gather(t, tl.broadcast_to(src[None, :, :], [BLOCK_R, BLOCK_I, BLOCK_M]), axis=2)
        t = tl.where(ld, t, 0.0)
    t = t.to(tl.float32)  # [BLOCK_R, BLOCK_I, BLOCK_M]
    if NORM:
        mean = tl.sum(tl.sum(t, axis=2), axis=1) / D
        diff = tl.where(ld, t - mean[:, None, None], 0.0)
        var = tl.sum(tl.sum(diff * diff, axis=2), axis=1) / (D - 1)
        rstd = 1.0 / tl.sqrt_rn(var + 1.0e-6)
        t = diff * rstd[:, None, None]
    err = tl.where(ld, pred.to(tl.float32) - t, 0.0)
    return rows64, in_range, bad, w, err, offs, ok


@triton.jit
def _d0(err, w, bad, WPART, total_rows, D: tl.constexpr, HAS_MASK: tl.constexpr, WPARTS: tl.constexpr):
    """d0 = 2 · err · w / (D · Σ w) of the rows (fp32), NaN rows for bad indices."""
    wsum = _wsum(WPART, total_rows, HAS_MASK, WPARTS)
    coef = (2.0 / (D * wsum)) * w  # [BLOCK_R]
    coef = tl.where(bad, float("nan"), coef)
    return coef[:, None, None] * err


@triton.jit
def _fwd_wsum_kernel(MASK, WPART, total_rows, span, BLOCK: tl.constexpr):
    """WPART[pid] = Σ of the weights of rows [pid·span, (pid+1)·span) (zero past the last row), fixed order."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, span, BLOCK):
        rows = tl.program_id(0) * span + start + tl.arange(0, BLOCK)
        acc += tl.load(MASK + rows, mask=rows < total_rows, other=0.0)
    tl.store(WPART + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _fwd_kernel(
    PRED, IMGS, MASK, IDS, WPART, PART, DPRED, ERR, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
    P: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr,
    GRAD: tl.constexpr, WPARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """PART[pid] = Σ w·row_loss over this program's rows; with GRAD, DPRED[n, r] = d0, contiguous [N, R, D], every
    row written; ERR[0] = 1 on an index outside [0, L)."""
    D = P * P * C
    pid = tl.program_id(0)
    rows, in_range, bad, w, err, offs, ok = _rows_err(
        PRED, IMGS, MASK, IDS, pid, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
        P, C, NORM, HAS_MASK, HAS_IDS, BLOCK_R, BLOCK_I, BLOCK_M, BLOCK_S,
    )  # fmt: skip
    if HAS_IDS:
        tl.store(ERR + tl.zeros([BLOCK_R], dtype=tl.int32), 1, mask=bad)
    row_loss = tl.sum(tl.sum(err * err, axis=2), axis=1) / D
    contrib = tl.where(w != 0.0, w * row_loss, 0.0)
    contrib = tl.where(bad, float("nan"), contrib)
    tl.store(PART + pid, tl.sum(contrib, axis=0))
    if GRAD:
        d0 = _d0(err, w, bad, WPART, total_rows, D, HAS_MASK, WPARTS).to(DPRED.dtype.element_ty)
        tl.store(DPRED + rows[:, None, None] * D + offs[None, :, :], d0, mask=in_range[:, None, None] & ok[None, :, :])


@triton.jit
def _fwd_reduce_kernel(
    PART, WPART, LOSS, ERR, total_rows, num_programs, HAS_MASK: tl.constexpr, WPARTS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """LOSS = Σ PART / Σ w: one program, fixed order; ERR[1] = 1 when Σ w = 0."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_programs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(PART + offs, mask=offs < num_programs, other=0.0)
    wsum = _wsum(WPART, total_rows, HAS_MASK, WPARTS)
    tl.store(LOSS, tl.sum(acc, axis=0) / wsum)
    tl.store(ERR + 1, 1, mask=wsum == 0.0)


@triton.jit
def _bwd_kernel(
    PRED, IMGS, MASK, IDS, WPART, GRAD, DPRED, total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
    P: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_MASK: tl.constexpr, HAS_IDS: tl.constexpr,
    WPARTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """The gradient recomputed: DPRED[n, r] = g · d0, contiguous [N, R, D], every row written; d0 rounded to pred's
    dtype first, so the result is bitwise that of the forward-formed d0 scaled by _bwd_scale_kernel."""
    D = P * P * C
    rows, in_range, bad, w, err, offs, ok = _rows_err(
        PRED, IMGS, MASK, IDS, tl.program_id(0), total_rows, R, L, GW, s_pn, s_pr, s_pd, s_in, s_ic, s_ih, s_iw,
        P, C, NORM, HAS_MASK, HAS_IDS, BLOCK_R, BLOCK_I, BLOCK_M, BLOCK_S,
    )  # fmt: skip
    d0 = _d0(err, w, bad, WPART, total_rows, D, HAS_MASK, WPARTS).to(DPRED.dtype.element_ty)
    d = (d0.to(tl.float32) * tl.load(GRAD)).to(DPRED.dtype.element_ty)
    tl.store(DPRED + rows[:, None, None] * D + offs[None, :, :], d, mask=in_range[:, None, None] & ok[None, :, :])


@triton.jit
def _bwd_scale_kernel(
    GRAD, MASK, DPRED, total_rows, num_blocks, D: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """DPRED *= g in place, contiguous [N·R, D], skipped on the device when g = 1; rows with w = 0 (exact zeros, or
    NaN for a bad index) are left as they are unless g is not finite."""
    g = tl.load(GRAD)
    if g != 1.0:
        finite = tl.abs(g) < float("inf")  # false for ±inf and NaN
        k = tl.arange(0, BLOCK_D)
        for blk in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
            rows = (blk * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
            touch = rows < total_rows
            if HAS_MASK:
                w = tl.load(MASK + rows, mask=touch, other=0.0)
                touch = touch & ((w != 0.0) | (finite == 0))
            ptr = DPRED + rows[:, None] * D + k[None, :]
            ok = touch[:, None] & (k < D)[None, :]
            d = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptr, (d * g).to(DPRED.dtype.element_ty), mask=ok)


# Tuning: one tile of about 4096 elements per program (BLOCK_R rows of BLOCK_I·BLOCK_M lanes in the forward, of
# BLOCK_D in the backward; at most 16 rows), 8 warps for the large tiles; chosen from P and C alone (no autotuning,
# so the reduction order is the same in every process). At P = 16, C = 3 the forward holds 16 elements of each
# operand per thread (63 registers on sm_90, 4 KB of shared memory for the layout changes around the gather). Σ w:
# each partial sums a span of WSUM_BLOCK weights (4 warps: 8 per thread), doubled until at most MAX_WPARTS
# partials; at least MIN_WPARTS (the others zero), so that small masks share one compiled kernel. The final loss
# sum runs in one program over REDUCE_BLOCK lanes. The backward's scale pass loops over the row tiles with at most
# BWD_PROGRAMS programs (a few per SM on any GPU), so that for g = 1 only that many programs start and exit.
REDUCE_BLOCK = 1024
WSUM_BLOCK, MIN_WPARTS, MAX_WPARTS = 1024, 16, 1024
BWD_PROGRAMS = 1024


def tiling(p: int, c: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_I, BLOCK_M, BLOCK_S, num_warps) of the forward for p×p×c patches: BLOCK_R rows of BLOCK_I
    patch rows of BLOCK_M elements of pred (BLOCK_S pixel lanes, c runs of BLOCK_I), a ~4096-element tile."""
    block_i, block_m = triton.next_power_of_2(p), triton.next_power_of_2(p * c)
    block_s = block_m if c == 1 else triton.next_power_of_2(c * block_i)
    lanes = block_i * max(block_m, block_s)
    block_r = max(1, min(16, 4096 // lanes))
    return block_r, block_i, block_m, block_s, (8 if block_r * lanes >= 4096 else 4)


def row_tiling(d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) of the backward for rows of d elements: a ~4096-element tile."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 4096 // block_d))
    return block_r, block_d, (8 if block_r * block_d >= 4096 else 4)


def wsum_blocks(total_rows: int) -> tuple[int, int]:
    """(the span of weights each Σ w partial sums, the number of partials WPARTS: a power of two) for a mask of
    total_rows weights."""
    span = WSUM_BLOCK
    while triton.cdiv(total_rows, span) > MAX_WPARTS:
        span *= 2
    return span, max(MIN_WPARTS, triton.next_power_of_2(triton.cdiv(total_rows, span)))


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
    """(programs, num_warps, the row arguments R, L, GW and strides, the tile constexprs) of a forward launch."""
    n, rows, _ = pred.shape
    block_r, block_i, block_m, block_s, warps = tiling(patch_size, imgs.shape[1])
    row_args = (rows, imgs.shape[2] // patch_size * gw, gw, *pred.stride(), *imgs.stride())
    tiles = {"BLOCK_R": block_r, "BLOCK_I": block_i, "BLOCK_M": block_m, "BLOCK_S": block_s}
    return triton.cdiv(n * rows, block_r), warps, row_args, tiles


def _launch_wsum(weights: torch.Tensor | None, total: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the Σ w partials ``[WPARTS]``, WPARTS) of a mask of ``total`` weights; without one, ``like`` stands in."""
    span, wparts = wsum_blocks(total)
    if weights is None:
        return like, wparts
    wpart = empty(wparts, dtype=torch.float32, device=weights.device)  # [WPARTS]
    args = (weights, wpart, total, span)
    if not _INTERPRETED:
        wrap_triton(_fwd_wsum_kernel)[(wparts,)](*args, BLOCK=WSUM_BLOCK, num_warps=4)
    elif not launch_skipped(*args):
        _fwd_wsum_kernel[(wparts,)](*args, BLOCK=WSUM_BLOCK)
    return wpart, wparts


def _launch_fwd(
    pred: torch.Tensor, imgs: torch.Tensor, weights: torch.Tensor | None, ids: torch.Tensor | None, err: torch.Tensor,
    patch_size: int, c: int, gw: int, norm: bool, form: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """loss ``[1]`` (fp32) and, with ``form``, d0 (dpred for an upstream gradient of 1), contiguous ``[N, R, D]``
    in pred's dtype (else an empty placeholder); ``err[0]`` set on an index outside [0, L), ``err[1]`` on Σ w = 0."""
    total = pred.shape[0] * pred.shape[1]
    wpart, wparts = _launch_wsum(weights, total, pred)
    progs, warps, row_args, tiles = _plan(pred, imgs, patch_size, gw)
    flags = dict(HAS_MASK=weights is not None, WPARTS=wparts)
    consts = dict(P=patch_size, C=c, NORM=norm, HAS_IDS=ids is not None, GRAD=form, **flags, **tiles)
    part = empty(progs, dtype=torch.float32, device=pred.device)  # [programs]
    d0 = empty(*(pred.shape if form else (0,)), dtype=pred.dtype, device=pred.device)  # [N, R, D]
    mask_, ids_ = pred if weights is None else weights, pred if ids is None else ids
    args = (pred, imgs, mask_, ids_, wpart, part, d0 if form else pred, err, total, *row_args)
    if not _INTERPRETED:
        wrap_triton(_fwd_kernel)[(progs,)](*args, **consts, num_warps=warps)
    elif not launch_skipped(*args):
        _fwd_kernel[(progs,)](*args, **consts)
    loss = empty(1, dtype=torch.float32, device=pred.device)
    args = (part, wpart, loss, err, total, progs)
    if not _INTERPRETED:
        wrap_triton(_fwd_reduce_kernel)[(1,)](*args, **flags, BLOCK=REDUCE_BLOCK, num_warps=4)
    elif not launch_skipped(*args):
        _fwd_reduce_kernel[(1,)](*args, **flags, BLOCK=REDUCE_BLOCK)
    return loss, d0


def _launch_bwd(
    grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, weights: torch.Tensor | None,
    ids: torch.Tensor | None, patch_size: int, c: int, gw: int, norm: bool,
) -> torch.Tensor:  # fmt: skip
    """dpred, contiguous ``[N, R, D]`` in pred's dtype, recomputed from pred and the image for the upstream gradient
    ``grad [1]``."""
    total = pred.shape[0] * pred.shape[1]
    wpart, wparts = _launch_wsum(weights, total, pred)
    progs, warps, row_args, tiles = _plan(pred, imgs, patch_size, gw)
    consts = dict(P=patch_size, C=c, NORM=norm, HAS_MASK=weights is not None, HAS_IDS=ids is not None)
    dpred = empty(*pred.shape, dtype=pred.dtype, device=pred.device)  # [N, R, D]
    mask_, ids_ = pred if weights is None else weights, pred if ids is None else ids
    args = (pred, imgs, mask_, ids_, wpart, grad.to(torch.float32), dpred, total, *row_args)
    if not _INTERPRETED:
        wrap_triton(_bwd_kernel)[(progs,)](*args, **consts, WPARTS=wparts, **tiles, num_warps=warps)
    elif not launch_skipped(*args):
        _bwd_kernel[(progs,)](*args, **consts, WPARTS=wparts, **tiles)
    return dpred


def _launch_bwd_scale(grad: torch.Tensor, dpred: torch.Tensor, weights: torch.Tensor | None) -> None:
    """dpred ``*=`` the upstream gradient ``grad [1]``, in place (nothing moves when it is 1)."""
    total, d = dpred.shape[0] * dpred.shape[1], dpred.shape[2]
    block_r, block_d, warps = row_tiling(d)
    blocks = triton.cdiv(total, block_r)
    consts = dict(D=d, HAS_MASK=weights is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    args = (grad.to(torch.float32), dpred if weights is None else weights, dpred, total, blocks)
    grid = (min(blocks, BWD_PROGRAMS),)
    if not _INTERPRETED:
        wrap_triton(_bwd_scale_kernel)[grid](*args, **consts, num_warps=warps)
    elif not launch_skipped(*args):
        _bwd_scale_kernel[grid](*args, **consts)


def form_gradient() -> bool:
    """Whether the forward forms the gradient (d0) for the backward to scale in place: in eager mode. Under
    torch.compile the backward recomputes it instead, as Inductor copies a saved tensor that the backward mutates
    (a read and a write of d0 more than recomputing costs)."""
    return not torch.compiler.is_compiling()


class MaskedMSEFunction(torch.autograd.Function):
    """Autograd of the fused loss (a ``[1]`` tensor): the gradient of pred only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, pred, imgs, weights, ids, patch_size, c, gw, norm, form):
        err = error_flags("masked_mse", pred.device)
        loss, d0 = masked_mse_fwd(pred, imgs, weights, ids, err, patch_size, c, gw, norm, form)
        if form:
            ctx.save_for_backward(d0, weights)
        else:
            ctx.save_for_backward(pred, imgs, weights, ids)
        ctx.meta, ctx.formed, ctx.spent = (patch_size, c, gw, norm), form, False
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        if not ctx.formed:
            pred, imgs, weights, ids = ctx.saved_tensors
            return masked_mse_bwd(grad, pred, imgs, weights, ids, *ctx.meta), *(None,) * 8
        if ctx.spent:
            raise RuntimeError(
                "masked_mse: backward through the same loss twice; its gradient is formed in the forward and scaled "
                "in place by the first backward (run the forward again instead of retain_graph=True)"
            )
        ctx.spent = True
        dpred, weights = ctx.saved_tensors
        masked_mse_bwd_scale(grad, dpred, weights)
        return dpred, *(None,) * 8


# Torch integration (see fastmae.kernels._common.register_op): the forward op writes the error flags it is given
# (mutates_args) and returns the loss with d0, which MaskedMSEFunction saves with the mask (pred and imgs are not
# needed again); the scale op scales d0 in place (mutates_args), and the Function returns it. Under torch.compile
# (form_gradient) the forward saves pred, imgs, the mask and ids instead, and the backward op recomputes.
masked_mse_fwd = register_op("fastmae::masked_mse_fwd", mutates_args=("err",))(_launch_fwd)
masked_mse_bwd = register_op("fastmae::masked_mse_bwd")(_launch_bwd)
masked_mse_bwd_scale = register_op("fastmae::masked_mse_bwd_scale", mutates_args=("dpred",))(_launch_bwd_scale)


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
    form = pred.requires_grad and torch.is_grad_enabled() and form_gradient()
    loss = MaskedMSEFunction.apply(pred, imgs, weights, ids, patch_size, c, gw, norm_pix_loss, form)  # [1]
    loss = loss.view(())  # []
    debug_check()
    return loss
