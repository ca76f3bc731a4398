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
zero and whose epilogue adds ``cls_token`` instead of the GEMM result. Accumulation is fp32; the epilogue adds bias
and the gathered positional rows in fp32 and rounds once.

Backward, from ``dout [N, 1+K, D]`` (``G[m] = dout[n, 1+k]``)::

    dW[d, r]   = Σ_m G[m, d] · A[m, r]     (_bwd_dw_kernel: A re-gathered from imgs, no saved im2col)
    dbias[d]   = Σ_m G[m, d]               (same kernel, from the G tiles it loads anyway)
    dcls[d]    = Σ_n dout[n, 0, d]          (_bwd_reduce_kernel)
    dimgs[n, :, patch l] = Σ_{k: ids_keep[n,k] = l} G[n·K+k] · W    (_bwd_dimg_kernel), zero on unkept patches

Determinism, no float atomics anywhere: ``_bwd_dw_kernel`` splits the m reduction into ``SPLIT`` contiguous row
ranges (chosen from the shapes only), each writing an fp32 partial ``[D·R + D]`` to a workspace row;
``_bwd_reduce_kernel`` sums the partials in split order and writes dW, dbias and dcls in their parameters'
dtypes. ``_bwd_dimg_kernel`` runs over all ``N·L`` patches of the image, so it writes every pixel exactly once:
for each patch it sums, in sorted-k order, the rows that kept it (``torch.sort`` of ``ids_keep`` with
``searchsorted`` gives each patch's start and count; duplicates in ``ids_keep`` add up as in the eager op).

dtypes: fp32, fp16 and bf16. Without autocast ``imgs``, ``weight`` and ``bias`` share one dtype (the conv's
rule); ``pos_embed`` and ``cls_token`` may be any of the three. The GEMM operands are cast in registers to the
compute dtype ``CT`` (``imgs.dtype``, or the autocast dtype under ``torch.autocast``, as the conv would be): no
cast copy of the image is made. The output dtype is the eager op's: ``promote(CT, pos_embed.dtype,
cls_token.dtype)``; under autocast with MAE's fp32 ``pos_embed`` that is fp32, exactly as
``conv(bf16) + pos_embed(fp32)`` is in the original. fp32 GEMMs use TF32 when
``torch.backends.cudnn.allow_tf32`` is set, like the conv they replace. Gradients come back in each input's dtype.

Constraints: H and W multiples of P. ``pos_embed`` is MAE's fixed sin-cos table: its gradient is not computed, and
a ``pos_embed`` that requires grad (with grad mode on) is refused with a ValueError; use
:func:`fastmae.reference.patch_embed` for a learned one. ``ids_keep`` must hold indices in ``[0, L)``: checked on the
host for CPU tensors; on CUDA (the policy of :mod:`fastmae.kernels._common`) an index outside never addresses
memory, its output row is NaN, ``_fwd_kernel`` flags it, and the backward leaves it out of dW.
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

