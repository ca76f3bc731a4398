"""The decoder's input in one pass: visible tokens and mask tokens, unshuffled, plus positions.

Math (names as in the code). ``x [N, 1+K, Dd]`` (cls, then the K kept tokens in kept order),
``ids_restore [N, L]``, ``mask_token [1, 1, Dd]``, ``pos_embed [1, 1+L, Dd]``; ``out [N, 1+L, Dd]``::

    out[n, 0]   = x[n, 0] + pos[0]
    out[n, 1+l] = (x[n, 1+r] if r < K else mask_token) + pos[1+l]        r = ids_restore[n, l]

which is the original's cat(x[:, 1:], mask tokens) → gather(ids_restore) → cat(cls) → + pos, without the three
intermediates. The sum is formed in fp32 and rounded once to the output dtype, which is the type promotion of
(x, mask_token, pos_embed) as in the original (under autocast: bf16 x, fp32 parameters → fp32 out).

Backward, with ``g = dout``::

    dx[n, 0]       = g[n, 0]
    dx[n, 1+r]     = g[n, 1+l]        for the l with r = ids_restore[n, l] < K
    dmask_token    = Σ_n Σ_{l: ids_restore[n, l] ≥ K} g[n, 1+l]
    dpos           = Σ_n g[n]          (only when pos_embed requires grad; MAE's is fixed)

ids_restore is a permutation, so each kept token comes from exactly one position: dx is written by a scatter of
whole rows with no atomics and every row of dx is written once. ``_bwd_kernel`` (one program per (n, column
block), looping over the rows in a fixed order) also sums the masked rows into a per-sample partial ``[N, Dd]``;
``_bwd_sum_kernel`` then adds the N partials in a fixed order. dpos uses the same kernel over ``g`` viewed
``[N, (1+L)·Dd]``. Everything is deterministic; accumulation is fp32.

Checks: dtypes, shapes (``x [N, 1+K, Dd]`` with ``0 ≤ K ≤ L``, ``ids_restore`` int64 ``[N, L]``, ``mask_token
[1, 1, Dd]``, ``pos_embed [1, 1+L, Dd]``), devices. That ids_restore is a permutation of ``0..L-1`` per row is
checked for CPU tensors only (on CUDA it would need a host sync); on CUDA an entry outside ``[0, L)`` never
addresses memory: its output row is NaN. A non-permutation with entries in range gives the reference's forward;
its backward is undefined (dx rows may be left unwritten).

Tuning: forward tiles of BLOCK_T = 32 rows × BLOCK_D ≤ 128 columns (one program per tile, 4 warps); the backward
loops over the rows of one sample per program (N × Dd/BLOCK_D programs). Chosen from Dd alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import check_float, check_same_device, empty, unsupported_float

__all__ = ["decoder_assembly", "unsupported"]


@triton.jit
def _row_sources(IDS, n, t, t_ok, s_rn, s_rl, K, L):
    """For output rows t: (source row in x, row takes x, row takes the mask token, bad index)."""
    is_tok = t > 0
    r = tl.load(IDS + n * s_rn + (t - 1) * s_rl, mask=t_ok & is_tok, other=0)
    in_range = (r >= 0) & (r < L)
    from_x = t_ok & ((t == 0) | (is_tok & in_range & (r < K)))
    from_tok = t_ok & is_tok & in_range & (r >= K)
    bad = t_ok & is_tok & (in_range == 0)
    src = tl.where(t == 0, 0, r + 1)
    return src, from_x, from_tok, bad


@triton.jit
def _fwd_kernel(
    X,
    IDS,
    TOK,
    POS,
    OUT,
    K,
    L,
    Dd,
    s_xn,
    s_xt,
    s_xd,
    s_rn,
    s_rl,
    s_kd,
    s_pt,
    s_pd,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One [BLOCK_T, BLOCK_D] tile of out[n]."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < L + 1
    c_ok = cols < Dd
    src, from_x, from_tok, bad = _row_sources(IDS, n, t, t_ok, s_rn, s_rl, K, L)
    xv = tl.load(
        X + n * s_xn + src[:, None] * s_xt + cols[None, :] * s_xd, mask=from_x[:, None] & c_ok[None, :], other=0.0
    ).to(tl.float32)
    tok = tl.load(TOK + cols * s_kd, mask=c_ok, other=0.0).to(tl.float32)
    v = tl.where(from_tok[:, None], tok[None, :], xv)
    v = tl.where(bad[:, None], float("nan"), v)
    ok = t_ok[:, None] & c_ok[None, :]
    pos = tl.load(POS + t[:, None] * s_pt + cols[None, :] * s_pd, mask=ok, other=0.0).to(tl.float32)
    out = OUT + n * (L + 1) * Dd + t[:, None] * Dd + cols[None, :]
    tl.store(out, (v + pos).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kernel(
    G,
    IDS,
    DX,
    PART,
    K,
    L,
    Dd,
    s_gn,
    s_gt,
    s_gd,
    s_rn,
    s_rl,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx[n] by scattering the rows of g[n]; PART[n] = Σ of g[n]'s mask-token rows (fixed order)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = cols < Dd
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, L + 1, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < L + 1
        src, from_x, from_tok, bad = _row_sources(IDS, n, t, t_ok, s_rn, s_rl, K, L)
        g = tl.load(
            G + n * s_gn + t[:, None] * s_gt + cols[None, :] * s_gd, mask=t_ok[:, None] & c_ok[None, :], other=0.0
        ).to(tl.float32)
        dx = DX + n * (K + 1) * Dd + src[:, None] * Dd + cols[None, :]
        tl.store(dx, g.to(DX.dtype.element_ty), mask=from_x[:, None] & c_ok[None, :])
        acc += tl.sum(tl.where(from_tok[:, None], g, 0.0), axis=0)
    tl.store(PART + n * Dd + cols, acc, mask=c_ok)


@triton.jit
def _bwd_sum_kernel(SRC, OUT, N, M, s_n, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """OUT[m] = Σ_n SRC[n, m] (fp32), summed in a fixed order; SRC's last dim contiguous."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = cols < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        v = tl.load(SRC + rows[:, None] * s_n + cols[None, :], mask=(rows < N)[:, None] & c_ok[None, :], other=0.0)
        acc += v.to(tl.float32)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=c_ok)


