"""Patchify + visible-patch gather + patch embedding in one gather-GEMM (forward and backward).

Names: ``imgs [N, C, H, W]``, patch size ``P``, grid ``GH x GW`` (``L = GH·GW``), ``ids_keep [N, K]``, conv
``weight [D, C, P, P]`` viewed as ``W [D, R]`` with ``R = C·P·P`` in (c, i, j) order, ``bias [D]``,
``pos_embed [1, 1+L, D]``, ``cls_token [1, 1, D]``. For kept row ``m = n·K + k`` with patch ``l = ids_keep[n, k]``
at grid cell ``(l // GW, l % GW)``, the im2col row is ``A[m, r] = imgs[n, c, (l // GW)·P + i, (l % GW)·P + j]``
for ``r = c·P·P + i·P + j``.

Forward (``_fwd_kernel``), output ``out [N, 1+K, D]``, flat rows ``n·(1+K) + t``::

    out[n, 0]   = cls_token + pos_embed[0]
    out[n, 1+k] = A[n·K+k] · Wᵀ + bias + pos_embed[1 + ids_keep[n, k]]

Only the kept patches are read from the image (im2col on the fly with the image's strides, so channels_last and
other non-contiguous inputs need no copy); the masked 3/4 of the image is never touched and no ``[N, L, D]``
tensor exists. One launch writes every row: the cls rows are rows of the same tiles whose A operand is masked to
zero. The fp32 accumulator starts from ``bias + pos_embed[1 + l]`` (``cls_token + pos_embed[0]`` on cls rows) and
the output is rounded once. W is read as a ``[D, RP]`` matrix in the compute dtype, zero-padded to a whole number
of reduction steps (``_fwd_weight_kernel``, once per call, when the weight is not already that: under autocast,
at P = 14, for other strides). Pixels are gathered in (c, i, j) order; with P even and unit pixel stride each
pair (j, j+1) is one 4-byte (bf16) or 8-byte (fp32) load, the widest a P = 14 patch row allows, as it starts at a
multiple of 28 bytes. The programs of the first D tile also store each kept row's image offset (``rows``, -ALIGN
for a bad index) for the backward.

Backward, from ``dout [N, 1+K, D]`` (``G[m] = dout[n, 1+k]``)::

    dW[d, r]   = Σ_m G[m, d] · A[m, r]     (_bwd_dw_kernel: A re-gathered from imgs at the stored row offsets)
    dbias[d]   = Σ_m G[m, d]               (same kernel, from the G tiles it loads anyway)
    dcls[d]    = Σ_n dout[n, 0, d]          (same kernel, the cls rows shared out among its programs)
    dimgs[n, :, patch l] = Σ_{k: ids_keep[n,k] = l} G[n·K+k] · W    (_bwd_dimg_kernel), zero on unkept patches

Determinism, no float atomics anywhere: ``_bwd_dw_kernel`` splits the m reduction into ``SPLIT`` contiguous row
ranges (chosen from the shapes only), each program writing fp32 partials to its split's workspace row: its dW
tile, and its share of dbias (the row tiles it owns, round robin over the r-tiles, so each row is summed once)
and of dcls (its part of the split's cls rows). ``_bwd_reduce_kernel`` sums the partials in a fixed order and
writes dW, dbias and dcls in their parameters' dtypes. ``_bwd_dimg_kernel`` runs over all ``N·L`` patches of the
image, so it writes every pixel exactly once: for each patch it sums, in sorted-k order, the rows that kept it
(``torch.sort`` of ``ids_keep`` with ``searchsorted`` gives each patch's start and count; duplicates in
``ids_keep`` add up as in the eager op).

dtypes: fp32, fp16 and bf16. Without autocast ``imgs``, ``weight`` and ``bias`` share one dtype (the conv's
rule); ``pos_embed`` and ``cls_token`` may be any of the three. The GEMM operands are cast in registers to the
compute dtype ``CT`` (``imgs.dtype``, or the autocast dtype under ``torch.autocast``, as the conv would be): no
cast copy of the image is made (the weight is cast once per call). The output dtype is the eager op's:
``promote(CT, pos_embed.dtype, cls_token.dtype)``; under autocast with MAE's fp32 ``pos_embed`` that is fp32,
exactly as ``conv(bf16) + pos_embed(fp32)`` is in the original. fp32 GEMMs use TF32 when
``torch.backends.cudnn.allow_tf32`` is set, like the conv they replace. Gradients come back in each input's dtype.

Constraints: H and W multiples of P. ``pos_embed`` is MAE's fixed sin-cos table: its gradient is not computed, and
a ``pos_embed`` that requires grad (with grad mode on) is refused with a ValueError; use
:func:`fastmae.reference.patch_embed` for a learned one. ``ids_keep`` must hold indices in ``[0, L)``: checked on the
host for CPU tensors; on CUDA (the policy of :mod:`fastmae.kernels._common`) an index outside never addresses
memory, its output row is NaN, ``_fwd_kernel`` flags it, and the backward leaves it out of dW.
"""

from __future__ import annotations

import math
import os

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
from fastmae.kernels._patch_embed_tiles import mma, pixel_offsets, round_to_ct

# Compute dtype codes passed to the kernels as the constexpr CT (see mma).
CT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _fwd_kernel(
    IMG, IDS, W, B, POS, CLS, OUT, ROWS, ERR,
    NROWS, K, D, C, RP, L,
    s_in, s_ic, s_ih, s_iw,
    s_idn, s_idk,
    s_wd, s_b, s_pl, s_pd, s_cd,
    s_on, s_ot, s_od,
    P: tl.constexpr, GW: tl.constexpr, ALIGN: tl.constexpr, CT: tl.constexpr, ALLOW_TF32: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M tokens, BLOCK_N channels] tile of out; token rows are flat n·(1+K) + t, t = 0 the cls row.
    W is the weight matrix [D, RP] in the compute dtype, zero in columns R..RP (RP a multiple of BLOCK_K).
    ERR[0] = 1 when a row's patch index is outside [0, L). With WRITE_ROWS, the programs of the first D tile write
    ROWS[n·K + k] = the image offset of the patch of kept row (n, k), -ALIGN for a bad index (for _bwd_dw_kernel;
    every offset is a multiple of ALIGN, see _offset_align)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < NROWS
    col_ok = cols < D
    n = (rows // (K + 1)).to(tl.int64)
    t = rows % (K + 1)
    lp = tl.load(IDS + n * s_idn + (t - 1) * s_idk, mask=row_ok & (t > 0), other=0)
    l_ok = (lp >= 0) & (lp < L)
    is_patch = row_ok & (t > 0) & l_ok
    tl.store(ERR + tl.zeros([BLOCK_M], dtype=tl.int32), 1, mask=row_ok & (t > 0) & (l_ok == 0))
    cell = tl.where(l_ok, lp, 0).to(tl.int32)  # the patch's grid cell, (cell // GW, cell % GW)
    a_row = n * s_in + (cell // GW) * (P * s_ih) + (cell % GW) * (P * s_iw)  # [BLOCK_M] image offset of the patch
    if WRITE_ROWS:
        tl.store(ROWS + n * K + t - 1, tl.where(l_ok, a_row, -ALIGN), mask=row_ok & (t > 0) & (pid_n == 0))
    # The accumulator starts from what the epilogue adds (bias + positions, or the cls token on cls rows), so no
    # [BLOCK_M, BLOCK_N] tile of positions is held in registers next to the finished accumulator.
    bias = round_to_ct(tl.load(B + cols * s_b, mask=col_ok, other=0.0).to(tl.float32), CT)
    cls = tl.load(CLS + cols * s_cd, mask=col_ok, other=0.0).to(tl.float32)
    pos = tl.load(
        POS + tl.where(t > 0, 1 + lp, 0)[:, None] * s_pl + cols[None, :] * s_pd,
        mask=(row_ok & ((t == 0) | l_ok))[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_M, BLOCK_N]
    acc = tl.where((t == 0)[:, None], cls[None, :], bias[None, :]) + pos
    for k0 in range(0, RP, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)
        c, r_off = pixel_offsets(r, s_ic, s_ih, s_iw, P)
        a = tl.load(
            IMG + a_row[:, None] + r_off[None, :], mask=is_patch[:, None] & (c < C)[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(W + r[:, None] + cols[None, :] * s_wd, mask=col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = mma(a, w, acc, CT, ALLOW_TF32)
    val = tl.where(((t == 0) | l_ok)[:, None], acc, float("nan"))
    out_ptr = OUT + (n * s_on + t * s_ot)[:, None] + cols[None, :] * s_od
    tl.store(out_ptr, val.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fwd_weight_kernel(
    W, WM, D, C, RP,
    s_wd, s_wc, s_wi, s_wj,
    P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """WM [D, RP] = the weight [D, C, P, P] as a matrix in (c, i, j) order, in WM's dtype, zero in columns R..RP."""
    ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c, r_off = pixel_offsets(rs, s_wc, s_wi, s_wj, P)
    d_ok = ds < D
    w = tl.load(
        W + ds[:, None] * s_wd + r_off[None, :], mask=d_ok[:, None] & (c < C)[None, :], other=0.0
    )  # [BLOCK_D, BLOCK_R]
    tl.store(WM + ds[:, None] * RP + rs[None, :], w.to(WM.dtype.element_ty), mask=d_ok[:, None] & (rs < RP)[None, :])


@triton.jit
def _bwd_dw_kernel(
    IMG, ROWS, G, WS,
    MK, NB, K, D, C, ROWS_PER_SPLIT, RW, WS_STRIDE,
    s_ic, s_ih, s_iw,
    s_gn, s_gt, s_gd,
    P: tl.constexpr, ALIGN: tl.constexpr, CT: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """The partials of one split (program axis 1) for one [BLOCK_D, BLOCK_R] tile of dW, in WS[split]:

    * ``WS[split, d·RW + r]``: dW over the split's kept rows (a row whose ROWS entry is negative, a bad patch
      index, contributes nothing);
    * ``WS[split, D·RW + pid_r·2D + d]``: dbias over the row tiles of the split whose index ≡ pid_r (mod the number
      of r-tiles), so each row is summed once and the r-tile programs share the work;
    * ``WS[split, D·RW + pid_r·2D + D + d]``: dcls over the pid_r-th share of the split's share of the cls rows.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_r = RW // BLOCK_R
    pid_d = pid // num_r
    pid_r = pid % num_r
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    d_ok = ds < D
    c, r_off = pixel_offsets(rs, s_ic, s_ih, s_iw, P)
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    gsum = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, MK)
    # (n, k) of the tile's rows m = n·K + k, advanced by BLOCK_M rows a step without dividing
    n = (m_start + tl.arange(0, BLOCK_M)) // K
    k = (m_start + tl.arange(0, BLOCK_M)) % K
    owner = 0  # the r-tile that adds this row tile to dbias
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < m_end
        a_row = tl.multiple_of(tl.load(ROWS + ms, mask=m_ok, other=-ALIGN), ALIGN)  # [BLOCK_M] patch offsets
        a = tl.load(
            IMG + a_row[:, None] + r_off[None, :], mask=(a_row >= 0)[:, None] & (c < C)[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_R]
        g = tl.load(
            G + (n.to(tl.int64) * s_gn + (k + 1) * s_gt)[:, None] + ds[None, :] * s_gd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        if owner == pid_r:
            gsum += g.to(tl.float32)
        owner = tl.where(owner + 1 == num_r, 0, owner + 1)
        acc = mma(tl.trans(g), a, acc, CT, ALLOW_TF32)
        k += BLOCK_M % K
        n += BLOCK_M // K + (k >= K).to(tl.int32)
        k = tl.where(k >= K, k - K, k)
    ws = WS + split.to(tl.int64) * WS_STRIDE
    tl.store(ws + ds[:, None] * RW + rs[None, :], acc, mask=d_ok[:, None])
    csum = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    per_split = tl.cdiv(NB, tl.num_programs(1))
    per_prog = tl.cdiv(per_split, num_r)
    n_start = tl.minimum(split * per_split + pid_r * per_prog, NB)
    n_end = tl.minimum(tl.minimum(n_start + per_prog, split * per_split + per_split), NB)
    for n0 in range(n_start, n_end, BLOCK_M):
        ns = n0 + tl.arange(0, BLOCK_M)
        csum += tl.load(
            G + ns.to(tl.int64)[:, None] * s_gn + ds[None, :] * s_gd,
            mask=(ns < n_end)[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_D] rows dout[n, 0]
    vec = ws + D * RW + pid_r * 2 * D
    tl.store(vec + ds, tl.sum(gsum, axis=0), mask=d_ok)
    tl.store(vec + D + ds, tl.sum(csum, axis=0), mask=d_ok)


@triton.jit
def _bwd_reduce_kernel(
    WS, DW, DB, DCLS,
    SPLIT, WS_STRIDE, D, R, RW, NUM_R,
    BLOCK: tl.constexpr, NUM_R_P2: tl.constexpr,
):  # fmt: skip
    """dW, dbias and dcls from the partials of _bwd_dw_kernel, summed in split order (and r-tile order)."""
    pid = tl.program_id(0)
    dr = D * RW
    num_dw = tl.cdiv(dr, BLOCK)
    if pid < num_dw:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < dr
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLIT):
            acc += tl.load(WS + s * WS_STRIDE + offs, mask=ok, other=0.0)
        d = offs // RW
        r = offs % RW
        tl.store(DW + tl.minimum(d * R + r, D * R - 1), acc.to(DW.dtype.element_ty), mask=ok & (r < R))
    else:
        v = (pid - num_dw) * BLOCK + tl.arange(0, BLOCK)  # [0, D): dbias, [D, 2D): dcls
        pr = tl.arange(0, NUM_R_P2)
        pr_ok = (pr < NUM_R)[:, None] & (v < 2 * D)[None, :]
        parts = tl.zeros((NUM_R_P2, BLOCK), dtype=tl.float32)
        for s in range(0, SPLIT):
            parts += tl.load(WS + s * WS_STRIDE + dr + pr[:, None] * 2 * D + v[None, :], mask=pr_ok, other=0.0)
        tot = tl.sum(parts, axis=0)
        tl.store(DB + tl.minimum(v, D - 1), tot.to(DB.dtype.element_ty), mask=v < D)
        tl.store(DCLS + tl.maximum(v - D, 0), tot.to(DCLS.dtype.element_ty), mask=(v >= D) & (v < 2 * D))


@triton.jit
def _bwd_dimg_kernel(
    G, W, START, CNT, PERM, DIMG,
    NL, L, D, R, GW,
    s_gn, s_gt, s_gd,
    s_wd,
    s_pn,
    s_xn, s_xc, s_xh, s_xw,
    P: tl.constexpr, CT: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dimgs for BLOCK_M whole patches (flat n·L + l) × BLOCK_R pixels: Σ over the rows that kept each patch. W is
    the weight matrix [D, RP] in the compute dtype, RP a multiple of BLOCK_R."""
    pid = tl.program_id(0)
    num_r = tl.cdiv(R, BLOCK_R)
    pid_m = pid // num_r
    pid_r = pid % num_r
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NL
    n = (rows // L).to(tl.int64)
    lp = rows % L  # patch index l
    start = tl.load(START + rows, mask=row_ok, other=0)
    cnt = tl.load(CNT + rows, mask=row_ok, other=0)
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rs < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for u in range(0, tl.max(cnt, axis=0)):
        has = row_ok & (u < cnt)
        k = tl.load(PERM + n * s_pn + start + u, mask=has, other=0)
        g_row = n * s_gn + (k + 1) * s_gt  # [BLOCK_M]
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            g = tl.load(
                G + g_row[:, None] + ds[None, :] * s_gd, mask=has[:, None] & d_ok[None, :], other=0.0
            )  # [BLOCK_M, BLOCK_D]
            w = tl.load(W + ds[:, None] * s_wd + rs[None, :], mask=d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_R]
            acc = mma(g, w, acc, CT, ALLOW_TF32)
    x_row = n * s_xn + (lp // GW) * (P * s_xh) + (lp % GW) * (P * s_xw)
    _, x_col = pixel_offsets(rs, s_xc, s_xh, s_xw, P)
    tl.store(
        DIMG + x_row[:, None] + x_col[None, :],
        acc.to(DIMG.dtype.element_ty),
        mask=row_ok[:, None] & r_ok[None, :],
    )


# Tuning: tile shapes come from the shapes and dtypes alone (no @triton.autotune), so the reduction order and hence
# the bits do not depend on a timing race; nothing is queried from the GPU.
#
# Tile configs (BLOCK over output rows, BLOCK over output columns, BLOCK over the reduction, num_warps, num_stages)
# of the three GEMMs: forward [tokens × D] over R, dW [D × R] over kept rows, dimgs [patches × R] over D. "small"
# serves small problems (D < 256 or under 1024 kept patches); the ViT shapes (D = 384..1280, batches of 1024+
# tokens) take 128×128 tiles with a 64-deep reduction step when the GEMM's operands are stored in 16 bits, 32-deep
# when one is stored in fp32 (cast in registers each step, which doubles its shared memory). The forward reads the
# weight as a [D, RP] matrix in the compute dtype (_weight_matrix: under autocast the fp32 weight is cast once per
# call, not once per tile and step), so it takes "large16" unless it computes in fp32 (the fp32 image tile, cast
# in registers, fits beside it: 215 registers, 112 KB of shared memory at ViT-B/16 under autocast). With P = 14 a
# patch row is 28 B of bf16 (56 B of fp32) starting at a multiple of 28 B, so the gathered pixels load in 4-byte
# (8-byte) pieces, four times the load instructions of P = 16: "large16_short" is the forward's config there, the
# same tiles by default (on sm_90 184 registers and about 190 instructions a step per warp, 380 issue cycles of 8
# warps beside 512 cycles of MMA); (128, 128, 32, 8, 4) is the alternative a GPU settles (164 registers, R = 588
# padded to 608 instead of 640: 5% less MMA, twice the steps). Forward programs are ordered with the D tiles of one
# row tile adjacent, so the gathered A tile is re-read from L2.
# Each choice a GPU settles is read from the environment at import (BENCHMARKS.md, "Choices to settle on a GPU").
SHORT_K_ENV = "FASTMAE_PATCH_EMBED_SHORT_K"  # the P = 14 forward's reduction step: 64 (default) or 32
DW_PROGRAMS_ENV = "FASTMAE_PATCH_EMBED_DW_PROGRAMS"  # the dW split's target number of programs: 264 (default) or 132


def _env_choice(name: str, default: int, choices: tuple[int, ...]) -> int:
    value = os.environ.get(name, "").strip() or str(default)
    if not value.isdigit() or int(value) not in choices:
        raise ValueError(f"${name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return int(value)


_SHORT_CONFIGS = {64: (128, 128, 64, 8, 3), 32: (128, 128, 32, 8, 4)}
CONFIGS = {
    "small": (32, 32, 32, 4, 2),
    "large16": (128, 128, 64, 8, 3),
    "large16_short": _SHORT_CONFIGS[_env_choice(SHORT_K_ENV, 64, (64, 32))],
    "large32": (128, 128, 32, 8, 3),
}

# The split dW reduction writes one fp32 [D, RW] partial per split (RW: R rounded up to the tile) that the reduce
# kernel reads back, so it takes as few splits as fill the GPU: the most with at most DW_TARGET_PROGRAMS programs
# (two waves of an H100's 132 SMs at one program per SM: 7, 5 and 5 splits at ViT-B, -L and -H, 16.0 to 16.8 MB
# of partials where 11 to 15 splits wrote 33 to 35 MB), each split covering at least DW_MIN_TILES_PER_SPLIT row
# tiles. One wave (132) more than halves the partials again at a worse wave fill; a GPU settles it (BENCHMARKS.md).
# The ordered sum of the splits runs REDUCE_BLOCK elements per program.
DW_TARGET_PROGRAMS = _env_choice(DW_PROGRAMS_ENV, 264, (264, 132))
DW_MIN_TILES_PER_SPLIT = 4
REDUCE_BLOCK = 512
# The weight matrix copy: square tiles of this size.
WEIGHT_BLOCK = 64


def _config_name(d: int, tokens: int, *dtypes: torch.dtype, short_rows: bool = False) -> str:
    """The tile config for embedding width ``d`` and ``tokens`` kept patches, given the dtypes the GEMM's operands
    are stored in; ``short_rows``: the gathered patch rows are not whole 16-byte vectors (the forward at P = 14)."""
    if d >= 256 and tokens >= 1024:
        if torch.float32 in dtypes:
            return "large32"
        return "large16_short" if short_rows else "large16"
    return "small"


def _dw_split(mk: int, tiles: int, block_m: int) -> tuple[int, int]:
    """(number of splits, rows per split) of the dW reduction over ``mk`` rows; depends on the shapes only."""
    mk = max(mk, 1)
    max_split = max(1, mk // (block_m * DW_MIN_TILES_PER_SPLIT))
    split = max(1, min(DW_TARGET_PROGRAMS // tiles, max_split))
    rows_per = triton.cdiv(triton.cdiv(mk, split), block_m) * block_m
    return triton.cdiv(mk, rows_per), rows_per


def _geometry(imgs: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    """(N, C, D, P, GW, L, R) of a call."""
    n, c, h, w = imgs.shape
    d, p = weight.shape[0], weight.shape[-1]
    return n, c, d, p, w // p, (h // p) * (w // p), c * p * p


def _offset_align(imgs: torch.Tensor, p: int) -> int:
    """The largest power of two up to 16 dividing every patch's image offset ``n·s_n + gy·P·s_h + gx·P·s_w``: the
    alignment, in elements, that _bwd_dw_kernel asserts of the offsets it loads from the forward's table."""
    s_n, _, s_h, s_w = imgs.stride()
    g = math.gcd(s_n, p * s_h, p * s_w) or 16
    return min(16, g & -g)


# triton.jit turned the kernels into interpreted functions when this was set at import.
_INTERPRETED = interpreting()


def unsupported(imgs, ids_keep, weight, bias, pos_embed, cls_token) -> str | None:
    """Why :func:`patch_embed` does not take arguments the eager op accepts (a float64 tensor, a pos_embed
    that requires grad), or None."""
    reason = unsupported_float(imgs=imgs, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    if reason is None and isinstance(pos_embed, torch.Tensor) and pos_embed.requires_grad and torch.is_grad_enabled():
        reason = "pos_embed requires grad; the kernel treats it as MAE's fixed sin-cos table"
    return reason


def _check(imgs, ids_keep, weight, bias, pos_embed, cls_token) -> torch.dtype:
    """Raise a clear TypeError/ValueError for arguments the kernels do not take (ids_keep's values: on the host);
    return the GEMM's compute dtype (the autocast dtype under autocast, else imgs.dtype)."""
    for name, t in (("imgs", imgs), ("weight", weight), ("bias", bias), ("pos_embed", pos_embed)):
        check_float(name, t)
    check_float("cls_token", cls_token)
    if not isinstance(ids_keep, torch.Tensor):
        raise TypeError(f"ids_keep must be a torch.Tensor [N, K] of int64, got {type(ids_keep).__name__}")
    if ids_keep.dtype != torch.int64:
        raise TypeError(f"ids_keep must be int64, got {ids_keep.dtype}")
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be 4-D [N, C, H, W], got shape {list(imgs.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be [D, C, p, p], got shape {list(weight.shape)}")
    n, c, h, w = imgs.shape
    d, p = weight.shape[0], weight.shape[-1]
    if weight.shape[1] != c:
        raise ValueError(f"weight has {weight.shape[1]} input channels but imgs has C={c}")
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"imgs' H and W must be positive multiples of the patch size {p}, got {h}x{w}")
    num_patches = (h // p) * (w // p)
    if ids_keep.dim() != 2 or ids_keep.shape[0] != n:
        raise ValueError(f"ids_keep must be [N, K] with N={n}, got shape {list(ids_keep.shape)}")
    if tuple(bias.shape) != (d,):
        raise ValueError(f"bias must be [D] = [{d}], got shape {list(bias.shape)}")
    if tuple(pos_embed.shape) != (1, 1 + num_patches, d):
        raise ValueError(f"pos_embed must be [1, 1+L, D] = [1, {1 + num_patches}, {d}], got {list(pos_embed.shape)}")
    if tuple(cls_token.shape) != (1, 1, d):
        raise ValueError(f"cls_token must be [1, 1, D] = [1, 1, {d}], got shape {list(cls_token.shape)}")
    check_same_device(imgs=imgs, ids_keep=ids_keep, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    check_device("imgs", imgs, _INTERPRETED)
    if pos_embed.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "pos_embed requires grad, but this kernel treats it as MAE's fixed sin-cos table and computes no "
            "gradient for it; set pos_embed.requires_grad_(False) or use fastmae.reference.patch_embed"
        )
    device_type = imgs.device.type
    if torch.is_autocast_enabled(device_type):
        ct = torch.get_autocast_dtype(device_type)
        if ct not in CT_CODE:
            raise TypeError(f"autocast dtype must be float16, bfloat16 or float32, got {ct}")
    else:
        ct = imgs.dtype
        if weight.dtype != ct or bias.dtype != ct:
            raise TypeError(
                f"imgs, weight and bias must share one dtype outside autocast, got {imgs.dtype}, {weight.dtype} and "
                f"{bias.dtype}"
            )
    if ids_keep.numel() and host_checks(ids_keep):
        lo, hi = torch.stack(torch.aminmax(ids_keep)).tolist()
        if lo < 0 or hi >= num_patches:
            raise ValueError(f"ids_keep must hold patch indices in [0, L={num_patches}), got values in [{lo}, {hi}]")
    return ct


def _weight_matrix(weight: torch.Tensor, ct: torch.dtype, block: int) -> torch.Tensor:
    """The weight as the GEMMs read it: ``[D, RP]`` contiguous in the compute dtype ``ct``, (c, i, j) order, zero in
    columns ``R..RP`` (``RP``: R rounded up to ``block``). The weight itself when it already is that (a contiguous
    16-bit weight with R a multiple of ``block``: ViT-B and -L in a bf16 model); else one copy per call by
    _fwd_weight_kernel (the cast under autocast, the padded rows of P = 14, other strides)."""
    d, c, p, _ = weight.shape
    r = c * p * p
    rp = triton.cdiv(r, block) * block
    if weight.dtype == ct and rp == r and weight.is_contiguous():
        return weight.view(d, r)  # [D, R]
    wm = empty(d, rp, dtype=ct, device=weight.device)  # [D, RP]
    if wm.numel() == 0:
        return wm
    grid = (triton.cdiv(d, WEIGHT_BLOCK), triton.cdiv(rp, WEIGHT_BLOCK))
    args = (weight, wm, d, c, rp, *weight.stride())
    consts = dict(P=p, BLOCK_D=WEIGHT_BLOCK, BLOCK_R=WEIGHT_BLOCK)
    if not _INTERPRETED:
        wrap_triton(_fwd_weight_kernel)[grid](*args, **consts, num_warps=4)
    elif not launch_skipped(*args):
        _fwd_weight_kernel[grid](*args, **consts)
    return wm


def _launch_fwd(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
    cls_token: torch.Tensor, err: torch.Tensor, ct: torch.dtype, out_dtype: torch.dtype, allow_tf32: bool,
    write_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out ``[N, 1+K, D]``, rows) in one launch of _fwd_kernel, after _fwd_weight_kernel when the weight needs a
    cast or a padded copy; ``err[0]`` set on a patch index outside [0, L). rows: int64 ``[N·K]``, the image offset
    of each kept patch (negative for a bad index) for the backward, when ``write_rows``; else empty."""
    n, c, d, p, gw, num_patches, r = _geometry(imgs, weight)
    k = ids_keep.shape[1]
    out = empty(n, 1 + k, d, dtype=out_dtype, device=imgs.device)  # [N, 1+K, D]
    rows = empty(n * k if write_rows else 0, dtype=torch.int64, device=imgs.device)  # [N·K]
    if out.numel() == 0:
        return out, rows
    short_rows = (p * imgs.element_size()) % 16 != 0
    bm, bn, bk, warps, stages = CONFIGS[_config_name(d, n * k, ct, short_rows=short_rows)]
    wm = _weight_matrix(weight, ct, bk)  # [D, RP]
    grid = (triton.cdiv(n * (1 + k), bm) * triton.cdiv(d, bn),)
    pos = pos_embed[0]  # [1+L, D]
    args = (
        imgs, ids_keep, wm, bias, pos, cls_token, out, rows, err,
        n * (1 + k), k, d, c, wm.shape[1], num_patches,
        *imgs.stride(), *ids_keep.stride(),
        wm.stride(0), bias.stride(0), pos.stride(0), pos.stride(1), cls_token.stride(2),
        *out.stride(),
    )  # fmt: skip
    consts = dict(P=p, GW=gw, ALIGN=_offset_align(imgs, p), CT=CT_CODE[ct], ALLOW_TF32=allow_tf32)
    consts.update(WRITE_ROWS=write_rows)
    consts.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if not _INTERPRETED:
        wrap_triton(_fwd_kernel)[grid](*args, **consts, num_warps=warps, num_stages=stages)
    elif not launch_skipped(*args):
        _fwd_kernel[grid](*args, **consts)
    return out, rows


def _launch_bwd_params(dout, imgs, rows, weight, bias_dtype, cls_dtype, ct, allow_tf32):
    """(dW [D, C, p, p], dbias [D], dcls [1, 1, D]): split partials of all three, then one ordered reduction."""
    n, c, d, p, gw, num_patches, r = _geometry(imgs, weight)
    mk = rows.shape[0]
    k = mk // n if n else 0
    dev = imgs.device
    bd, br, bm, warps, stages = CONFIGS[_config_name(d, mk, imgs.dtype, dout.dtype)]
    rw = triton.cdiv(r, br) * br
    num_r = rw // br
    tiles = triton.cdiv(d, bd) * num_r
    split, rows_per = _dw_split(mk, tiles, bm)
    ws_stride = d * rw + num_r * 2 * d
    ws = empty(split, ws_stride, dtype=torch.float32, device=dev)  # [SPLIT, D·RW + num_r·2·D] fp32 partials
    args = (
        imgs, rows, dout, ws,
        mk, n, max(k, 1), d, c, rows_per, rw, ws_stride,
        *imgs.stride()[1:], *dout.stride(),
    )  # fmt: skip
    consts = dict(P=p, ALIGN=_offset_align(imgs, p), CT=CT_CODE[ct], ALLOW_TF32=allow_tf32)
    consts.update(BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br)
    if not _INTERPRETED:
        wrap_triton(_bwd_dw_kernel)[(tiles, split)](*args, **consts, num_warps=warps, num_stages=stages)
    elif not launch_skipped(*args):
        _bwd_dw_kernel[(tiles, split)](*args, **consts)
    dw = empty(d, c, p, p, dtype=weight.dtype, device=dev)
    db = empty(d, dtype=bias_dtype, device=dev)
    dcls = empty(1, 1, d, dtype=cls_dtype, device=dev)
    grid = (triton.cdiv(d * rw, REDUCE_BLOCK) + triton.cdiv(2 * d, REDUCE_BLOCK),)
    args = (ws, dw, db, dcls, split, ws_stride, d, r, rw, num_r)
    consts = dict(BLOCK=REDUCE_BLOCK, NUM_R_P2=triton.next_power_of_2(num_r))
    if not _INTERPRETED:
        wrap_triton(_bwd_reduce_kernel)[grid](*args, **consts, num_warps=4)
    elif not launch_skipped(*args):
        _bwd_reduce_kernel[grid](*args, **consts)
    return dw, db, dcls


def _launch_bwd_dimgs(dout, imgs, ids_keep, weight, ct, allow_tf32) -> torch.Tensor:
    """dimgs in imgs' dtype and memory format: every patch written, the unkept ones with zeros."""
    n, c, d, p, gw, num_patches, r = _geometry(imgs, weight)
    dev = imgs.device
    h, w = imgs.shape[2:]
    if not imgs.is_contiguous() and imgs.is_contiguous(memory_format=torch.channels_last):
        dimgs = empty(n, h, w, c, dtype=imgs.dtype, device=dev).permute(0, 3, 1, 2)  # [N, C, H, W] channels_last
    else:
        dimgs = empty(n, c, h, w, dtype=imgs.dtype, device=dev)  # [N, C, H, W]
    sorted_ids, perm = torch.sort(ids_keep.contiguous(), dim=1, stable=True)  # [N, K] each, contiguous
    patch = torch.arange(num_patches, device=dev).expand(n, num_patches).contiguous()  # [N, L]
    start = torch.searchsorted(sorted_ids, patch)  # [N, L] first sorted position holding patch l
    cnt = torch.searchsorted(sorted_ids, patch, right=True) - start  # [N, L] how many rows kept patch l
    bm, br, bd, warps, stages = CONFIGS[_config_name(d, ids_keep.numel(), dout.dtype, ct)]
    wm = _weight_matrix(weight, ct, br)  # [D, RP]
    grid = (triton.cdiv(n * num_patches, bm) * triton.cdiv(r, br),)
    args = (
        dout, wm, start, cnt, perm, dimgs,
        n * num_patches, num_patches, d, r, gw,
        *dout.stride(), wm.stride(0), perm.stride(0), *dimgs.stride(),
    )  # fmt: skip
    consts = dict(P=p, CT=CT_CODE[ct], ALLOW_TF32=allow_tf32, BLOCK_M=bm, BLOCK_R=br, BLOCK_D=bd)
    if not _INTERPRETED:
        wrap_triton(_bwd_dimg_kernel)[grid](*args, **consts, num_warps=warps, num_stages=stages)
    elif not launch_skipped(*args):
        _bwd_dimg_kernel[grid](*args, **consts)
    return dimgs


def _launch_bwd(
    dout: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
    bias_dtype: torch.dtype, cls_dtype: torch.dtype, ct: torch.dtype, allow_tf32: bool, need_img: bool,
    need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dimgs, dW, dbias, dcls) in their inputs' dtypes; empty placeholders for those not asked for (need_img:
    dimgs; need_params: the others, from the forward's rows)."""
    if need_params:
        dw, db, dcls = _launch_bwd_params(dout, imgs, rows, weight, bias_dtype, cls_dtype, ct, allow_tf32)
    else:
        dw, db, dcls = (empty(0, dtype=dt, device=dout.device) for dt in (weight.dtype, bias_dtype, cls_dtype))
    if need_img:
        dimgs = _launch_bwd_dimgs(dout, imgs, ids_keep, weight, ct, allow_tf32)
    else:
        dimgs = empty(0, dtype=imgs.dtype, device=dout.device)
    return dimgs, dw, db, dcls


class PatchEmbedFunction(torch.autograd.Function):
    """Autograd of the fused op: gradients of imgs (when it requires one), weight, bias and cls_token."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, imgs, ids_keep, weight, bias, pos_embed, cls_token, ct):
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
        out_dtype = torch.promote_types(torch.promote_types(ct, pos_embed.dtype), cls_token.dtype)
        err = error_flags("patch_embed", imgs.device)
        need_params = any(ctx.needs_input_grad[i] for i in (2, 3, 5))
        out, rows = patch_embed_fwd(
            imgs, ids_keep, weight, bias, pos_embed, cls_token, err, ct, out_dtype, allow_tf32, need_params
        )
        ctx.save_for_backward(imgs, ids_keep, rows, weight)
        ctx.meta = (bias.dtype, cls_token.dtype, ct, allow_tf32)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        imgs, ids_keep, rows, weight = ctx.saved_tensors
        need_img, _, need_w, need_b, _, need_cls, _ = ctx.needs_input_grad
        if not (need_img or need_w or need_b or need_cls):
            return (None,) * 7
        need_params = need_w or need_b or need_cls
        grads = patch_embed_bwd(dout, imgs, ids_keep, rows, weight, *ctx.meta, need_img, need_params)
        dimgs, dw, db, dcls = grads
        keep = lambda t, need: t if need else None
        return keep(dimgs, need_img), None, keep(dw, need_w), keep(db, need_b), None, keep(dcls, need_cls), None


# Torch integration (see fastmae.kernels._common.register_op): the forward op writes the error flags it is given
# (mutates_args) and returns the output and the kept rows' image offsets, the backward op computes the gradients
# asked for; PatchEmbedFunction ties them, saving imgs, ids_keep, those offsets and weight (no im2col) and running
# under autocast's compute dtype.
patch_embed_fwd = register_op("fastmae::patch_embed_fwd", mutates_args=("err",))(_launch_fwd)
patch_embed_bwd = register_op("fastmae::patch_embed_bwd")(_launch_bwd)


def patch_embed(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor,
) -> torch.Tensor:
    """Patch embedding of the visible patches, with positions and the cls token, as one fused kernel.

    Same arguments and result as :func:`fastmae.reference.patch_embed`; differentiable with respect to
    ``imgs`` (when it requires grad), ``weight``, ``bias`` and ``cls_token``. ``pos_embed`` is fixed: a
    ``pos_embed`` that requires grad is refused (ValueError) while grad mode is on.

    Args:
        imgs: ``[N, C, H, W]``, any strides (channels_last included); H and W multiples of p.
        ids_keep: ``[N, K]`` int64 kept patch indices in ``[0, L)``, in kept order.
        weight: conv weight ``[D, C, p, p]``; bias ``[D]`` (the dtype of imgs, unless under autocast).
        pos_embed: ``[1, 1+L, D]``; cls_token: ``[1, 1, D]`` (any float dtype).

    Returns:
        ``[N, 1+K, D]``: row 0 = cls_token + pos_embed[0]; row 1+k = embedding of patch ids_keep[n, k] + its pos.
        Its dtype is the eager op's: ``promote(compute dtype, pos_embed.dtype, cls_token.dtype)``, where the
        compute dtype is the autocast dtype under ``torch.autocast`` and imgs.dtype otherwise.
    """
    ct = _check(imgs, ids_keep, weight, bias, pos_embed, cls_token)
    out = PatchEmbedFunction.apply(imgs, ids_keep, weight, bias, pos_embed, cls_token, ct)
    debug_check()
    return out
