"""Flash attention for MAE's short sequences: packed ``qkv`` in, the output projection's layout out.

Math, per batch row b and head h, with q, k, v the ``[N, d]`` slices of ``qkv [B, N, 3, H, d]`` read in place
through strides (no permute, no copy). fp16/bf16 work on base-2 logits, ``c = scale · log2(e)``; fp32
(``EXACT_P``) forms natural-unit logits exactly as the eager op does, ``e^x`` computed as ``2^(x · log2(e))``:

Forward (``_fwd_kernel``: one program per query tile, looping over key tiles)::

    s   = (q · kᵀ) · c            (fp16/bf16)      s = (q · scale) · kᵀ      (fp32)    # fp32 logits
    m'  = max(m, rowmax(s));  alpha = 2^(m − m'), p̃ = 2^(s − m')  (fp32: e^(m − m'), e^(s − m'))
    l   = alpha · l + rowsum(p̃);  acc = alpha · acc + p̃ · v     # online softmax, fp32 state
    out = acc / l        -> out [B, N, H·d], columns h·d .. h·d+d-1 (the proj Linear's input layout)
    stats [B, H, S, N], fp32, saved for the backward: S = 1: lse = m + log2(l) (fp16/bf16); S = 2: m, l (fp32)

Backward, given ``dout = ∂L/∂out [B, N, H·d]`` and p recomputed from the same logits s and the stats,
``p = 2^(s − lse)`` (fp16/bf16) or ``p = e^(s − m) · (1/l)`` (fp32)::

    dp = dout · vᵀ,  Delta = rowsum(dout ∘ out) = rowsum(p ∘ dp),  ds = p ∘ (dp − Delta) · scale
    dv = pᵀ · dout,  dk = dsᵀ · q,  dq = ds · k     -> written straight into dqkv [B, N, 3·H·d]

Why fp32 differs: the eager op normalizes the very logits it computed, so with peaked softmaxes (|s| in the
hundreds) its p barely depends on their rounding; a recomputed p is off by any difference between the forward's
and the backward's exponent. Three such differences, each a rounding at |s|: (1) a saved lse = m + log2(l)
(~|lse| · 2^-25); (2) a backward s that is not bitwise the forward's: kᵀ·q-ordered scores in the dK/dV kernel,
which a BLAS (OpenBLAS' Haswell kernels under the interpreter) or an MMA may round differently from q·kᵀ; (3) base-2
logits, 1.44× larger, with the product by c after the dot. So in fp32 every kernel forms s = (q · scale) · kᵀ in
the forward's orientation (queries as rows; the dK/dV kernel transposes p and ds for its dots) and the forward saves
(m, l), so that s − m cancels exactly. Measured dv error (an exact numpy replay of the interpreted kernels, 33 fp32
cases: d = 32..128, N = 7..257, |s| up to ~500; six CPU setups: ATEN_CPU_CAPABILITY default/avx2/avx512 × OpenBLAS
Haswell/SkylakeX), as the worst ratio to the tests' bound 2 · eager error + 1e-5: base-2 lse with kᵀ·q scores (the
former kernel) 7.6; with (m, l) 7.6; forward orientation 1.17, with (m, l) 1.13, and q pre-scaled by c 1.17;
natural units with lse 1.00; all three 0.70. p = e^(s − m) / l, e^(s − m) · (1/l) and e^(s − m − ln l) measure
alike; ``· (1/l)`` costs one multiply per element. fp16/bf16 round p to 16 bits (2^-9 / 2^-12) before its dots,
far above these effects, and keep the cheaper base-2 form: no extra stats, no transposes.

* N <= 64 in fp16/bf16 (the ViT-B/L encoder's 50 tokens): ``_bwd_fused_kernel``, one program per (b, h) holds the
  whole head in one tile and does the five dots once; Delta = rowsum(p ∘ dp), so ``out`` is not even read.
* otherwise: ``_bwd_dq_kernel`` (one program per query tile: the Delta preprocess from ``dout ∘ out`` for its rows,
  stored to an fp32 ``[B, H, N]`` buffer, then dq over all key tiles), then ``_bwd_dkdv_kernel`` (one program per
  key tile, looping over query tiles, reading Delta). dq is recomputed rather than accumulated across programs.
Every element of out, stats, Delta and dqkv is written by exactly one program, in a fixed order: no atomics, and
results are bitwise deterministic run to run.

Tiling (``tiling``): full tiles of BLOCK = 64 rows/keys (32 in fp32), then ONE tail tile of TAIL = the leftover
``N mod BLOCK`` rounded up to a power of two >= 16, both in the owned dimension (the last program of a head runs
the TAIL-row code path) and in the loop dimension (a masked last step). MAE's sequences are 1 token past a tile
(65 = 64 + 1, 257 = 256 + 1) or 5 past (197), so a 16-wide tail instead of a 64/128-wide one cuts the padded
work: 257 tokens cost 272² score entries rather than 320² (64 tiles) or 384² (128 tiles); 65 cost 80², not 128².
Full tiles skip the row masks (only the d padding is masked). N <= 64 runs as one tile of next_pow2(N) >= 16.

Constraints: head dim d in [16, 128] (ViT-H/14's 80 included); d is padded to ``D_PAD`` = next power of two in
registers only, with masked loads and stores. Any N >= 1: rows and keys past N are masked (logits to -inf in the
forward, p to 0 in the backward). A 1-D grid with a head's tiles adjacent, so its k and v stay in L2 while they
run, and B·H is not limited by CUDA's 65535 cap on grid dims 1 and 2. int64 batch offsets.

Precision: fp16/bf16 dots run on tensor cores with fp32 accumulation; p and ds are rounded to the input dtype
before their dots (as the eager op rounds its probabilities). fp32 dots use ``input_precision="tf32x3"`` (three
TF32 MMAs per product, ~2^-21 relative error per product): plain TF32 (~1e-3) would break the rule that the
kernel's error stays within twice the eager fp32 op's (cuBLAS does not use TF32 by default), and IEEE FMA dots
compile for minutes at 128-wide padded tiles and spill heavily. An emulation of 3xTF32 at MAE's shapes gives
errors at or below eager fp32's. Under the interpreter every dot is an exact fp32 numpy matmul.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmae.kernels._attention_tiles import (
    dkdv_step,
    dq_step,
    fwd_step,
    load_stats,
    load_tile,
    store_stats,
    store_tile,
)
from fastmae.kernels._common import (
    check_device,
    check_float,
    empty,
    interpreting,
    launch_skipped,
    register_op,
    unsupported_float,
)

LOG2E = math.log2(math.e)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


@triton.jit
def _fwd_rows(
    q_ptr, o_ptr, stats_ptr, row0, N, H, stride_qkv_n, stride_out_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, ROWS: tl.constexpr, MASK_Q: tl.constexpr,
):  # fmt: skip
    """out and stats of query rows ``row0 .. row0+ROWS-1``: full key tiles of BLOCK, then one masked TAIL tile."""
    rows = row0 + tl.arange(0, ROWS)
    q = load_tile(q_ptr, rows, stride_qkv_n, N, HEAD_DIM, D_PAD, MASK_Q)  # [ROWS, D_PAD]
    if EXACT_P:
        q = q * scale
    k_ptr = q_ptr + H * HEAD_DIM
    v_ptr = k_ptr + H * HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    n_full = N // BLOCK * BLOCK
    for start in range(0, n_full, BLOCK):
        m_i, l_i, acc = fwd_step(
            q, m_i, l_i, acc, k_ptr, v_ptr, start, N, stride_qkv_n, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, False,
        )  # fmt: skip
    if n_full < N:
        m_i, l_i, acc = fwd_step(
            q, m_i, l_i, acc, k_ptr, v_ptr, n_full, N, stride_qkv_n, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, TAIL, True,
        )  # fmt: skip
    store_tile(o_ptr, rows, stride_out_n, N, acc / l_i[:, None], HEAD_DIM, D_PAD)
    store_stats(stats_ptr, rows, N, m_i, l_i, EXACT_P)


@triton.jit
def _fwd_kernel(
    QKV, Out, Stats, N, H, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """out and stats for one query tile of one (b, h); grid ``(B·H·cdiv(N, BLOCK),)``, a head's tiles adjacent."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK)
    bh = pid // n_tiles
    tile = pid % n_tiles
    b = bh // H
    h = bh % H
    q_ptr = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    o_ptr = Out + b.to(tl.int64) * stride_out_b + h * HEAD_DIM
    stats_ptr = Stats + bh.to(tl.int64) * N * (1 + EXACT_P)
    if (tile + 1) * BLOCK <= N:
        _fwd_rows(
            q_ptr, o_ptr, stats_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_out_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, TAIL, BLOCK, False,
        )  # fmt: skip
    else:
        _fwd_rows(
            q_ptr, o_ptr, stats_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_out_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, TAIL, TAIL, True,
        )  # fmt: skip


