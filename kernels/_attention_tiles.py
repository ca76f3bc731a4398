"""Device helpers of the attention kernels (``fastmae.kernels.attention``, whose docstring has the math): tile
loads and stores of a head's ``[N, d]`` slices, the softmax statistics the forward saves, the logits and
probabilities in the fp16/bf16 (base-2, lse) and the fp32 (``EXACT_P``: natural units, m and l) forms, and the
one-tile steps of the forward's, dq's and dk/dv's loops.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(base, rows, stride, n, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASK_ROWS: tl.constexpr):
    """``[len(rows), D_PAD]`` tile of a row-major ``[n, HEAD_DIM]`` slice with row stride ``stride``; 0 outside."""
    offs_d = tl.arange(0, D_PAD)
    mask = offs_d[None, :] < HEAD_DIM
    if MASK_ROWS:
        mask = mask & (rows[:, None] < n)
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(base, rows, stride, n, x, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    offs_d = tl.arange(0, D_PAD)
    mask = (rows[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride + offs_d[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def store_stats(stats_ptr, rows, N, m_i, l_i, EXACT_P: tl.constexpr):
    """The rows' softmax statistics: m and l (EXACT_P), else lse = m + log2(l)."""
    if EXACT_P:
        tl.store(stats_ptr + rows, m_i, mask=rows < N)
        tl.store(stats_ptr + N + rows, l_i, mask=rows < N)
    else:
        tl.store(stats_ptr + rows, m_i + tl.math.log2(l_i), mask=rows < N)


@triton.jit
def load_stats(stats_ptr, rows, N, MASK: tl.constexpr, EXACT_P: tl.constexpr):
    """``(shift, inv_l)`` of the rows: (m, 1/l) if EXACT_P, p = e^(s − m) / l; else (lse, 1), p = 2^(s − lse)."""
    if MASK:
        shift = tl.load(stats_ptr + rows, mask=rows < N, other=0.0)
    else:
        shift = tl.load(stats_ptr + rows)
    if EXACT_P:
        if MASK:
            inv_l = 1.0 / tl.load(stats_ptr + N + rows, mask=rows < N, other=1.0)
        else:
            inv_l = 1.0 / tl.load(stats_ptr + N + rows)
    else:
        inv_l = tl.full(rows.shape, 1.0, tl.float32)  # unused by probs
    return shift, inv_l


@triton.jit
def scores(q, k, qk_scale, PRECISION: tl.constexpr, EXACT_P: tl.constexpr):
    """``[ROWS, COLS]`` logits of a q and a k tile: EXACT_P: q·kᵀ of q pre-scaled by ``scale`` (natural units), else
    (q·kᵀ)·qk_scale (base 2)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if not EXACT_P:
        s = s * qk_scale
    return s


@triton.jit
def softmax_exp(x, EXACT_P: tl.constexpr):
    """e^x of natural-unit x (EXACT_P), else 2^x."""
    if EXACT_P:
        return tl.math.exp2(x * 1.4426950408889634)
    return tl.math.exp2(x)


@triton.jit
def probs(s, shift, inv_l, EXACT_P: tl.constexpr):
    """p of ``[ROWS, COLS]`` logits s from per-row ``[ROWS]`` statistics (see ``load_stats``)."""
    p = softmax_exp(s - shift[:, None], EXACT_P)
    if EXACT_P:
        p = p * inv_l[:, None]
    return p


@triton.jit
def fwd_step(
    q, m_i, l_i, acc, k_ptr, v_ptr, start, N, stride, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    COLS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax: updated (m_i, l_i, acc)."""
    cols = start + tl.arange(0, COLS)
    k = load_tile(k_ptr, cols, stride, N, HEAD_DIM, D_PAD, MASK)  # [COLS, D_PAD]
    v = load_tile(v_ptr, cols, stride, N, HEAD_DIM, D_PAD, MASK)
    s = scores(q, k, qk_scale, PRECISION, EXACT_P)  # [ROWS, COLS]
    if MASK:
        s = tl.where(cols[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = softmax_exp(m_i - m_new, EXACT_P)
    p = softmax_exp(s - m_new[:, None], EXACT_P)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def dq_step(
    q, do, shift, inv_l, delta, dq, k_ptr, v_ptr, start, N, stride, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    COLS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """dq += ds · k over one key tile."""
    cols = start + tl.arange(0, COLS)
    k = load_tile(k_ptr, cols, stride, N, HEAD_DIM, D_PAD, MASK)  # [COLS, D_PAD]
    v = load_tile(v_ptr, cols, stride, N, HEAD_DIM, D_PAD, MASK)
    s = scores(q, k, qk_scale, PRECISION, EXACT_P)  # [ROWS, COLS], as the forward formed them
    p = probs(s, shift, inv_l, EXACT_P)
    if MASK:
        p = tl.where(cols[None, :] < N, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None]) * scale
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def dkdv_step(
    k, v, dk, dv, q_ptr, do_ptr, stats_ptr, delta_ptr, start, N, stride_qkv_n, stride_do_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    ROWS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """dv += pᵀ · dout and dk += dsᵀ · q over one query tile. EXACT_P: the scores in the forward's orientation,
    queries as rows, then pᵀ and dsᵀ transposed for their dots; else transposed scores (keys as rows)."""
    rows = start + tl.arange(0, ROWS)
    q = load_tile(q_ptr, rows, stride_qkv_n, N, HEAD_DIM, D_PAD, MASK)  # [ROWS, D_PAD]
    do = load_tile(do_ptr, rows, stride_do_n, N, HEAD_DIM, D_PAD, MASK)
    shift, inv_l = load_stats(stats_ptr, rows, N, MASK, EXACT_P)
    if MASK:
        delta = tl.load(delta_ptr + rows, mask=rows < N, other=0.0)
    else:
        delta = tl.load(delta_ptr + rows)
    if EXACT_P:
        s = scores(q * scale, k, qk_scale, PRECISION, EXACT_P)  # [ROWS, COLS], as the forward formed them
        p = probs(s, shift, inv_l, EXACT_P)
        if MASK:
            p = tl.where(rows[:, None] < N, p, 0.0)
        dv = tl.dot(tl.trans(p).to(q.dtype), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=PRECISION)
        return dk, dv
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [COLS, ROWS]
    p_t = tl.math.exp2(s_t - shift[None, :])
    if MASK:
        p_t = tl.where(rows[None, :] < N, p_t, 0.0)
    dv = tl.dot(p_t.to(q.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :]) * scale
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv
