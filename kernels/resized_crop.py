"""The views of a batch of decoded images in one launch: crop, bicubic resize, flip and normalization.

What is fused. Image b is uint8 ``[3, H_b, W_b]`` with any strides (each its own allocation: a table holds its
address, strides, crop box ``(top, left, h, w)`` and flip f); its view ``out[b]`` is ``[3, S, S]``::

    t[c, r, x'] = clamp(Σ_q kx(x', q) · img[c, top + r, left + q] / Σ_q kx(x', q), 0, 255)    horizontal pass
    v[c, y, x'] = clamp(Σ_r ky(y, r) · t[c, r, x'] / Σ_r ky(y, r), 0, 255)                      vertical pass
    out[b, c, y, x] = v[c, y, x'] · 1/(255·std_c) − mean_c/std_c,      x' = S−1−x if f else x

one read of the crop's pixels and one write of the view, in the output dtype (fp32, fp16 or bf16), instead of the
eager path's crop copy, float image, two resize passes, clamps, flip and normalize. The flip costs nothing: each
output column computes the weights of the resized column it shows.

Filter: PIL's bicubic (``a = −0.5``), which torchvision's ``antialias=True`` reproduces, separable in y and x. Along
one axis with ``n`` crop pixels and ``S`` outputs: ``scale = n / S``, ``f = max(scale, 1)`` (downscaling stretches the
filter by the scale factor, which is the antialiasing; upscaling does not), support ``2·f``; output i is centred
at ``c = (i + 0.5)·scale`` and takes the pixels ``[max(trunc(c − 2f + 0.5), 0), min(trunc(c + 2f + 0.5), n))``, each
weighted ``K((j − c + 0.5) / f)``, normalized by the sum of its weights (so the window is cut at the crop's edges,
never padded)::

    K(t) = 1.5·|t|³ − 2.5·|t|² + 1          |t| < 1
    K(t) = −0.5·(|t|³ − 5·|t|² + 8·|t| − 4)  1 ≤ |t| < 2,   0 beyond

The passes are PIL's, horizontal first with the clamp of its 8-bit image between them, computed in fp32 without
PIL's rounding to integers after each pass (:func:`fastmae.reference.resized_crop` is the same in eager torch).
So this view and PIL's (the CPU path's) differ by PIL's two roundings: at most ``0.5 + 0.5·max Σ|w|`` units of 255,
where ``max Σ|w| = 1.269`` is the largest sum of absolute normalized weights of this filter (a window with negative
lobes), plus PIL's fixed-point weights; 1.19 units with margin (tests/test_resized_crop.py).

Tiling: one program per ``BLOCK_Y × BLOCK_X`` tile of one channel of one view (grid ``[tiles, B, 3]``). The tile's
rows need crop rows ``[R0, R1)`` and its columns crop columns ``[C0, C1)`` (about ``(BLOCK + 4)·scale`` each); a first
loop sums each column's horizontal weights. Then for each ``BLOCK_R``-row block of the band: the vertical weights
``Wy [BLOCK_Y, BLOCK_R]``; column block by column block the pixels ``P [BLOCK_R, BLOCK_C]`` (a plain 2-D load, rows
along memory) and the horizontal weights ``Wx [BLOCK_C, BLOCK_X]``, ``T += P·Wx``; then ``acc += Wy·clamp(T / Σkx)``.
The products are fp32 dots with ``input_precision="ieee"`` (CUDA-core FMAs: the integer pixels would be exact in
16 bits, the weights not). The band matrices are dense, zero outside each output's window: about ``9×`` more
multiply-adds than a sparse gather, traded for plain loads and dots. For ImageNet crops (about 1.3× shrunk) that
is about 7·10⁹ multiply-adds per batch of 256 views at 224 px by the tile counts (an estimate: the report's data
section measures the kernel), small next to decoding the batch's JPEGs.

Output layout: NCHW contiguous (``[B, 3, S, S]``, strides ``3S², S², S, 1``), not channels_last. The consumers read
it as patches: the patch embedding (``kernels/patch_embed.py``) loads A tiles along ``r = c·P² + i·P + j`` with j
innermost, so NCHW gives runs of P contiguous pixels (64 B per patch row in fp32, whole 32-B sectors), where
channels_last puts consecutive j 3 elements apart and each load uses a third of every sector it touches; the loss
(``kernels/masked_mse.py``) reads each patch row's pixels as C runs of P along image rows for the same reason. The
kernel's own stores are ``BLOCK_X`` contiguous elements per row and channel either way.

Constraints: ``1 ≤ h ≤ H_b``, ``1 ≤ w ≤ W_b`` with the box inside the image; ``S ≥ 1``; any image sizes within one
batch. Offsets are int64. The images and the output live on one CUDA device (or the CPU under
``TRITON_INTERPRET=1``); boxes and flips are read on the host, where the table is built (one small copy).

No autograd: no gradient flows into the data. No ``torch.library.triton_op`` either: the input path runs in the
training loop before the model, never inside a compiled graph, and its table holds raw addresses, which a traced
graph could not replay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._common import FLOAT_DTYPES, empty, interpreting

META_COLS = 9  # per image: address, stride_c, stride_h, stride_w, top, left, h, w, flip


@triton.jit
def _cubic(t):
    """PIL's bicubic kernel K(t), a = −0.5."""
    t = tl.abs(t)
    near = (1.5 * t - 2.5) * t * t + 1.0
    far = -0.5 * (((t - 5.0) * t + 8.0) * t - 4.0)
    return tl.where(t < 1.0, near, tl.where(t < 2.0, far, 0.0))


@triton.jit
def _window(i, scale, support, n):
    """First tap, end (exclusive) and centre of output index i's window over n pixels, as PIL computes them."""
    center = (i.to(tl.float32) + 0.5) * scale
    lo = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    hi = tl.minimum((center + support + 0.5).to(tl.int32), n)
    return lo, hi, center


@triton.jit
def _weights(j, lo, hi, center, inv_f):
    """Unnormalized weight of pixel j for a window (lo, hi, center); zero outside it."""
    w = _cubic((j.to(tl.float32) - center + 0.5) * inv_f)
    return tl.where((j >= lo) & (j < hi), w, 0.0)


@triton.jit
def _clamp255(v):
    return tl.minimum(tl.maximum(v, 0.0), 255.0)


@triton.jit
def _fwd_kernel(
    META, OUT,
    S, TILES_X,
    s_ob, s_oc, s_oh, s_ow,
    scale0, scale1, scale2, shift0, shift1, shift2,
    COLS: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One BLOCK_Y × BLOCK_X tile of channel c of view b; row b of META holds its image (see META_COLS)."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    meta = META + b * COLS
    src = tl.load(meta).to(tl.pointer_type(tl.uint8))
    s_c = tl.load(meta + 1)
    s_h = tl.load(meta + 2)
    s_w = tl.load(meta + 3)
    top = tl.load(meta + 4)
    left = tl.load(meta + 5)
    h = tl.load(meta + 6).to(tl.int32)
    w = tl.load(meta + 7).to(tl.int32)
    flip = tl.load(meta + 8)
    sy = h.to(tl.float32) / S
    sx = w.to(tl.float32) / S
    fy = tl.maximum(sy, 1.0)
    fx = tl.maximum(sx, 1.0)
    ys = (tile // TILES_X) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = (tile % TILES_X) * BLOCK_X + tl.arange(0, BLOCK_X)
    y_ok = ys < S
    x_ok = xs < S
    xr = tl.where(flip != 0, S - 1 - xs, xs)  # the resized column each output column shows
    y_lo, y_hi, y_c = _window(ys, sy, 2.0 * fy, h)
    x_lo, x_hi, x_c = _window(xr, sx, 2.0 * fx, w)
    r_start = tl.min(tl.where(y_ok, y_lo, h), axis=0)
    r_end = tl.max(tl.where(y_ok, y_hi, 0), axis=0)
    q_start = tl.min(tl.where(x_ok, x_lo, w), axis=0)
    q_end = tl.max(tl.where(x_ok, x_hi, 0), axis=0)

    x_sum = tl.zeros([BLOCK_X], dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_C):
        qs = q0 + tl.arange(0, BLOCK_C)
        wx = _weights(qs[:, None], x_lo[None, :], x_hi[None, :], x_c[None, :], 1.0 / fx)  # [BLOCK_C, BLOCK_X]
        x_sum += tl.sum(wx, axis=0)
    inv_x = 1.0 / tl.where(x_ok, x_sum, 1.0)  # [BLOCK_X] (columns past S: no 1/0)

    c = tl.program_id(2)
    plane = src + c * s_c + top * s_h + left * s_w
    y_sum = tl.zeros([BLOCK_Y], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Y, BLOCK_X], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        wy = _weights(rs[None, :], y_lo[:, None], y_hi[:, None], y_c[:, None], 1.0 / fy)  # [BLOCK_Y, BLOCK_R]
        y_sum += tl.sum(wy, axis=1)
        r_ok = rs < r_end
        row = rs.to(tl.int64) * s_h
        t = tl.zeros([BLOCK_R, BLOCK_X], dtype=tl.float32)
        for q0 in range(q_start, q_end, BLOCK_C):
            qs = q0 + tl.arange(0, BLOCK_C)
            wx = _weights(qs[:, None], x_lo[None, :], x_hi[None, :], x_c[None, :], 1.0 / fx)  # [BLOCK_C, BLOCK_X]
            offs = row[:, None] + qs[None, :].to(tl.int64) * s_w  # [BLOCK_R, BLOCK_C]
            ok = r_ok[:, None] & (qs < q_end)[None, :]
            p = tl.load(plane + offs, mask=ok, other=0).to(tl.float32)
            t = tl.dot(p, wx, t, input_precision="ieee")
        # the horizontal pass ends here for these rows: normalized and clamped to 0..255, as PIL's 8-bit image
        acc = tl.dot(wy, _clamp255(t * inv_x[None, :]), acc, input_precision="ieee")

    ok = y_ok[:, None] & x_ok[None, :]
    inv_y = 1.0 / tl.where(y_ok, y_sum, 1.0)  # [BLOCK_Y] (rows past S: no 1/0)
    scale = tl.where(c == 0, scale0, tl.where(c == 1, scale1, scale2))
    shift = tl.where(c == 0, shift0, tl.where(c == 1, shift1, shift2))
    out = _clamp255(acc * inv_y[:, None]) * scale + shift
    dst = OUT + b * s_ob + c * s_oc + ys[:, None].to(tl.int64) * s_oh + xs[None, :] * s_ow
    tl.store(dst, out.to(OUT.dtype.element_ty), mask=ok)


# Tuning: 32×32 output tiles (7×7 per 224-px view) and 32×32 pixel blocks, 8 warps, from the shapes alone (no
# autotuning). For views shrunk more than 4× (photos of several megapixels) the band per tile passes 150 pixels
# and 64×64 pixel blocks halve the trips through the loops. One channel per program: with all three in one program
# the FMA dots' operand fragments spilled (the dots hold whole K-slices in registers); per channel, sm_90 compiles
# 127 and 203 registers without spills (benches/STATIC.md), at the price of evaluating the weights three times.
TILE = 32
BLOCK = {False: 32, True: 64}
WIDE_SCALE = 4.0
NUM_WARPS = 8


def unsupported(images, boxes, flips, size, mean, std, dtype=torch.float32) -> str | None:
    """Why :func:`resized_crop` does not take arguments the eager op accepts (an output dtype other than float32,
    float16 or bfloat16), from the dtype alone; None when it does or when they are malformed (both then raise)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype not in FLOAT_DTYPES:
        return f"dtype is {dtype}; the kernel takes float32, float16 or bfloat16"
    return None


def _check(images, boxes, flips, size, mean, std, dtype) -> tuple[list[list[int]], list[bool]]:
    """Validate the arguments; returns the boxes and flips as host lists."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a sequence of [3, H, W] tensors or one [B, 3, H, W] tensor, got shape "
                             f"{list(images.shape)}")  # fmt: skip
    elif not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list or tuple of uint8 tensors [3, H, W], got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
            what = getattr(img, "dtype", type(img).__name__)
            raise TypeError(f"images[{i}] must be a uint8 tensor [3, H, W], got {what}")
        if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"images[{i}] must be [3, H, W] with H, W ≥ 1, got shape {list(img.shape)}")
        if img.device != images[0].device:
            raise ValueError(f"images must be on one device, got {images[0].device} and {img.device} (images[{i}])")
    n = len(images)
    if not isinstance(boxes, torch.Tensor) or boxes.dtype.is_floating_point or boxes.dtype == torch.bool:
        raise TypeError(f"boxes must be an integer tensor [B, 4], got {getattr(boxes, 'dtype', type(boxes).__name__)}")
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes must be [B, 4] = [{n}, 4] (top, left, height, width), got {list(boxes.shape)}")
    if not isinstance(flips, torch.Tensor) or flips.dtype != torch.bool:
        raise TypeError(f"flips must be a bool tensor [B], got {getattr(flips, 'dtype', type(flips).__name__)}")
    if flips.shape != (n,):
        raise ValueError(f"flips must be [B] = [{n}], got {list(flips.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int ≥ 1, got {size!r}")
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise ValueError(f"{name} must be three numbers (one per channel), got {v!r}")
    if min(std) <= 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if n and not images[0].is_cuda and not interpreting():
        raise ValueError(f"images must be CUDA tensors (got {images[0].device}); on the CPU the kernel runs only "
                         "under TRITON_INTERPRET=1, else use fastmae.reference.resized_crop")  # fmt: skip
    rows = boxes.tolist()
    for i, (img, (top, left, h, w)) in enumerate(zip(images, rows)):
        if h < 1 or w < 1 or top < 0 or left < 0 or top + h > img.shape[1] or left + w > img.shape[2]:
            raise ValueError(f"boxes[{i}] = (top {top}, left {left}, height {h}, width {w}) must be a non-empty box "
                             f"inside its image of {img.shape[1]}×{img.shape[2]}")  # fmt: skip
    return rows, flips.tolist()


def _launch_fwd(images, rows: list[list[int]], flips: list[bool], size: int, mean, std, dtype) -> torch.Tensor:
    device = images[0].device
    out = empty(len(images), 3, size, size, dtype=dtype, device=device)
    table = [
        [img.data_ptr(), *img.stride(), top, left, h, w, int(f)]
        for img, (top, left, h, w), f in zip(images, rows, flips)
    ]
    meta = torch.tensor(table, dtype=torch.int64, pin_memory=device.type == "cuda").to(device, non_blocking=True)
    wide = max(max(h, w) for _, _, h, w in rows) > WIDE_SCALE * size
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    tiles_x = triton.cdiv(size, TILE)
    grid = (triton.cdiv(size, TILE) * tiles_x, len(images), 3)
    _fwd_kernel[grid](
        meta, out, size, tiles_x, *out.stride(), *scale, *shift,
        COLS=META_COLS, BLOCK_Y=TILE, BLOCK_X=TILE, BLOCK_R=BLOCK[wide], BLOCK_C=BLOCK[wide], num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def resized_crop(
    images,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    mean,
    std,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One view of each decoded image: crop, bicubic resize (antialiased when shrinking), flip, normalize.

    Args:
        images: a sequence of B uint8 tensors ``[3, H_b, W_b]`` (any strides, any sizes) or one ``[B, 3, H, W]``
            tensor, on one CUDA device (the CPU under ``TRITON_INTERPRET=1``). They must stay alive until the
            launch completes (the caller's references suffice).
        boxes: ``[B, 4]`` integer ``(top, left, height, width)`` of each crop, inside its image (read on the host).
        flips: ``[B]`` bool: flip that view left-right.
        size: the side S of the square views.
        mean, std: three values each, the per-channel normalization on the 0..1 scale.
        dtype: the output dtype: float32, float16 or bfloat16.

    Returns:
        ``[B, 3, S, S]`` contiguous, as :func:`fastmae.reference.resized_crop`.
    """
    rows, flip_list = _check(images, boxes, flips, size, mean, std, dtype)
    if not rows:
        device = images.device if isinstance(images, torch.Tensor) else boxes.device
        return empty(0, 3, size, size, dtype=dtype, device=device)
    return _launch_fwd(images, rows, flip_list, size, mean, std, dtype)
