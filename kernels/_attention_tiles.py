"""Device helpers of the attention kernels (``fastmae.kernels.attention``, whose docstring has the math): tile
loads and stores of a head's ``[N, d]`` slices, the softmax statistics the forward saves, the logits and
probabilities in the fp16/bf16 (base-2, lse) and the fp32 (``EXACT_P``: natural units, m and l) forms, the
one-tile steps of the forward's, dq's and dk/dv's loops and the rows those loops own, and the key-tile pass of the
one-pass backward.

A ``[rows, d]`` tile is a tuple of NG column groups of DG columns each (``column_groups`` in the kernel module):
one ``[rows, DG]`` tensor when d is a power of two (or pads to one as cheaply: d < DG masked), else several equal
ones, so that no dot multiplies padding: ViT-H/14's d = 80 is 5 groups of 16, not 128 columns of which 48 are zero.
A product over the head dim chains one dot per group into one accumulator (``dot_d``: K = 16 is one MMA step, so
the chain is the K = 80 product); a product into it runs one dot per group (``dot_acc``), all of one width, so one
register layout serves every group (64 + 16 groups took more registers: two MMA layouts, p and ds converted for
each).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_cols(base, rows, stride, n, C0: tl.constexpr, C: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_ROWS):
    """Columns ``C0 .. C0+C-1`` of the rows; 0 past ``HEAD_DIM`` and, if MASK_ROWS, in rows >= n."""
    offs = C0 + tl.arange(0, C)
    ptrs = base + rows[:, None] * stride + offs[None, :]
    if MASK_ROWS:
        mask = rows[:, None] < n
        if C0 + C > HEAD_DIM:
            mask = mask & (offs[None, :] < HEAD_DIM)
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif C0 + C > HEAD_DIM:
        x = tl.load(ptrs, mask=offs[None, :] < HEAD_DIM, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def load_tile(
    base, rows, stride, n, HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, MASK_ROWS: tl.constexpr
):
    """The ``[len(rows), d]`` tile (NG groups of DG columns) of a row-major ``[n, HEAD_DIM]`` slice with row stride
    ``stride``; 0 outside it."""
    x = ()
    for g in tl.static_range(NG):
        x = x + (_load_cols(base, rows, stride, n, g * DG, DG, HEAD_DIM, MASK_ROWS),)
    return x


@triton.jit
def store_tile(base, rows, stride, n, x, HEAD_DIM: tl.constexpr):
    """Store the tile ``x`` (column groups) to rows < n, columns < HEAD_DIM, in the slice's dtype."""
    for g in tl.static_range(len(x)):
        offs = g * x[g].shape[1] + tl.arange(0, x[g].shape[1])
        mask = (rows[:, None] < n) & (offs[None, :] < HEAD_DIM)
        tl.store(base + rows[:, None] * stride + offs[None, :], x[g].to(base.dtype.element_ty), mask=mask)


@triton.jit
def zeros_tile(ROWS: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr):
    """An fp32 ``[ROWS, d]`` accumulator of zeros."""
    x = ()
    for _ in tl.static_range(NG):
        x = x + (tl.zeros([ROWS, DG], tl.float32),)
    return x


@triton.jit
def scale_tile(x, c):
    """``x · c`` with ``c`` a scalar or a ``[rows, 1]`` column."""
    out = ()
    for g in tl.static_range(len(x)):
        out = out + (x[g] * c,)
    return out


@triton.jit
def dot_d(a, b, PRECISION: tl.constexpr):
    """``a · bᵀ`` over the head dim of two tiles: ``[rows(a), rows(b)]``, fp32."""
    s = tl.dot(a[0], tl.trans(b[0]), input_precision=PRECISION)
    for g in tl.static_range(1, len(a)):
        s = tl.dot(a[g], tl.trans(b[g]), s, input_precision=PRECISION)
    return s


@triton.jit
def dot_cols(p, b, PRECISION: tl.constexpr):
    """``p · b`` of a ``[rows, K]`` matrix ``p`` and a ``[K, d]`` tile ``b``: an fp32 tile."""
    out = ()
    for g in tl.static_range(len(b)):
        out = out + (tl.dot(p, b[g], input_precision=PRECISION),)
    return out


@triton.jit
def dot_acc(p, b, acc, PRECISION: tl.constexpr):
    """``acc + p · b`` of a ``[rows, K]`` matrix ``p`` and a ``[K, d]`` tile ``b`` into an fp32 tile."""
    out = ()
    for g in tl.static_range(len(b)):
        out = out + (tl.dot(p, b[g], acc[g], input_precision=PRECISION),)
    return out


