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
``_bwd_sum_kernel`` then adds the N partials in a fixed order, in two stages when the columns alone would give
too few programs (Dd = 512: 2): first the partials of chunks of SUM_CHUNK samples, each chunk one program per
column block, then the chunk sums. dpos uses the same kernel over ``g`` viewed ``[N, (1+L)·Dd]``, wide enough in
one stage. Everything is deterministic (the chunks and the order within each are fixed by the shapes);
accumulation is fp32.

Constraints: ``x [N, 1+K, Dd]`` with ``0 ≤ K ≤ L``, ``ids_restore`` int64 ``[N, L]``, ``mask_token [1, 1, Dd]``,
``pos_embed [1, 1+L, Dd]``, any strides. ids_restore must hold a permutation of ``0..L-1`` per row: checked on the
host for CPU tensors; on CUDA (the policy of :mod:`fastmae.kernels._common`) an entry outside ``[0, L)`` is never
used as an address, its output row is NaN and ``_fwd_kernel`` flags it; a non-permutation with entries in range
gives the reference's forward, its backward is undefined (dx rows may be left unwritten).
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
    X, IDS, TOK, POS, OUT, ERR, K, L, Dd, s_xn, s_xt, s_xd, s_rn, s_rl, s_kd, s_pt, s_pd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_T, BLOCK_D] tile of out[n]; ERR[0] = 1 when a row's index is out of range."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < L + 1
    c_ok = cols < Dd
    src, from_x, from_tok, bad = _row_sources(IDS, n, t, t_ok, s_rn, s_rl, K, L)
    tl.store(ERR + tl.zeros([BLOCK_T], dtype=tl.int32), 1, mask=bad)
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
    G, IDS, DX, PART, K, L, Dd, s_gn, s_gt, s_gd, s_rn, s_rl, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
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
def _bwd_sum_kernel(SRC, OUT, N, M, s_n, span, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """OUT[k, m] = Σ SRC[n, m] over the k-th chunk of ``span`` rows (k = program_id(1); span a multiple of BLOCK_N),
    fp32, summed in a fixed order; SRC's last dim contiguous, OUT contiguous [chunks, M]."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = cols < M
    first = tl.program_id(1).to(tl.int64) * span
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for n0 in range(0, span, BLOCK_N):
        rows = first + n0 + tl.arange(0, BLOCK_N)
        v = tl.load(SRC + rows[:, None] * s_n + cols[None, :], mask=(rows < N)[:, None] & c_ok[None, :], other=0.0)
        acc += v.to(tl.float32)
    out = OUT + tl.program_id(1).to(tl.int64) * M + cols
    tl.store(out, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=c_ok)


# Tuning: forward tiles of BLOCK_T = 32 rows × BLOCK_D ≤ 128 columns (one program per tile, 4 warps); the backward
# loops over the rows of one sample per program (N × Dd/BLOCK_D programs); the batch sums take 8 rows × 256 columns
# per step. A sum whose columns give fewer than SUM_SPLIT_BELOW programs runs in two stages: chunks of SUM_CHUNK
# samples (2 steps each), then the chunk sums (N = 256, Dd = 512: 2 × 16 programs of 2 steps, then 2 programs of 2
# steps, where one stage is 2 programs of 32 dependent steps). Chosen from the shapes alone (no autotuning, so the
# summation order is the same in every process).
SUM_BLOCK_N, SUM_BLOCK_M = 8, 256
SUM_CHUNK, SUM_SPLIT_BELOW = 16, 64


def tiling(dd: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for a decoder width dd."""
    block_d = min(128, triton.next_power_of_2(dd))
    return 32, block_d, 4


# triton.jit turned the kernels into interpreted functions when this was set at import.
_INTERPRETED = interpreting()


def unsupported(x, ids_restore, mask_token, pos_embed) -> str | None:
    """Why :func:`decoder_assembly` does not take arguments the eager op accepts (a float64 tensor), or None."""
    return unsupported_float(x=x, mask_token=mask_token, pos_embed=pos_embed)


def _check(x, ids_restore, mask_token, pos_embed) -> None:
    """Raise a clear TypeError/ValueError for arguments the kernels do not take (a bad ids_restore: on the host)."""
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
    check_device("x", x, _INTERPRETED)
    if host_checks(ids_restore):
        expect = torch.arange(num_patches, device=ids_restore.device).expand(n, -1)  # [N, L]
        if not torch.equal(ids_restore.sort(dim=1).values, expect):
            raise ValueError(f"ids_restore must hold a permutation of 0..{num_patches - 1} in each row")


def _launch_fwd(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor, err: torch.Tensor
) -> torch.Tensor:
    """out ``[N, 1+L, Dd]`` in the promoted dtype of x, mask_token and pos_embed; ``err[0]`` set on a bad index."""
    n, k1, dd = x.shape
    num_patches = ids_restore.shape[1]
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    out = empty(n, num_patches + 1, dd, dtype=out_dtype, device=x.device)  # [N, 1+L, Dd]
    block_t, block_d, warps = tiling(dd)
    grid = (n, triton.cdiv(num_patches + 1, block_t), triton.cdiv(dd, block_d))
    args = (x, ids_restore, mask_token, pos_embed, out, err, k1 - 1, num_patches, dd, *x.stride())
    args = (*args, *ids_restore.stride(), mask_token.stride(2), pos_embed.stride(1), pos_embed.stride(2))
    consts = {"BLOCK_T": block_t, "BLOCK_D": block_d}
    if not _INTERPRETED:
        wrap_triton(_fwd_kernel)[grid](*args, **consts, num_warps=warps)
    elif not launch_skipped(*args):
        _fwd_kernel[grid](*args, **consts)
    return out


def _sum_rows(src: torch.Tensor, out: torch.Tensor, span: int) -> None:
    """out[k] = Σ of src's k-th chunk of ``span`` rows (one launch; see _bwd_sum_kernel)."""
    n, m = src.shape
    args = (src, out, n, m, src.stride(0), span)
    consts = {"BLOCK_N": SUM_BLOCK_N, "BLOCK_M": SUM_BLOCK_M}
    grid = (triton.cdiv(m, SUM_BLOCK_M), triton.cdiv(n, span))
    if not _INTERPRETED:
        wrap_triton(_bwd_sum_kernel)[grid](*args, **consts, num_warps=4)
    elif not launch_skipped(*args):
        _bwd_sum_kernel[grid](*args, **consts)


def _sum_over_batch(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ over dim 0 of a [N, M] tensor with a contiguous last dim, deterministic; returns [M] in dtype."""
    n, m = src.shape
    if triton.cdiv(m, SUM_BLOCK_M) < SUM_SPLIT_BELOW and n > SUM_CHUNK:
        part = empty(triton.cdiv(n, SUM_CHUNK), m, dtype=torch.float32, device=src.device)  # [N / SUM_CHUNK, M]
        _sum_rows(src, part, SUM_CHUNK)
        src, n = part, part.shape[0]
    out = empty(m, dtype=dtype, device=src.device)  # [M]
    _sum_rows(src, out, triton.cdiv(n, SUM_BLOCK_N) * SUM_BLOCK_N)
    return out


def _launch_bwd(
    g: torch.Tensor, ids_restore: torch.Tensor, k1: int, x_dtype: torch.dtype, tok_dtype: torch.dtype,
    pos_dtype: torch.dtype, need_x: bool, need_pos: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dx ``[N, 1+K, Dd]`` in x's dtype and dmask_token ``[1, 1, Dd]`` in mask_token's (with need_x), dpos
    ``[1, 1+L, Dd]`` in pos_embed's (with need_pos); empty placeholders otherwise."""
    n, l1, dd = g.shape
    dx = empty(n if need_x else 0, k1, dd, dtype=x_dtype, device=g.device)  # [N, 1+K, Dd]
    dtok = empty(0, dtype=tok_dtype, device=g.device)
    dpos = empty(0, dtype=pos_dtype, device=g.device)
    if need_x:
        part = empty(n, dd, dtype=torch.float32, device=g.device)  # [N, Dd]
        block_t, block_d, warps = tiling(dd)
        args = (g, ids_restore, dx, part, k1 - 1, l1 - 1, dd, *g.stride(), *ids_restore.stride())
        consts = {"BLOCK_T": block_t, "BLOCK_D": block_d}
        grid = (n, triton.cdiv(dd, block_d))
        if not _INTERPRETED:
            wrap_triton(_bwd_kernel)[grid](*args, **consts, num_warps=warps)
        elif not launch_skipped(*args):
            _bwd_kernel[grid](*args, **consts)
        dtok = _sum_over_batch(part, tok_dtype).view(1, 1, dd)
    if need_pos:
        flat = g.reshape(n, -1)  # [N, (1+L)·Dd]
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        dpos = _sum_over_batch(flat, pos_dtype).view(1, l1, dd)  # [1, 1+L, Dd]
    return dx, dtok, dpos


class DecoderAssemblyFunction(torch.autograd.Function):
    """Autograd of the fused op."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, ids_restore, mask_token, pos_embed):
        ctx.save_for_backward(ids_restore)
        ctx.meta = (x.shape[1], x.dtype, mask_token.dtype, pos_embed.dtype)
        return decoder_assembly_fwd(x, ids_restore, mask_token, pos_embed, error_flags("decoder_assembly", x.device))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        need_x, _, need_tok, need_pos = ctx.needs_input_grad
        dx, dtok, dpos = decoder_assembly_bwd(g, ids_restore, *ctx.meta, need_x or need_tok, need_pos)
        return dx if need_x else None, None, dtok if need_tok else None, dpos if need_pos else None


# Torch integration (see fastmae.kernels._common.register_op): the forward op writes the error flags it is given
# (mutates_args); DecoderAssemblyFunction saves ids_restore only.
decoder_assembly_fwd = register_op("fastmae::decoder_assembly_fwd", mutates_args=("err",))(_launch_fwd)
decoder_assembly_bwd = register_op("fastmae::decoder_assembly_bwd")(_launch_bwd)


def decoder_assembly(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The decoder's input in one pass; see :func:`fastmae.reference.decoder_assembly`.

    Args:
        x: ``[N, 1+K, Dd]``, the decoder_embed output (cls, then the kept tokens in kept order); any strides.
        ids_restore: ``[N, L]`` int64, each row a permutation of ``0..L-1`` (checked on the host for CPU tensors;
            on CUDA an entry outside ``[0, L)`` gives a NaN row and a flag for ``fastmae.kernels.check_errors``).
        mask_token: ``[1, 1, Dd]``; pos_embed: ``[1, 1+L, Dd]`` (gets a gradient only if it requires one).

    Returns:
        ``[N, 1+L, Dd]`` in the promoted dtype of the three float inputs: row 0 = x[:, 0] + pos[0]; row 1+l =
        (x[:, 1+r] if r = ids_restore[n, l] < K else mask_token) + pos[1+l].
    """
    _check(x, ids_restore, mask_token, pos_embed)
    out = DecoderAssemblyFunction.apply(x, ids_restore, mask_token, pos_embed)
    debug_check()
    return out