@triton.jit
def _bwd_fused_kernel(
    QKV, Stats, DOut, DQKV, N, H, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dq, dk, dv of one (b, h) whose N <= BLOCK tokens fit one tile; grid ``(B·H,)``."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    q_ptr = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    dqkv_ptr = DQKV + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
    do_ptr = DOut + b.to(tl.int64) * stride_do_b + h * HEAD_DIM
    idx = tl.arange(0, BLOCK)
    q = load_tile(q_ptr, idx, stride_qkv_n, N, HEAD_DIM, D_PAD, True)  # [BLOCK, D_PAD]
    k = load_tile(q_ptr + H * HEAD_DIM, idx, stride_qkv_n, N, HEAD_DIM, D_PAD, True)
    v = load_tile(q_ptr + 2 * H * HEAD_DIM, idx, stride_qkv_n, N, HEAD_DIM, D_PAD, True)
    do = load_tile(do_ptr, idx, stride_do_n, N, HEAD_DIM, D_PAD, True)
    lse = tl.load(Stats + bh.to(tl.int64) * N + idx, mask=idx < N, other=0.0)  # fp16/bf16: S = 1, lse

    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK(q), BLOCK(k)]
    valid = (idx[:, None] < N) & (idx[None, :] < N)
    p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    delta = tl.sum(p * dp, 1)
    ds = (p * (dp - delta[:, None]) * scale).to(q.dtype)
    dv = tl.dot(tl.trans(p.to(q.dtype)), do, input_precision=PRECISION)  # [BLOCK, D_PAD]
    store_tile(dqkv_ptr + 2 * H * HEAD_DIM, idx, stride_dqkv_n, N, dv, HEAD_DIM, D_PAD)
    dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    store_tile(dqkv_ptr + H * HEAD_DIM, idx, stride_dqkv_n, N, dk, HEAD_DIM, D_PAD)
    dq = tl.dot(ds, k, input_precision=PRECISION)
    store_tile(dqkv_ptr, idx, stride_dqkv_n, N, dq, HEAD_DIM, D_PAD)