@triton.jit
def row_dot(a, b):
    """``rowsum(a ∘ b)`` of two tiles, in fp32: ``[rows]``."""
    r = tl.sum(a[0].to(tl.float32) * b[0].to(tl.float32), 1)
    for g in tl.static_range(1, len(a)):
        r += tl.sum(a[g].to(tl.float32) * b[g].to(tl.float32), 1)
    return r


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
    s = dot_d(q, k, PRECISION)
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
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    COLS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax: updated (m_i, l_i, acc)."""
    cols = start + tl.arange(0, COLS)
    k = load_tile(k_ptr, cols, stride, N, HEAD_DIM, DG, NG, MASK)  # [COLS, d]
    v = load_tile(v_ptr, cols, stride, N, HEAD_DIM, DG, NG, MASK)
    s = scores(q, k, qk_scale, PRECISION, EXACT_P)  # [ROWS, COLS]
    if MASK:
        s = tl.where(cols[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = softmax_exp(m_i - m_new, EXACT_P)
    p = softmax_exp(s - m_new[:, None], EXACT_P)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot_acc(p.to(v[0].dtype), v, scale_tile(acc, alpha[:, None]), PRECISION)
    return m_new, l_i, acc


@triton.jit
def dq_step(
    q, do, shift, inv_l, delta, dq, k_ptr, v_ptr, start, N, stride, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    COLS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """dq += ds · k over one key tile."""
    cols = start + tl.arange(0, COLS)
    k = load_tile(k_ptr, cols, stride, N, HEAD_DIM, DG, NG, MASK)  # [COLS, d]
    v = load_tile(v_ptr, cols, stride, N, HEAD_DIM, DG, NG, MASK)
    s = scores(q, k, qk_scale, PRECISION, EXACT_P)  # [ROWS, COLS], as the forward formed them
    p = probs(s, shift, inv_l, EXACT_P)
    if MASK:
        p = tl.where(cols[None, :] < N, p, 0.0)
    dp = dot_d(do, v, PRECISION)
    ds = p * (dp - delta[:, None]) * scale
    return dot_acc(ds.to(k[0].dtype), k, dq, PRECISION)


@triton.jit
def dkdv_step(
    k, v, dk, dv, q_ptr, do_ptr, stats_ptr, delta_ptr, start, N, stride_qkv_n, stride_do_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    ROWS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """dv += pᵀ · dout and dk += dsᵀ · q over one query tile, the scores in the forward's orientation (queries as
    rows; EXACT_P needs it, and fp16/bf16 keep their ``[ROWS]`` statistics as row vectors, two registers a thread,
    where keys as rows hold them in 16), pᵀ and dsᵀ transposed for their dots."""
    rows = start + tl.arange(0, ROWS)
    q = load_tile(q_ptr, rows, stride_qkv_n, N, HEAD_DIM, DG, NG, MASK)  # [ROWS, d]
    do = load_tile(do_ptr, rows, stride_do_n, N, HEAD_DIM, DG, NG, MASK)
    shift, inv_l = load_stats(stats_ptr, rows, N, MASK, EXACT_P)
    if MASK:
        delta = tl.load(delta_ptr + rows, mask=rows < N, other=0.0)
    else:
        delta = tl.load(delta_ptr + rows)
    if EXACT_P:
        s = scores(scale_tile(q, scale), k, qk_scale, PRECISION, EXACT_P)  # [ROWS, COLS], as the forward formed them
    else:
        s = scores(q, k, qk_scale, PRECISION, EXACT_P)
    p = probs(s, shift, inv_l, EXACT_P)
    if MASK:
        p = tl.where(rows[:, None] < N, p, 0.0)
    dv = dot_acc(tl.trans(p.to(do[0].dtype)), do, dv, PRECISION)
    dp = dot_d(do, v, PRECISION)
    ds = (p * (dp - delta[:, None]) * scale).to(do[0].dtype)
    dk = dot_acc(tl.trans(ds), q, dk, PRECISION)
    return dk, dv


@triton.jit
def fwd_rows(
    q_ptr, o_ptr, stats_ptr, row0, N, H, stride_qkv_n, stride_out_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, ROWS: tl.constexpr, MASK_Q: tl.constexpr,
):  # fmt: skip
    """out and stats of query rows ``row0 .. row0+ROWS-1``: full key tiles of BLOCK, then the masked TAIL tile."""
    rows = row0 + tl.arange(0, ROWS)
    q = load_tile(q_ptr, rows, stride_qkv_n, N, HEAD_DIM, DG, NG, MASK_Q)  # [ROWS, d]
    if EXACT_P:
        q = scale_tile(q, scale)
    k_ptr = q_ptr + H * HEAD_DIM
    v_ptr = k_ptr + H * HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = zeros_tile(ROWS, DG, NG)
    for start in range(0, N // BLOCK * BLOCK, BLOCK):
        m_i, l_i, acc = fwd_step(
            q, m_i, l_i, acc, k_ptr, v_ptr, start, N, stride_qkv_n, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, False,
        )  # fmt: skip
    if TAIL > 0:
        m_i, l_i, acc = fwd_step(
            q, m_i, l_i, acc, k_ptr, v_ptr, N // BLOCK * BLOCK, N, stride_qkv_n, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, TAIL, True,
        )  # fmt: skip
    store_tile(o_ptr, rows, stride_out_n, N, scale_tile(acc, 1.0 / l_i[:, None]), HEAD_DIM)
    store_stats(stats_ptr, rows, N, m_i, l_i, EXACT_P)


@triton.jit
def dq_rows(
    q_ptr, o_ptr, do_ptr, dq_ptr, stats_ptr, delta_ptr, row0, N, H,
    stride_qkv_n, stride_out_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, ROWS: tl.constexpr, MASK_Q: tl.constexpr,
):  # fmt: skip
    """Delta and dq of query rows ``row0 .. row0+ROWS-1``."""
    rows = row0 + tl.arange(0, ROWS)
    q = load_tile(q_ptr, rows, stride_qkv_n, N, HEAD_DIM, DG, NG, MASK_Q)  # [ROWS, d]
    do = load_tile(do_ptr, rows, stride_do_n, N, HEAD_DIM, DG, NG, MASK_Q)
    delta = row_dot(do, load_tile(o_ptr, rows, stride_out_n, N, HEAD_DIM, DG, NG, MASK_Q))  # [ROWS]
    tl.store(delta_ptr + rows, delta, mask=rows < N)
    if EXACT_P:
        q = scale_tile(q, scale)  # only the logits read q
    shift, inv_l = load_stats(stats_ptr, rows, N, True, EXACT_P)
    k_ptr = q_ptr + H * HEAD_DIM
    v_ptr = k_ptr + H * HEAD_DIM
    dq = zeros_tile(ROWS, DG, NG)
    for start in range(0, N // BLOCK * BLOCK, BLOCK):
        dq = dq_step(
            q, do, shift, inv_l, delta, dq, k_ptr, v_ptr, start, N, stride_qkv_n, scale, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, False,
        )  # fmt: skip
    if TAIL > 0:
        dq = dq_step(
            q, do, shift, inv_l, delta, dq, k_ptr, v_ptr, N // BLOCK * BLOCK, N, stride_qkv_n, scale, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, TAIL, True,
        )  # fmt: skip
    store_tile(dq_ptr, rows, stride_dqkv_n, N, dq, HEAD_DIM)


@triton.jit
def dkdv_cols(
    q_ptr, do_ptr, dk_ptr, stats_ptr, delta_ptr, col0, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n, scale, qk_scale,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr, EXACT_P: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr, COLS: tl.constexpr, MASK_K: tl.constexpr,
):  # fmt: skip
    """dk and dv of keys ``col0 .. col0+COLS-1``: full query tiles of BLOCK, then the masked TAIL tile."""
    cols = col0 + tl.arange(0, COLS)
    k = load_tile(q_ptr + H * HEAD_DIM, cols, stride_qkv_n, N, HEAD_DIM, DG, NG, MASK_K)  # [COLS, d]
    v = load_tile(q_ptr + 2 * H * HEAD_DIM, cols, stride_qkv_n, N, HEAD_DIM, DG, NG, MASK_K)
    dk = zeros_tile(COLS, DG, NG)
    dv = zeros_tile(COLS, DG, NG)
    for start in range(0, N // BLOCK * BLOCK, BLOCK):
        dk, dv = dkdv_step(
            k, v, dk, dv, q_ptr, do_ptr, stats_ptr, delta_ptr, start, N, stride_qkv_n, stride_do_n, scale, qk_scale,
            HEAD_DIM, DG, NG, PRECISION, EXACT_P, BLOCK, False,
        )  # fmt: skip
    if TAIL > 0:
        dk, dv = dkdv_step(
            k, v, dk, dv, q_ptr, do_ptr, stats_ptr, delta_ptr, N // BLOCK * BLOCK, N, stride_qkv_n, stride_do_n,
            scale, qk_scale, HEAD_DIM, DG, NG, PRECISION, EXACT_P, TAIL, True,
        )  # fmt: skip
    store_tile(dk_ptr, cols, stride_dqkv_n, N, dk, HEAD_DIM)
    store_tile(dk_ptr + H * HEAD_DIM, cols, stride_dqkv_n, N, dv, HEAD_DIM)


@triton.jit
def store_delta(
    o_ptr, do_ptr, delta_ptr, row0, N, stride_out_n, stride_do_n,
    HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, ROWS: tl.constexpr, MASK: tl.constexpr,
):  # fmt: skip
    """Delta = rowsum(dout ∘ out) of query rows ``row0 .. row0+ROWS-1``, stored to ``delta_ptr``; returns their
    dout tile."""
    rows = row0 + tl.arange(0, ROWS)
    do = load_tile(do_ptr, rows, stride_do_n, N, HEAD_DIM, DG, NG, MASK)  # [ROWS, d]
    delta = row_dot(do, load_tile(o_ptr, rows, stride_out_n, N, HEAD_DIM, DG, NG, MASK))
    tl.store(delta_ptr + rows, delta, mask=rows < N)
    return do


@triton.jit
def key_pass(
    q_ptr, do_ptr, dk_ptr, lse_ptr, delta_ptr, col0, N, H, stride_qkv_n, stride_do_n, stride_dqkv_n, dq, tail,
    scale, qk_scale, HEAD_DIM: tl.constexpr, DG: tl.constexpr, NG: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, Q_TILES: tl.constexpr, COLS: tl.constexpr, MASK_K: tl.constexpr,
):  # fmt: skip
    """dk and dv of keys ``col0 .. col0+COLS-1`` over every query tile, stored; returns ``dq`` (one fp32 tile per
    query tile: Q_TILES full ones, then the masked tail, whose ``(q, dout)`` is ``tail``) + ds · k. Full query
    tiles are read from L2 each pass (16-byte loads); the tail, whose 16 rows would take narrower ones, is held."""
    cols = col0 + tl.arange(0, COLS)
    k = load_tile(q_ptr + H * HEAD_DIM, cols, stride_qkv_n, N, HEAD_DIM, DG, NG, MASK_K)  # [COLS, d]
    v = load_tile(q_ptr + 2 * H * HEAD_DIM, cols, stride_qkv_n, N, HEAD_DIM, DG, NG, MASK_K)
    dk = zeros_tile(COLS, DG, NG)
    dv = zeros_tile(COLS, DG, NG)
    dq_new = ()
    for t in tl.static_range(len(dq)):
        rows = t * BLOCK + tl.arange(0, dq[t][0].shape[0])
        if t < Q_TILES:
            q = load_tile(q_ptr, rows, stride_qkv_n, N, HEAD_DIM, DG, NG, False)  # [ROWS, d]
            do = load_tile(do_ptr, rows, stride_do_n, N, HEAD_DIM, DG, NG, False)
        else:
            q, do = tail
        lse, _ = load_stats(lse_ptr, rows, N, t >= Q_TILES, False)
        delta, _ = load_stats(delta_ptr, rows, N, t >= Q_TILES, False)
        s = dot_d(q, k, PRECISION) * qk_scale  # [ROWS, COLS]
        p = tl.math.exp2(s - lse[:, None])
        if t >= Q_TILES:
            p = tl.where(rows[:, None] < N, p, 0.0)
        if MASK_K:
            p = tl.where(cols[None, :] < N, p, 0.0)
        dv = dot_acc(tl.trans(p.to(k[0].dtype)), do, dv, PRECISION)
        dp = dot_d(do, v, PRECISION)  # [ROWS, COLS]
        ds = (p * (dp - delta[:, None]) * scale).to(k[0].dtype)
        dk = dot_acc(tl.trans(ds), q, dk, PRECISION)
        dq_new = dq_new + (dot_acc(ds, k, dq[t], PRECISION),)
    store_tile(dk_ptr, cols, stride_dqkv_n, N, dk, HEAD_DIM)
    store_tile(dk_ptr + H * HEAD_DIM, cols, stride_dqkv_n, N, dv, HEAD_DIM)
    return dq_new
