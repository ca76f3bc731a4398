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
far above these effects, and keep the cheaper base-2 form: no extra stats. Every backward kernel forms the scores
in the forward's orientation (fp16/bf16 too: their per-row statistics are then row vectors, two registers a thread).

* N <= 64 in fp16/bf16 (the ViT-B/L encoder's 50 tokens): ``_bwd_fused_kernel``, one program per (b, h) holds the
  whole head in one tile and does the five dots once; Delta = rowsum(p ∘ dp), so ``out`` is not even read.
* 64 < N <= 256, d <= 32 in fp16/bf16 (the ViT-B/L decoder's 197 tokens): ``_bwd_kernel``, one program per (b, h)
  in one pass: Delta of every row from ``dout ∘ out`` (stored to an fp32 ``[B, H, N]`` buffer and read back by the
  program), then a loop over key tiles, each through every query tile (statically unrolled, at most 4) with the
  five dots once, dk and dv of the key tile stored after it, dq of every query tile held in registers to the end.
  S and P are formed once per tile pair (two kernels form them twice: 7 dots, twice the exponentials), qkv, dout
  and out are read from DRAM once. Longer N would hold more dq than fits (5 tiles spilled); d = 64/80 too.
* otherwise (and fp32, and wherever ``$FASTMAE_ATTENTION_BWD=split``): ``_bwd_dq_kernel`` (one program per query
  tile: Delta for its rows, stored to the buffer, then dq over all key tiles), then ``_bwd_dkdv_kernel`` (one program
  per key tile, looping over query tiles, reading Delta). dq is recomputed rather than accumulated across programs.
Every element of out, stats, Delta and dqkv is written by exactly one program, in a fixed order: no atomics, and
results are bitwise deterministic run to run.

Tiling (``tiling``): full tiles of BLOCK = 64 rows/keys (32 in fp32), then ONE tail tile of TAIL = the leftover
``N mod BLOCK`` rounded up to a power of two >= 16, both in the owned dimension (the last program of a head runs
the TAIL-row code path) and in the loop dimension (a masked last step). MAE's sequences are 1 token past a tile
(65 = 64 + 1, 257 = 256 + 1) or 5 past (197), so a 16-wide tail instead of a 64/128-wide one cuts the padded
work: 257 tokens cost 272² score entries rather than 320² (64 tiles) or 384² (128 tiles); 65 cost 80², not 128².
Full tiles skip the row masks. N <= 64 runs as one tile of next_pow2(N) >= 16 (N = 64: one full tile).

Head dim (``column_groups``): a tile is NG column groups of DG columns (``fastmae.kernels._attention_tiles``): one
group of next_pow2(d) (d < DG masked), or, where that pads more, equal groups of the largest power of two dividing d:
ViT-H/14's d = 80 is 5 groups of 16, so its dots do 80-wide products rather than 128-wide ones (37.5% of their MMA
work was on zero padding).

Constraints: head dim d in [16, 128] (ViT-H/14's 80 included). Any N >= 1: rows and keys past N are masked (logits
to -inf in the forward, p to 0 in the backward). A 1-D grid with a head's tiles adjacent, so its k and v stay in L2
while they run, and B·H is not limited by CUDA's 65535 cap on grid dims 1 and 2. int64 batch offsets.

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
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastmae.kernels._attention_tiles import (
    dkdv_cols,
    dot_cols,
    dot_d,
    dq_rows,
    fwd_rows,
    key_pass,
    load_tile,
    store_delta,
    store_tile,
    zeros_tile,
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
def _fwd_kernel(
    QKV, Out, Stats, N, H, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
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
    if TAIL == 0 or (tile + 1) * BLOCK <= N:
        fwd_rows(
            q_ptr, o_ptr, stats_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_out_n, scale, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, TAIL, BLOCK, False,
        )  # fmt: skip
    else:
        fwd_rows(
            q_ptr, o_ptr, stats_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_out_n, scale, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, TAIL, TAIL, True,
        )  # fmt: skip


@triton.jit
def _bwd_fused_kernel(
    QKV, Stats, DOut, DQKV, N, H, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """dq, dk, dv of one (b, h) whose N <= BLOCK tokens fit one tile; grid ``(B·H,)``."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    q_ptr = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    dqkv_ptr = DQKV + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
    do_ptr = DOut + b.to(tl.int64) * stride_do_b + h * HEAD_DIM
    idx = tl.arange(0, BLOCK)
    q = load_tile(q_ptr, idx, stride_qkv_n, N, HEAD_DIM, DG, NG, True)  # [BLOCK, d]
    k = load_tile(q_ptr + H * HEAD_DIM, idx, stride_qkv_n, N, HEAD_DIM, DG, NG, True)
    v = load_tile(q_ptr + 2 * H * HEAD_DIM, idx, stride_qkv_n, N, HEAD_DIM, DG, NG, True)
    do = load_tile(do_ptr, idx, stride_do_n, N, HEAD_DIM, DG, NG, True)
    lse = tl.load(Stats + bh.to(tl.int64) * N + idx, mask=idx < N, other=0.0)  # fp16/bf16: S = 1, lse

    s = dot_d(q, k, PRECISION) * qk_scale  # [BLOCK(q), BLOCK(k)]
    valid = (idx[:, None] < N) & (idx[None, :] < N)
    p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = dot_d(do, v, PRECISION)
    delta = tl.sum(p * dp, 1)
    ds = (p * (dp - delta[:, None]) * scale).to(q[0].dtype)
    dv = dot_cols(tl.trans(p.to(q[0].dtype)), do, PRECISION)  # [BLOCK, d]
    store_tile(dqkv_ptr + 2 * H * HEAD_DIM, idx, stride_dqkv_n, N, dv, HEAD_DIM)
    dk = dot_cols(tl.trans(ds), q, PRECISION)
    store_tile(dqkv_ptr + H * HEAD_DIM, idx, stride_dqkv_n, N, dk, HEAD_DIM)
    dq = dot_cols(ds, k, PRECISION)
    store_tile(dqkv_ptr, idx, stride_dqkv_n, N, dq, HEAD_DIM)


@triton.jit
def _bwd_kernel(
    QKV, Out, Stats, DOut, Delta, DQKV, N, H, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, Q_TILES: tl.constexpr,
):  # fmt: skip
    """dq, dk, dv of one (b, h) in one pass (fp16/bf16, Q_TILES·BLOCK + up to TAIL tokens): Delta of every query
    row first, then a loop over key tiles, each through every query tile, dq of all of them held; grid ``(B·H,)``."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    q_ptr = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    o_ptr = Out + b.to(tl.int64) * stride_out_b + h * HEAD_DIM
    do_ptr = DOut + b.to(tl.int64) * stride_do_b + h * HEAD_DIM
    dq_ptr = DQKV + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
    lse_ptr = Stats + bh.to(tl.int64) * N
    delta_ptr = Delta + bh.to(tl.int64) * N
    dq = ()
    for t in tl.static_range(Q_TILES):
        store_delta(o_ptr, do_ptr, delta_ptr, t * BLOCK, N, stride_out_n, stride_do_n, HEAD_DIM, DG, NG, BLOCK, False)
        dq = dq + (zeros_tile(BLOCK, DG, NG),)
    tail = ()
    if TAIL > 0:
        row0 = Q_TILES * BLOCK
        do = store_delta(o_ptr, do_ptr, delta_ptr, row0, N, stride_out_n, stride_do_n, HEAD_DIM, DG, NG, TAIL, True)
        tail = (load_tile(q_ptr, row0 + tl.arange(0, TAIL), stride_qkv_n, N, HEAD_DIM, DG, NG, True), do)
        dq = dq + (zeros_tile(TAIL, DG, NG),)
    tl.debug_barrier()  # Delta, stored by some threads, is read by others
    dk_ptr = DQKV + b.to(tl.int64) * stride_dqkv_b + (H + h) * HEAD_DIM
    for start in range(0, Q_TILES * BLOCK, BLOCK):
        dq = key_pass(
            q_ptr, do_ptr, dk_ptr, lse_ptr, delta_ptr, start, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n, dq, tail,
            scale, qk_scale, HEAD_DIM, DG, NG, PRECISION, BLOCK, Q_TILES, BLOCK, False,
        )  # fmt: skip
    if TAIL > 0:
        dq = key_pass(
            q_ptr, do_ptr, dk_ptr, lse_ptr, delta_ptr, Q_TILES * BLOCK, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n,
            dq, tail, scale, qk_scale, HEAD_DIM, DG, NG, PRECISION, BLOCK, Q_TILES, TAIL, True,
        )  # fmt: skip
    for t in tl.static_range(len(dq)):
        store_tile(dq_ptr, t * BLOCK + tl.arange(0, dq[t][0].shape[0]), stride_dqkv_n, N, dq[t], HEAD_DIM)


@triton.jit
def _bwd_dq_kernel(
    QKV, Out, Stats, DOut, Delta, DQKV, N, H, stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
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
    if TAIL == 0 or (tile + 1) * BLOCK <= N:
        dq_rows(
            q_ptr, o_ptr, do_ptr, dq_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H,
            stride_qkv_n, stride_out_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, TAIL, BLOCK, False,
        )  # fmt: skip
    else:
        dq_rows(
            q_ptr, o_ptr, do_ptr, dq_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H,
            stride_qkv_n, stride_out_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, TAIL, TAIL, True,
        )  # fmt: skip


@triton.jit
def _bwd_dkdv_kernel(
    QKV, Stats, DOut, Delta, DQKV, N, H, stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n,
    stride_dqkv_b, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
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
    if TAIL == 0 or (tile + 1) * BLOCK <= N:
        dkdv_cols(
            q_ptr, do_ptr, dk_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n,
            scale, qk_scale, HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, TAIL, BLOCK, False,
        )  # fmt: skip
    else:
        dkdv_cols(
            q_ptr, do_ptr, dk_ptr, stats_ptr, delta_ptr, tile * BLOCK, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n,
            scale, qk_scale, HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, TAIL, TAIL, True,
        )  # fmt: skip


def _opts(num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({}, num_warps=num_warps, num_stages=num_stages)


# Tuning (H100, bf16, not yet measured on a GPU): B·H is in the thousands (batch 256, 12..16 heads), so per-head
# parallelism is ample and tiles are sized to the sequence, not for long-sequence reuse. 64-row tiles map onto one
# Hopper warpgroup's wgmma (m64). Autotune candidates (keyed on N, d and dtype) differ only in launch options, so the
# tiling is fixed by N and results do not depend on which candidate wins: 4 warps (one warpgroup) or 8; 2 stages
# where a loop over full tiles exists, to prefetch the next k/v (or q/dout) tile while the current one is in the
# tensor cores. 8 warps buy little with 64-row tiles: Triton gives a dot whose result feeds another (the scores) all
# warps along its 64 rows, so both warpgroups compute the same scores (sm_90 compile: the one-pass backward at 8 warps
# took as many registers as at 4 and twice the wgmma). The one-pass backward is therefore 4 warps only, and so is
# every kernel at a grouped head dim (``CONFIGS_GROUPED``). With 16-byte aligned rows (3·H·d and H·d multiples of 8)
# main-loop loads are 128-bit vectors; ptxas reports no spill for any fp16/bf16 config at MAE's shapes (benches/
# STATIC.md). The one-pass backward takes ~250 registers (2 CTAs per SM) where the two kernels take ~125 and ~155:
# it holds dq of every query tile; at 5 query tiles (N = 257) it spilled (20-110 B in every variant tried), so
# N <= 256 runs it. fp32 uses one small config per kernel (32-wide tiles; its operands take twice the shared memory).
CONFIGS = {
    "fwd": [_opts(4, 2), _opts(8, 2)],
    "bwd_fused": [_opts(4, 1), _opts(8, 1)],
    "bwd": [_opts(4, 2), _opts(4, 1)],
    "bwd_dq": [_opts(4, 2), _opts(8, 2)],
    "bwd_dkdv": [_opts(4, 2), _opts(8, 2)],
}
# A head dim of several column groups (ViT-H/14's 80: 5 x 16): one warpgroup. 8 warps spread a [64, 16] group's
# 2 KB over 256 threads, 8-byte loads.
CONFIGS_GROUPED = {name: [c for c in cfgs if c.num_warps == 4] for name, cfgs in CONFIGS.items()}
# fp32 (3xTF32 dots on fp32 operands: twice the shared memory, three MMAs per product): one config, small tiles.
CONFIGS_FP32 = {"fwd": [_opts(4, 1)], "bwd_dq": [_opts(4, 1)], "bwd_dkdv": [_opts(8, 1)]}
BLOCK_16, BLOCK_32 = 64, 32  # full tile of the fp16/bf16 and of the fp32 kernels
ONE_PASS_TILES, ONE_PASS_DIM = 4, 32  # the one-pass backward: at most 4 query tiles (N <= 256), d <= 32
BWD_ENV = "FASTMAE_ATTENTION_BWD"  # "split": the two-kernel backward wherever the one-pass one would run


def _tuner(fn, configs: list[triton.Config]):
    return triton.autotune(configs=configs, key=["N", "HEAD_DIM", "TAIL"])(fn)


_FWD = _tuner(_fwd_kernel, CONFIGS["fwd"])
_FWD_GROUPED = _tuner(_fwd_kernel, CONFIGS_GROUPED["fwd"])
_FWD_FP32 = _tuner(_fwd_kernel, CONFIGS_FP32["fwd"])
_BWD_FUSED = _tuner(_bwd_fused_kernel, CONFIGS["bwd_fused"])
_BWD_FUSED_GROUPED = _tuner(_bwd_fused_kernel, CONFIGS_GROUPED["bwd_fused"])
_BWD = _tuner(_bwd_kernel, CONFIGS["bwd"])
_BWD_DQ = _tuner(_bwd_dq_kernel, CONFIGS["bwd_dq"])
_BWD_DQ_GROUPED = _tuner(_bwd_dq_kernel, CONFIGS_GROUPED["bwd_dq"])
_BWD_DQ_FP32 = _tuner(_bwd_dq_kernel, CONFIGS_FP32["bwd_dq"])
_BWD_DKDV = _tuner(_bwd_dkdv_kernel, CONFIGS["bwd_dkdv"])
_BWD_DKDV_GROUPED = _tuner(_bwd_dkdv_kernel, CONFIGS_GROUPED["bwd_dkdv"])
_BWD_DKDV_FP32 = _tuner(_bwd_dkdv_kernel, CONFIGS_FP32["bwd_dkdv"])


def _tuner_for(name: str, kind: str):
    """The autotuned kernel ``name`` for operands of ``kind``: ``"16"`` (fp16/bf16), ``"grouped"`` (fp16/bf16 with
    a head dim of several column groups) or ``"fp32"``. (Named globals, not a dict comprehension: torch.library
    finds a triton_op's kernels by reading its source, for torch.compile's cache keys.)"""
    tuners = {
        "fwd": {"16": _FWD, "grouped": _FWD_GROUPED, "fp32": _FWD_FP32},
        "bwd_fused": {"16": _BWD_FUSED, "grouped": _BWD_FUSED_GROUPED},
        "bwd": {"16": _BWD},
        "bwd_dq": {"16": _BWD_DQ, "grouped": _BWD_DQ_GROUPED, "fp32": _BWD_DQ_FP32},
        "bwd_dkdv": {"16": _BWD_DKDV, "grouped": _BWD_DKDV_GROUPED, "fp32": _BWD_DKDV_FP32},
    }
    return tuners[name][kind]


# triton.jit turned the kernels into interpreted functions when this was set at import.
_INTERPRETED = interpreting()
_forced: dict[str, int] = {}


class Tiling(NamedTuple):
    """How a sequence is cut (see ``tiling``)."""

    block: int  # rows/keys of a full tile
    tail: int  # rows/keys of the masked last tile (a power of two >= 16), 0 when block divides N
    full: int  # number of full tiles
    backward: str  # "fused" (one tile), "one_pass" (``_bwd_kernel``) or "split" (``_bwd_dq/dkdv_kernel``)


def tiling(n: int, dtype: torch.dtype, head_dim: int) -> Tiling:
    """The tiles of a sequence of ``n`` tokens: ``n // block`` full tiles, then the ``n mod block`` leftover
    rows/keys as one tail tile; and the backward's kernels (see the module's docstring), ``$FASTMAE_ATTENTION_BWD``
    = ``split`` taking the two-kernel one where the one-pass one would run."""
    block = BLOCK_32 if dtype == torch.float32 else BLOCK_16
    full, rest = divmod(n, block)
    tail = max(16, triton.next_power_of_2(rest)) if rest else 0
    backward = "split"
    if dtype != torch.float32 and n <= block:
        backward = "fused"
    elif dtype != torch.float32 and full + (tail > 0) <= ONE_PASS_TILES and head_dim <= ONE_PASS_DIM:
        backward = "split" if _split_requested() else "one_pass"
    return Tiling(block, tail, full, backward)


def _split_requested() -> bool:
    path = os.environ.get(BWD_ENV, "")
    if path not in ("", "auto", "split"):
        raise ValueError(f"${BWD_ENV} must be 'auto' or 'split', got {path!r}")
    return path == "split"


def column_groups(head_dim: int) -> tuple[int, int]:
    """``(DG, NG)``: a head's columns as NG groups of DG (see ``fastmae.kernels._attention_tiles``): one group of
    the next power of two, unless NG equal groups of the largest power of two dividing d (at least 16) pad less."""
    full = max(16, triton.next_power_of_2(head_dim))
    width = max(16, head_dim & -head_dim)
    count = triton.cdiv(head_dim, width)
    return (width, count) if width * count < full else (full, 1)


@contextlib.contextmanager
def force_config(**index: int) -> Iterator[None]:
    """Launch the named kernels with config ``index`` of their candidate list instead of the autotuner's pick.

    Names: ``fwd``, ``bwd_fused``, ``bwd``, ``bwd_dq``, ``bwd_dkdv``; e.g. ``force_config(fwd=1)``.
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
    kind = "fp32" if dtype == torch.float32 else "grouped" if consts["NG"] > 1 else "16"
    tuner = _tuner_for(name, kind)
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
    """The constexprs every kernel takes (the fused and one-pass backward no EXACT_P: they run fp16/bf16 only)."""
    exact = dtype == torch.float32
    precision = "tf32x3" if exact else "tf32"  # tf32 is unused by fp16/bf16 dots
    width, count = column_groups(head_dim)
    return {"HEAD_DIM": head_dim, "DG": width, "NG": count, "PRECISION": precision, "EXACT_P": exact}


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
        tiles = tiling(n, qkv.dtype, d)
        strides = (qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1))
        args = (qkv, out, stats, n, h, *strides, scale, scale * LOG2E)
        grid = (b * h * triton.cdiv(n, tiles.block),)
        _launch("fwd", qkv.dtype, grid, args, {**consts, "BLOCK": tiles.block, "TAIL": tiles.tail})
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
    tiles = tiling(n, qkv.dtype, d)
    consts = _consts(qkv.dtype, d)
    strides = (qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), dout.stride(0), dout.stride(1))
    strides += (dqkv.stride(0), dqkv.stride(1))
    qk_scale = scale * LOG2E
    if tiles.backward == "fused":
        args = (qkv, stats, dout, dqkv, n, h, *strides[:2], *strides[4:], scale, qk_scale)
        del consts["EXACT_P"]  # False: fp16/bf16 only
        _launch("bwd_fused", qkv.dtype, (b * h,), args, {**consts, "BLOCK": tiles.tail or tiles.block})
        return dqkv
    consts.update(BLOCK=tiles.block, TAIL=tiles.tail)
    delta = empty(b, h, n, dtype=torch.float32, device=qkv.device)  # [B, H, N]
    args = (qkv, out, stats, dout, delta, dqkv, n, h, *strides, scale, qk_scale)
    if tiles.backward == "one_pass":
        del consts["EXACT_P"]  # False: fp16/bf16 only
        _launch("bwd", qkv.dtype, (b * h,), args, {**consts, "Q_TILES": tiles.full})
        return dqkv
    grid = (b * h * triton.cdiv(n, tiles.block),)
    _launch("bwd_dq", qkv.dtype, grid, args, consts)
    args = (qkv, stats, dout, delta, dqkv, n, h, *strides[:2], *strides[4:], scale, qk_scale)
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