# Compute dtype codes passed to the kernels as the constexpr CT.
CT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _mma(a, b, acc, CT: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc += a @ b with both operands cast to the compute dtype CT (0 fp32, 1 fp16, 2 bf16)."""
    if CT == 1:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif CT == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif ALLOW_TF32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _round_to_ct(x, CT: tl.constexpr):
    """x rounded to the compute dtype CT and back to fp32 (the conv sees its bias in that dtype)."""
    if CT == 1:
        x = x.to(tl.float16)
    elif CT == 2:
        x = x.to(tl.bfloat16)
    return x.to(tl.float32)


@triton.jit
def _fwd_kernel(
    IMG, IDS, W, B, POS, CLS, OUT, ERR,
    ROWS, K, D, R, L, GW,
    s_in, s_ic, s_ih, s_iw,
    s_idn, s_idk,
    s_wd, s_wc, s_wi, s_wj,
    s_b, s_pl, s_pd, s_cd,
    s_on, s_ot, s_od,
    P: tl.constexpr, CT: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M tokens, BLOCK_N channels] tile of out; token rows are flat n·(1+K) + t, t = 0 the cls row.
    ERR[0] = 1 when a row's patch index is outside [0, L)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    col_ok = cols < D
    n = (rows // (K + 1)).to(tl.int64)
    t = rows % (K + 1)
    lp = tl.load(IDS + n * s_idn + (t - 1) * s_idk, mask=row_ok & (t > 0), other=0)
    l_ok = (lp >= 0) & (lp < L)
    is_patch = row_ok & (t > 0) & l_ok
    tl.store(ERR + tl.zeros([BLOCK_M], dtype=tl.int32), 1, mask=row_ok & (t > 0) & (l_ok == 0))
    a_row = n * s_in + (lp // GW) * (P * s_ih) + (lp % GW) * (P * s_iw)  # [BLOCK_M] image offset of the patch
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)
        r_ok = r < R
        c = r // (P * P)
        i = (r // P) % P
        j = r % P
        a = tl.load(
            IMG + a_row[:, None] + (c * s_ic + i * s_ih + j * s_iw)[None, :],
            mask=is_patch[:, None] & r_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            W + (c * s_wc + i * s_wi + j * s_wj)[:, None] + cols[None, :] * s_wd,
            mask=r_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc = _mma(a, w, acc, CT, ALLOW_TF32)
    bias = _round_to_ct(tl.load(B + cols * s_b, mask=col_ok, other=0.0).to(tl.float32), CT)
    cls = tl.load(CLS + cols * s_cd, mask=col_ok, other=0.0).to(tl.float32)
    pos_row = tl.where(t > 0, 1 + lp, 0)
    pos = tl.load(
        POS + pos_row[:, None] * s_pl + cols[None, :] * s_pd,
        mask=(row_ok & ((t == 0) | l_ok))[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    val = tl.where((t == 0)[:, None], cls[None, :], acc + bias[None, :]) + pos
    val = tl.where(((t == 0) | l_ok)[:, None], val, float("nan"))
    out_ptr = OUT + (n * s_on + t * s_ot)[:, None] + cols[None, :] * s_od
    tl.store(out_ptr, val.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_dw_kernel(
    IMG, IDS, G, WS,
    MK, K, D, R, L, GW, ROWS_PER_SPLIT, WS_STRIDE,
    s_in, s_ic, s_ih, s_iw,
    s_idn, s_idk,
    s_gn, s_gt, s_gd,
    P: tl.constexpr, CT: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Partial dW[BLOCK_D, BLOCK_R] (and, in the r-tile-0 programs, partial dbias) over one split of the rows; a
    patch index outside [0, L) contributes nothing to dW."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_r = tl.cdiv(R, BLOCK_R)
    pid_d = pid // num_r
    pid_r = pid % num_r
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    d_ok = ds < D
    r_ok = rs < R
    c = rs // (P * P)
    i = (rs // P) % P
    j = rs % P
    col_off = c * s_ic + i * s_ih + j * s_iw  # [BLOCK_R] pixel offset inside a patch
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(m_start + ROWS_PER_SPLIT, MK)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < m_end
        n = (ms // K).to(tl.int64)
        k = ms % K
        lp = tl.load(IDS + n * s_idn + k * s_idk, mask=m_ok, other=0)
        a_row = n * s_in + (lp // GW) * (P * s_ih) + (lp % GW) * (P * s_iw)
        a_ok = m_ok & (lp >= 0) & (lp < L)
        a = tl.load(
            IMG + a_row[:, None] + col_off[None, :], mask=a_ok[:, None] & r_ok[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_R]
        g = tl.load(
            G + (n * s_gn + (k + 1) * s_gt)[:, None] + ds[None, :] * s_gd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        db += tl.sum(g.to(tl.float32), axis=0)
        acc = _mma(tl.trans(g), a, acc, CT, ALLOW_TF32)
    ws = WS + split.to(tl.int64) * WS_STRIDE
    tl.store(ws + ds[:, None] * R + rs[None, :], acc, mask=d_ok[:, None] & r_ok[None, :])
    tl.store(ws + D * R + ds, db, mask=d_ok & (pid_r == 0))


@triton.jit
def _bwd_reduce_kernel(
    WS, G, DW, DB, DCLS,
    SPLIT, WS_STRIDE, DR, D, NB,
    s_gn, s_gd,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """dW, dbias = Σ_split WS[split] in split order; dcls = Σ_n dout[n, 0] in n order."""
    pid = tl.program_id(0)
    num_ws = tl.cdiv(DR + D, BLOCK)
    if pid < num_ws:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < DR + D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLIT):
            acc += tl.load(WS + s * WS_STRIDE + offs, mask=ok, other=0.0)
        tl.store(DW + tl.minimum(offs, DR - 1), acc.to(DW.dtype.element_ty), mask=offs < DR)
        tl.store(DB + tl.maximum(offs - DR, 0), acc.to(DB.dtype.element_ty), mask=ok & (offs >= DR))
    else:
        ds = (pid - num_ws) * BLOCK + tl.arange(0, BLOCK)
        ok = ds < D
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for n in range(0, NB):
            acc += tl.load(G + n * s_gn + ds * s_gd, mask=ok, other=0.0).to(tl.float32)
        tl.store(DCLS + ds, acc.to(DCLS.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_dimg_kernel(
    G, W, START, CNT, PERM, DIMG,
    NL, L, D, R, GW,
    s_gn, s_gt, s_gd,
    s_wd, s_wc, s_wi, s_wj,
    s_pn,
    s_xn, s_xc, s_xh, s_xw,
    P: tl.constexpr, CT: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dimgs for BLOCK_M whole patches (flat n·L + l) × BLOCK_R pixels: Σ over the rows that kept each patch."""
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
    c = rs // (P * P)
    i = (rs // P) % P
    j = rs % P
    w_col = c * s_wc + i * s_wi + j * s_wj  # [BLOCK_R]
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
            w = tl.load(
                W + ds[:, None] * s_wd + w_col[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0
            )  # [BLOCK_D, BLOCK_R]
            acc = _mma(g, w, acc, CT, ALLOW_TF32)
    x_row = n * s_xn + (lp // GW) * (P * s_xh) + (lp % GW) * (P * s_xw)
    x_col = c * s_xc + i * s_xh + j * s_xw
    tl.store(
        DIMG + x_row[:, None] + x_col[None, :],
        acc.to(DIMG.dtype.element_ty),
        mask=row_ok[:, None] & r_ok[None, :],
    )


# Tuning: tile shapes come from the shapes and dtypes alone (_config_name: 128×128 tiles with a 64-deep reduction
# tile for D ≥ 256 and 1024+ kept patches, 32-deep when an operand is stored in fp32; 32×32×32 for smaller problems)
# rather than from @triton.autotune, so the reduction order and hence the bits do not depend on a timing race;
# nothing is queried from the GPU. Forward programs are ordered with the D tiles of one row tile adjacent, so the
# gathered A tile is re-read from L2.
#
# Tile configs (BLOCK over output rows, BLOCK over output columns, BLOCK over the reduction, num_warps, num_stages),
# shared by the three GEMM kernels: forward [tokens × D] over R, dW [D × R] over kept rows, dimgs [patches × R]
# over D. "large16"/"large32" serve the ViT shapes (D = 384..1280, batches of 1024+ tokens) with 16-bit or fp32
# storage (fp32 storage includes autocast, where fp32 tiles are staged before the cast: a shorter K-tile keeps the
# pipeline's shared memory at 64-96 KB), "small" everything else.
CONFIGS = {
    "small": (32, 32, 32, 4, 2),
    "large16": (128, 128, 64, 8, 3),
    "large32": (128, 128, 32, 8, 3),
}


# The split dW reduction: a target number of programs (a few waves of a large GPU), each split covering at least
# DW_MIN_TILES_PER_SPLIT row tiles; the ordered sum of the splits runs REDUCE_BLOCK elements per program.
DW_TARGET_PROGRAMS = 528
DW_MIN_TILES_PER_SPLIT = 4
REDUCE_BLOCK = 512


def _config_name(d: int, tokens: int, *operands: torch.Tensor) -> str:
    """The tile config for embedding width ``d`` and ``tokens`` kept patches, given the GEMM's stored operands."""
    if d >= 256 and tokens >= 1024:
        return "large32" if any(t.dtype == torch.float32 for t in operands) else "large16"
    return "small"


def _dw_split(mk: int, tiles: int, block_m: int) -> tuple[int, int]:
    """(number of splits, rows per split) of the dW reduction over ``mk`` rows; depends on the shapes only."""
    mk = max(mk, 1)
    max_split = max(1, mk // (block_m * DW_MIN_TILES_PER_SPLIT))
    split = max(1, min(triton.cdiv(DW_TARGET_PROGRAMS, tiles), max_split))
    rows_per = triton.cdiv(triton.cdiv(mk, split), block_m) * block_m
    return triton.cdiv(mk, rows_per), rows_per


def _geometry(imgs: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    """(N, C, D, P, GW, L, R) of a call."""
    n, c, h, w = imgs.shape
    d, p = weight.shape[0], weight.shape[-1]
    return n, c, d, p, w // p, (h // p) * (w // p), c * p * p


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


def _launch_fwd(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
    cls_token: torch.Tensor, err: torch.Tensor, ct: torch.dtype, out_dtype: torch.dtype, allow_tf32: bool,
) -> torch.Tensor:  # fmt: skip
    """out ``[N, 1+K, D]`` in one launch of _fwd_kernel; ``err[0]`` set on a patch index outside [0, L)."""
    n, c, d, p, gw, num_patches, r = _geometry(imgs, weight)
    k = ids_keep.shape[1]
    out = empty(n, 1 + k, d, dtype=out_dtype, device=imgs.device)  # [N, 1+K, D]
    if out.numel() == 0:
        return out
    bm, bn, bk, warps, stages = CONFIGS[_config_name(d, n * k, imgs, weight)]
    rows = n * (1 + k)
    grid = (triton.cdiv(rows, bm) * triton.cdiv(d, bn),)
    pos = pos_embed[0]  # [1+L, D]
    args = (
        imgs, ids_keep, weight, bias, pos, cls_token, out, err,
        rows, k, d, r, num_patches, gw,
        *imgs.stride(), *ids_keep.stride(), *weight.stride(),
        bias.stride(0), pos.stride(0), pos.stride(1), cls_token.stride(2),
        *out.stride(),
    )  # fmt: skip
    consts = dict(P=p, CT=CT_CODE[ct], ALLOW_TF32=allow_tf32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if not _INTERPRETED:
        wrap_triton(_fwd_kernel)[grid](*args, **consts, num_warps=warps, num_stages=stages)
    elif not launch_skipped(*args):
        _fwd_kernel[grid](*args, **consts)
    return out


def _launch_bwd_params(dout, imgs, ids_keep, weight, bias_dtype, cls_dtype, ct, allow_tf32):
    """(dW [D, C, p, p], dbias [D], dcls [1, 1, D]): split dW/dbias partials, then one ordered reduction."""
    n, c, d, p, gw, num_patches, r = _geometry(imgs, weight)
    k = ids_keep.shape[1]
    dev = imgs.device
    bd, br, bm, warps, stages = CONFIGS[_config_name(d, n * k, imgs, dout)]
    tiles = triton.cdiv(d, bd) * triton.cdiv(r, br)
    split, rows_per = _dw_split(n * k, tiles, bm)
    ws_stride = d * r + d
    ws = empty(split, ws_stride, dtype=torch.float32, device=dev)  # [SPLIT, D·R + D] fp32 partials
    args = (
        imgs, ids_keep, dout, ws,
        n * k, max(k, 1), d, r, num_patches, gw, rows_per, ws_stride,
        *imgs.stride(), *ids_keep.stride(), *dout.stride(),
    )  # fmt: skip
    consts = dict(P=p, CT=CT_CODE[ct], ALLOW_TF32=allow_tf32, BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br)
    if not _INTERPRETED:
        wrap_triton(_bwd_dw_kernel)[(tiles, split)](*args, **consts, num_warps=warps, num_stages=stages)
    elif not launch_skipped(*args):
        _bwd_dw_kernel[(tiles, split)](*args, **consts)
    dw = empty(d, c, p, p, dtype=weight.dtype, device=dev)
    db = empty(d, dtype=bias_dtype, device=dev)
    dcls = empty(1, 1, d, dtype=cls_dtype, device=dev)
    grid = (triton.cdiv(ws_stride, REDUCE_BLOCK) + triton.cdiv(d, REDUCE_BLOCK),)
    args = (ws, dout, dw, db, dcls, split, ws_stride, d * r, d, n, dout.stride(0), dout.stride(2))
    if not _INTERPRETED:
        wrap_triton(_bwd_reduce_kernel)[grid](*args, BLOCK=REDUCE_BLOCK, num_warps=4)
    elif not launch_skipped(*args):
        _bwd_reduce_kernel[grid](*args, BLOCK=REDUCE_BLOCK)
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
    bm, br, bd, warps, stages = CONFIGS[_config_name(d, ids_keep.numel(), dout, weight)]
    grid = (triton.cdiv(n * num_patches, bm) * triton.cdiv(r, br),)
    args = (
        dout, weight, start, cnt, perm, dimgs,
        n * num_patches, num_patches, d, r, gw,
        *dout.stride(), *weight.stride(), perm.stride(0), *dimgs.stride(),
    )  # fmt: skip
    consts = dict(P=p, CT=CT_CODE[ct], ALLOW_TF32=allow_tf32, BLOCK_M=bm, BLOCK_R=br, BLOCK_D=bd)
    if not _INTERPRETED:
        wrap_triton(_bwd_dimg_kernel)[grid](*args, **consts, num_warps=warps, num_stages=stages)
    elif not launch_skipped(*args):
        _bwd_dimg_kernel[grid](*args, **consts)
    return dimgs


def _launch_bwd(
    dout: torch.Tensor, imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias_dtype: torch.dtype,
    cls_dtype: torch.dtype, ct: torch.dtype, allow_tf32: bool, need_img: bool, need_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dimgs, dW, dbias, dcls) in their inputs' dtypes; empty placeholders for those not asked for (need_img:
    dimgs; need_params: the others)."""
    if need_params:
        dw, db, dcls = _launch_bwd_params(dout, imgs, ids_keep, weight, bias_dtype, cls_dtype, ct, allow_tf32)
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
        out = patch_embed_fwd(imgs, ids_keep, weight, bias, pos_embed, cls_token, err, ct, out_dtype, allow_tf32)
        ctx.save_for_backward(imgs, ids_keep, weight)
        ctx.meta = (bias.dtype, cls_token.dtype, ct, allow_tf32)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        imgs, ids_keep, weight = ctx.saved_tensors
        need_img, _, need_w, need_b, _, need_cls, _ = ctx.needs_input_grad
        if not (need_img or need_w or need_b or need_cls):
            return (None,) * 7
        need_params = need_w or need_b or need_cls
        dimgs, dw, db, dcls = patch_embed_bwd(dout, imgs, ids_keep, weight, *ctx.meta, need_img, need_params)
        keep = lambda t, need: t if need else None
        return keep(dimgs, need_img), None, keep(dw, need_w), keep(db, need_b), None, keep(dcls, need_cls), None


# Torch integration (see fastmae.kernels._common.register_op): the forward op writes the error flags it is given
# (mutates_args), the backward op computes the gradients asked for; PatchEmbedFunction ties them, saving imgs,
# ids_keep and weight (no im2col) and running under autocast's compute dtype.
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