@triton.jit
def _dq_rows(
    q_ptr, o_ptr, do_ptr, dq_ptr, stats_ptr, delta_ptr, row0, N, H,
    stride_qkv_n, stride_out_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, ROWS: tl.constexpr, MASK_Q: tl.constexpr,
):  # fmt: skip
    """Delta and dq of query rows ``row0 .. row0+ROWS-1``."""
    rows = row0 + tl.arange(0, ROWS)
    q = load_tile(q_ptr, rows, stride_qkv_n, N, HEAD_DIM, D_PAD, MASK_Q)  # [ROWS, D_PAD]
    do = load_tile(do_ptr, rows, stride_do_n, N, HEAD_DIM, D_PAD, MASK_Q)
    o = load_tile(o_ptr, rows, stride_out_n, N, HEAD_DIM, D_PAD, MASK_Q)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # [ROWS]
    tl.store(delta_ptr + rows, delta, mask=rows < N)
    if EXACT_P:
        q = q * scale  # only the logits read q
    shift, inv_l = load_stats(stats_ptr, rows, N, True, EXACT_P)
    k_ptr = q_ptr + H * HEAD_DIM
    v_ptr = k_ptr + H * HEAD_DIM
    dq = tl.zeros([ROWS, D_PAD], tl.float32)
    n_full = N // BLOCK * BLOCK
    for start in range(0, n_full, BLOCK):
        dq = dq_step(
            q, do, shift, inv_l, delta, dq, k_ptr, v_ptr, start, N, stride_qkv_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, False,
        )  # fmt: skip
    if n_full < N:
        dq = dq_step(
            q, do, shift, inv_l, delta, dq, k_ptr, v_ptr, n_full, N, stride_qkv_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, TAIL, True,
        )  # fmt: skip
    store_tile(dq_ptr, rows, stride_dqkv_n, N, dq, HEAD_DIM, D_PAD)