SUM_BLOCK_N, SUM_BLOCK_M = 8, 256


def tiling(dd: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a decoder width dd."""
    block_d = min(128, triton.next_power_of_2(dd))
    return 32, block_d, 4


def _check(x, ids_restore, mask_token, pos_embed) -> None:
    for name, t in (("x", x), ("mask_token", mask_token), ("pos_embed", pos_embed)):
        check_float(name, t)
    if not isinstance(ids_restore, torch.Tensor) or ids_restore.dtype != torch.int64:
        what = getattr(ids_restore, "dtype", type(ids_restore).__name__)
        raise TypeError(f"ids_restore must be an int64 tensor [N, L], got {what}")
    if x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must be [N, 1+K, Dd] with N, 1+K, Dd ≥ 1, got shape {list(x.shape)}")
    n, k1, dd = x.shape
    if ids_restore.dim() != 2 or ids_restore.shape[0] != n or ids_restore.shape[1] == 0:
        raise ValueError(f"ids_restore must be [N, L] = [{n}, L] with L ≥ 1, got shape {list(ids_restore.shape)}")
    num_patches = ids_restore.shape[1]
    if k1 - 1 > num_patches:
        raise ValueError(f"x holds {k1 - 1} kept tokens but ids_restore only {num_patches} patches")
    if mask_token.shape != (1, 1, dd):
        raise ValueError(f"mask_token must be [1, 1, {dd}], got shape {list(mask_token.shape)}")
    if pos_embed.shape != (1, num_patches + 1, dd):
        raise ValueError(f"pos_embed must be [1, 1+L, Dd] = [1, {num_patches + 1}, {dd}], got {list(pos_embed.shape)}")
    check_same_device(x=x, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    if not ids_restore.is_cuda:
        expect = torch.arange(num_patches, device=ids_restore.device).expand(n, -1)  # [N, L]
        if not torch.equal(ids_restore.sort(dim=1).values, expect):
            raise ValueError(f"ids_restore must hold a permutation of 0..{num_patches - 1} in each row")


def _sum_over_batch(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ over dim 0 of a [N, M] tensor with a contiguous last dim, deterministic; returns [M] in dtype."""
    n, m = src.shape
    out = empty(m, dtype=dtype, device=src.device)
    grid = (triton.cdiv(m, SUM_BLOCK_M),)
    _bwd_sum_kernel[grid](src, out, n, m, src.stride(0), BLOCK_N=SUM_BLOCK_N, BLOCK_M=SUM_BLOCK_M, num_warps=4)
    return out


def _launch_fwd(x, ids_restore, mask_token, pos_embed):
    n, k1, dd = x.shape
    num_patches = ids_restore.shape[1]
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    out = empty(n, num_patches + 1, dd, dtype=out_dtype, device=x.device)  # [N, 1+L, Dd]
    block_t, block_d, warps = tiling(dd)
    grid = (n, triton.cdiv(num_patches + 1, block_t), triton.cdiv(dd, block_d))
    _fwd_kernel[grid](
        x, ids_restore, mask_token, pos_embed, out, k1 - 1, num_patches, dd,
        *x.stride(), *ids_restore.stride(), mask_token.stride(2), pos_embed.stride(1), pos_embed.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


def _launch_bwd(g, ids_restore, k1, x_dtype, tok_dtype):
    """Return (dx [N, 1+K, Dd] in x's dtype, dmask_token [1, 1, Dd] in mask_token's dtype)."""
    n, l1, dd = g.shape
    dx = empty(n, k1, dd, dtype=x_dtype, device=g.device)  # [N, 1+K, Dd]
    part = empty(n, dd, dtype=torch.float32, device=g.device)  # [N, Dd]
    block_t, block_d, warps = tiling(dd)
    _bwd_kernel[(n, triton.cdiv(dd, block_d))](
        g, ids_restore, dx, part, k1 - 1, l1 - 1, dd, *g.stride(), *ids_restore.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return dx, _sum_over_batch(part, tok_dtype).view(1, 1, dd)


class DecoderAssemblyFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, ids_restore, mask_token, pos_embed):
        ctx.save_for_backward(ids_restore)
        ctx.meta = (x.shape[1], x.dtype, mask_token.dtype, pos_embed.dtype)
        return _launch_fwd(x, ids_restore, mask_token, pos_embed)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        k1, x_dtype, tok_dtype, pos_dtype = ctx.meta
        dx = dtok = dpos = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dx, dtok = _launch_bwd(g, ids_restore, k1, x_dtype, tok_dtype)
        if ctx.needs_input_grad[3]:
            flat = g.reshape(g.shape[0], -1)  # [N, (1+L)·Dd]
            if flat.stride(1) != 1:
                flat = flat.contiguous()
            dpos = _sum_over_batch(flat, pos_dtype).view(1, *g.shape[1:])  # [1, 1+L, Dd]
        return (
            dx if ctx.needs_input_grad[0] else None,
            None,
            dtok if ctx.needs_input_grad[2] else None,
            dpos,
        )


def unsupported(x, ids_restore, mask_token, pos_embed) -> str | None:
    """Why :func:`decoder_assembly` does not take arguments the eager op accepts (a float64 tensor), or None."""
    return unsupported_float(x=x, mask_token=mask_token, pos_embed=pos_embed)


def decoder_assembly(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The decoder's input in one pass; see :func:`fastmae.reference.decoder_assembly`.

    Args:
        x: ``[N, 1+K, Dd]``, the decoder_embed output (cls, then the kept tokens in kept order); any strides.
        ids_restore: ``[N, L]`` int64, each row a permutation of ``0..L-1`` (checked on the CPU only).
        mask_token: ``[1, 1, Dd]``; pos_embed: ``[1, 1+L, Dd]`` (gets a gradient only if it requires one).

    Returns:
        ``[N, 1+L, Dd]`` in the promoted dtype of the three float inputs: row 0 = x[:, 0] + pos[0]; row 1+l =
        (x[:, 1+r] if r = ids_restore[n, l] < K else mask_token) + pos[1+l].
    """
    _check(x, ids_restore, mask_token, pos_embed)
    return DecoderAssemblyFunction.apply(x, ids_restore, mask_token, pos_embed)