@triton.jit
def _bwd_dq_kernel(
    QKV, Out, Stats, DOut, Delta, DQKV, N, H, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """Delta and dq of one query tile; grid ``(B·H·cdiv(N, BLOCK),)``."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK)
    bh = pid // n_tiles
    tile = pid % n_tiles
    b = bh // H
    h = bh % H
    q_ptr = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    o_ptr = Out + b.to(tl.int64) * stride_out_b + h * HEAD_DIM
    do_ptr = DOut + b.to(tl.int64) * stride_do_b + h * HEAD_DIM
    dq_ptr = DQKV + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
    stats_ptr = Stats + bh.to(tl.int64) * N * (1 + EXACT_P)
    delta_ptr = Delta + bh.to(tl.int64) * N
    if (tile + 1) * BLOCK <= N:
        _dq_rows(
            q_ptr, o_ptr, do_ptr, dq_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H,
            stride_qkv_n, stride_out_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, TAIL, BLOCK, False,
        )  # fmt: skip
    else:
        _dq_rows(
            q_ptr, o_ptr, do_ptr, dq_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H,
            stride_qkv_n, stride_out_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, TAIL, TAIL, True,
        )  # fmt: skip


@triton.jit
def _dkdv_cols(
    q_ptr, do_ptr, dk_ptr, stats_ptr, delta_ptr, col0, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, COLS: tl.constexpr, MASK_K: tl.constexpr,
):  # fmt: skip
    """dk and dv of keys ``col0 .. col0+COLS-1``: full query tiles of BLOCK, then one masked TAIL tile."""
    cols = col0 + tl.arange(0, COLS)
    k = load_tile(q_ptr + H * HEAD_DIM, cols, stride_qkv_n, N, HEAD_DIM, D_PAD, MASK_K)  # [COLS, D_PAD]
    v = load_tile(q_ptr + 2 * H * HEAD_DIM, cols, stride_qkv_n, N, HEAD_DIM, D_PAD, MASK_K)
    dk = tl.zeros([COLS, D_PAD], tl.float32)
    dv = tl.zeros([COLS, D_PAD], tl.float32)
    n_full = N // BLOCK * BLOCK
    for start in range(0, n_full, BLOCK):
        dk, dv = dkdv_step(
            k, v, dk, dv, q_ptr, do_ptr, stats_ptr, delta_ptr, start, N, stride_qkv_n, stride_do_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, False,
        )  # fmt: skip
    if n_full < N:
        dk, dv = dkdv_step(
            k, v, dk, dv, q_ptr, do_ptr, stats_ptr, delta_ptr, n_full, N, stride_qkv_n, stride_do_n, scale, qk_scale,
            HEAD_DIM, D_PAD, PRECISION, EXACT_P, TAIL, True,
        )  # fmt: skip
    store_tile(dk_ptr, cols, stride_dqkv_n, N, dk, HEAD_DIM, D_PAD)
    store_tile(dk_ptr + H * HEAD_DIM, cols, stride_dqkv_n, N, dv, HEAD_DIM, D_PAD)


@triton.jit
def _bwd_dkdv_kernel(
    QKV, Stats, DOut, Delta, DQKV, N, H, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n,
    stride_dqkv_b, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """dk and dv of one key tile (after ``_bwd_dq_kernel`` wrote Delta); grid ``(B·H·cdiv(N, BLOCK),)``."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK)
    bh = pid // n_tiles
    tile = pid % n_tiles
    b = bh // H
    h = bh % H
    q_ptr = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    do_ptr = DOut + b.to(tl.int64) * stride_do_b + h * HEAD_DIM
    dk_ptr = DQKV + b.to(tl.int64) * stride_dqkv_b + (H + h) * HEAD_DIM
    stats_ptr = Stats + bh.to(tl.int64) * N * (1 + EXACT_P)
    delta_ptr = Delta + bh.to(tl.int64) * N
    if (tile + 1) * BLOCK <= N:
        _dkdv_cols(
            q_ptr, do_ptr, dk_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n,
            scale, qk_scale, HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, TAIL, BLOCK, False,
        )  # fmt: skip
    else:
        _dkdv_cols(
            q_ptr, do_ptr, dk_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n,
            scale, qk_scale, HEAD_DIM, D_PAD, PRECISION, EXACT_P, BLOCK, TAIL, TAIL, True,
        )  # fmt: skip


def _opts(num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({}, num_warps=num_warps, num_stages=num_stages)


# Tuning (H100, bf16, not yet measured on a GPU): B·H is in the thousands (batch 256, 12..16 heads), so per-head
# parallelism is ample and tiles are sized to the sequence, not for long-sequence reuse. 64-row tiles map onto one
# Hopper warpgroup's wgmma (m64); k and v of a head are re-read by its 1..5 query programs from L2. Autotune
# candidates (keyed on N, d and dtype) differ only in launch options, so the tiling and tail sizes are fixed by N: 4
# warps (one warpgroup, fewer registers per tile, more resident CTAs) or 8 (two warpgroups splitting the 64-wide tile,
# shorter per-thread dependency chains); 2 stages where a loop over full tiles exists (197/257 tokens) to prefetch the
# next k/v (or q/dout) tile while the current one is in the tensor cores, 1 in the one-shot fused backward. With
# 16-byte aligned rows (3·H·d and H·d multiples of 8) all loads are 128-bit vectors; ptxas reports no spills for the
# fp16/bf16 configs on sm_90 except ~76 B in the 4-warp dK/dV kernel at d = 80/128. fp32 uses one small config per
# kernel (32-wide tiles, no autotuning; its operands take twice the shared memory).
#
# Autotune candidates per kernel: launch options only. The tiling is fixed by N (see ``tiling``), so the tail tile
# is sized to the sequence and results do not depend on which candidate wins.
CONFIGS = {
    "fwd": [_opts(4, 2), _opts(8, 2)],
    "bwd_fused": [_opts(4, 1), _opts(8, 1)],
    "bwd_dq": [_opts(4, 2), _opts(8, 2)],
    "bwd_dkdv": [_opts(4, 2), _opts(8, 2)],
}
# fp32 (3xTF32 dots on fp32 operands: twice the shared memory, three MMAs per product): one config, small tiles.
CONFIGS_FP32 = {"fwd": [_opts(4, 1)], "bwd_dq": [_opts(4, 1)], "bwd_dkdv": [_opts(8, 1)]}
BLOCK_16, BLOCK_32 = 64, 32  # full tile of the fp16/bf16 and of the fp32 kernels


def _tuner(fn, configs: list[triton.Config]):
    return triton.autotune(configs=configs, key=["N", "HEAD_DIM", "TAIL"])(fn)


_FWD = _tuner(_fwd_kernel, CONFIGS["fwd"])
_FWD_FP32 = _tuner(_fwd_kernel, CONFIGS_FP32["fwd"])
_BWD_FUSED = _tuner(_bwd_fused_kernel, CONFIGS["bwd_fused"])
_BWD_DQ = _tuner(_bwd_dq_kernel, CONFIGS["bwd_dq"])
_BWD_DQ_FP32 = _tuner(_bwd_dq_kernel, CONFIGS_FP32["bwd_dq"])
_BWD_DKDV = _tuner(_bwd_dkdv_kernel, CONFIGS["bwd_dkdv"])
_BWD_DKDV_FP32 = _tuner(_bwd_dkdv_kernel, CONFIGS_FP32["bwd_dkdv"])


def _tuner_for(name: str, fp32: bool):
    """The autotuned kernel ``name`` for fp32 or for fp16/bf16 operands. (Named globals, not a dict comprehension:
    torch.library finds a triton_op's kernels by reading its source, for torch.compile's cache keys.)"""
    tuners = {
        "fwd": (_FWD, _FWD_FP32),
        "bwd_fused": (_BWD_FUSED, None),
        "bwd_dq": (_BWD_DQ, _BWD_DQ_FP32),
        "bwd_dkdv": (_BWD_DKDV, _BWD_DKDV_FP32),
    }
    return tuners[name][fp32]


# triton.jit turned the kernels into interpreted functions when this was set at import.
_INTERPRETED = interpreting()
_forced: dict[str, int] = {}


def tiling(n: int, dtype: torch.dtype) -> tuple[int, int, bool]:
    """``(BLOCK, TAIL, fused)`` for a sequence of ``n`` tokens.

    Full tiles are BLOCK long; the ``n mod BLOCK`` leftover rows/keys form one TAIL tile (a power of two >= 16);
    ``fused``: the whole sequence fits one tile and the backward runs as one kernel.
    """
    block = BLOCK_32 if dtype == torch.float32 else BLOCK_16
    rest = n % block or block
    tail = max(16, triton.next_power_of_2(rest))
    return block, tail, n <= block and dtype != torch.float32


@contextlib.contextmanager
def force_config(**index: int) -> Iterator[None]:
    """Launch the named kernels with config ``index`` of their candidate list instead of the autotuner's pick.

    Names: ``fwd``, ``bwd_fused``, ``bwd_dq``, ``bwd_dkdv``; e.g. ``force_config(fwd=1)``.
    """
    unknown = set(index) - set(CONFIGS)
    if unknown:
        raise ValueError(f"unknown kernel names {sorted(unknown)}")
    prev = dict(_forced)
    _forced.update(index)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(prev)


def _launch(name: str, dtype: torch.dtype, grid, args: tuple, consts: dict) -> None:
    """Launch kernel ``name`` autotuned, or with its forced / first config without benchmarking."""
    tuner = _tuner_for(name, dtype == torch.float32)
    index = _forced.get(name)
    if index is None and not _INTERPRETED:
        wrap_triton(tuner)[grid](*args, **consts)
        return
    cfg = tuner.configs[min(index or 0, len(tuner.configs) - 1)]
    if not _INTERPRETED:
        wrap_triton(tuner.fn)[grid](*args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif not launch_skipped(*args):
        tuner.fn[grid](*args, **consts)


def _consts(dtype: torch.dtype, head_dim: int) -> dict:
    """The constexprs of the tiled kernels (the fused one takes no EXACT_P: it runs fp16/bf16 only)."""
    exact = dtype == torch.float32
    precision = "tf32x3" if exact else "tf32"  # tf32 is unused by fp16/bf16 dots
    return {"HEAD_DIM": head_dim, "D_PAD": triton.next_power_of_2(head_dim), "PRECISION": precision, "EXACT_P": exact}


def _shape_limit(qkv: torch.Tensor, num_heads: int) -> str | None:
    """What the kernels cannot take of a well-formed ``qkv [B, N, 3·H·d]`` the eager op can, or None."""
    _, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        return f"head dim d = {three_hd} / (3 * {num_heads}) = {d} must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if n * max(qkv.stride(1), three_hd) >= 2**31:
        return f"qkv with N = {n} tokens of row stride {qkv.stride(1)} overflows the kernels' int32 offsets"
    return None


def unsupported(qkv, num_heads, scale=None) -> str | None:
    """Why :func:`attention` does not take arguments the eager op accepts (a head dim outside [16, 128], a
    sequence past int32 offsets, float64), from shapes and dtypes alone; None when it does or when they are
    malformed (both then raise)."""
    reason = unsupported_float(qkv=qkv)
    if reason is not None or not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        return reason
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        return None
    if qkv.shape[-1] % (3 * num_heads) != 0 or qkv.shape[1] < 1:
        return None
    return _shape_limit(qkv, num_heads)


def _check(qkv, num_heads, scale) -> float:
    """Raise a clear TypeError/ValueError for arguments the kernels do not take; return the scale."""
    check_float("qkv", qkv)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D [B, N, 3·H·d], got shape {tuple(qkv.shape)}")
    b, n, three_hd = qkv.shape
    if three_hd % (3 * num_heads) != 0:
        raise ValueError(f"qkv's last dim {three_hd} must be divisible by 3 * num_heads = {3 * num_heads}")
    d = three_hd // (3 * num_heads)
    if n < 1:
        raise ValueError(f"qkv must hold at least one token (N >= 1), got shape {tuple(qkv.shape)}")
    limit = _shape_limit(qkv, num_heads)
    if limit is not None:
        raise ValueError(limit)
    check_device("qkv", qkv, _INTERPRETED)
    if scale is None:
        return d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _launch_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out ``[B, N, H·d]`` and the fp32 softmax statistics ``[B, H, S, N]`` of validated, unit-stride ``qkv``:
    S = 2 rows (m, l) for fp32 qkv, else S = 1 row, the base-2 logsumexp (see the module's math)."""
    b, n, three_hd = qkv.shape
    h, d = num_heads, three_hd // (3 * num_heads)
    consts = _consts(qkv.dtype, d)
    out = empty(b, n, h * d, dtype=qkv.dtype, device=qkv.device)  # [B, N, H·d]
    stats = empty(b, h, 1 + consts["EXACT_P"], n, dtype=torch.float32, device=qkv.device)  # [B, H, S, N]
    if b > 0:
        block, tail, _ = tiling(n, qkv.dtype)
        strides = (qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1))
        args = (qkv, out, stats, n, h, *strides, scale, scale * LOG2E)
        grid = (b * h * triton.cdiv(n, block),)
        _launch("fwd", qkv.dtype, grid, args, {**consts, "BLOCK": block, "TAIL": tail})
    return out, stats


def _launch_bwd(
    qkv: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, dout: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """dqkv ``[B, N, 3·H·d]`` from the forward's qkv, out, stats and a unit-stride ``dout [B, N, H·d]``."""
    b, n, three_hd = qkv.shape
    h, d = num_heads, three_hd // (3 * num_heads)
    dqkv = empty(b, n, three_hd, dtype=qkv.dtype, device=qkv.device)  # [B, N, 3·H·d]
    if b == 0:
        return dqkv
    block, tail, fused = tiling(n, qkv.dtype)
    consts = _consts(qkv.dtype, d)
    strides = (qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1))
    if fused:
        args = (qkv, stats, dout, dqkv, n, h, *strides, scale, scale * LOG2E)
        del consts["EXACT_P"]  # False: fused only in fp16/bf16
        _launch("bwd_fused", qkv.dtype, (b * h,), args, {**consts, "BLOCK": tail})
        return dqkv
    consts.update(BLOCK=block, TAIL=tail)
    grid = (b * h * triton.cdiv(n, block),)
    delta = empty(b, h, n, dtype=torch.float32, device=qkv.device)  # [B, H, N]
    args = (qkv, out, stats, dout, delta, dqkv, n, h, *strides[:2], out.stride(0), out.stride(1), *strides[2:])
    _launch("bwd_dq", qkv.dtype, grid, (*args, scale, scale * LOG2E), consts)
    args = (qkv, stats, dout, delta, dqkv, n, h, *strides, scale, scale * LOG2E)
    _launch("bwd_dkdv", qkv.dtype, grid, args, consts)
    return dqkv


class AttentionFunction(torch.autograd.Function):
    """Autograd of the fused op on unit-stride ``qkv``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
        out, stats = attention_fwd(qkv, num_heads, scale)
        ctx.save_for_backward(qkv, out, stats)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout: torch.Tensor):
        qkv, out, stats = ctx.saved_tensors
        if dout.stride(-1) != 1 or dout.dtype != qkv.dtype:
            dout = dout.to(qkv.dtype).contiguous()
        return attention_bwd(qkv, out, stats, dout, ctx.num_heads, ctx.scale), None, None


# Torch integration (see fastmae.kernels._common.register_op): each op is a torch.library.triton_op, which gives
# torch.compile a traceable op with an automatic fake implementation (no graph break) that Inductor decomposes into
# the Triton kernels themselves (it schedules and autotunes them), while AttentionFunction keeps autograd and AMP
# (custom_fwd/custom_bwd) in the form every fastmae kernel uses. Under TRITON_INTERPRET=1 the same bodies are opaque
# custom_ops, so torch.compile (e.g. backend="aot_eager") still captures one graph, and the autotuner is bypassed
# (first config, or the one forced by force_config).
attention_fwd = register_op("fastmae::attention_fwd")(_launch_fwd)
attention_bwd = register_op("fastmae::attention_bwd")(_launch_bwd)


def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Multi-head self-attention from the packed qkv projection; the fused form of ``fastmae.reference.attention``.

    Args:
        qkv: ``[B, N, 3·H·d]`` float32/float16/bfloat16 on CUDA (or the CPU under ``TRITON_INTERPRET=1``), the
            qkv Linear's output viewed as ``[B, N, 3, H, d]``; 16 <= d <= 128, N >= 1. Read in place (a copy is
            made only when its last dim is not unit-stride). Under CUDA autocast float32 is cast to its dtype.
        num_heads: H >= 1.
        scale: the logit scale, ``d ** -0.5`` when None.

    Returns:
        ``[B, N, H·d]`` = softmax(q·kᵀ·scale)·v per head, heads concatenated (the proj Linear's input layout), in
        qkv's dtype. Differentiable with respect to qkv.
    """
    scale = _check(qkv, num_heads, scale)
    if qkv.is_cuda and qkv.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        qkv = qkv.to(torch.get_autocast_dtype("cuda"))  # as autocast runs SDPA and matmuls: in its dtype
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return AttentionFunction.apply(qkv, num_heads, scale)
