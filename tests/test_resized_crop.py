"""The input-view kernel against fastmae.reference.resized_crop and torchvision's uint8 resize.

Two comparisons, two tolerances:

* against the reference (the same math in eager torch), by the rule of tests/tolerance.py: error against the
  float64 reference ≤ 2× the eager op's own error in the output dtype + atol;
* against ``torchvision.transforms.v2.functional.resized_crop(uint8 image, ..., BICUBIC, antialias=True)`` + flip +
  normalize on the same uint8 tensors. On the CPU that is torchvision's native uint8 resample, PIL's: two passes,
  each rounded to uint8. The kernel does not round, so the two differ by PIL's roundings: the intermediate one,
  ≤ 0.5, carried through the vertical weights (Σ|w| ≤ 1.269 for this filter, the worst window: see
  ``max_abs_weight_sum`` below), the final one ≤ 0.5, and fixed-point weights (≤ 0.05 by a wide margin):
  ``0.5·1.269 + 0.5 + 0.05 ≤ 1.19`` units of 255, i.e. ``1.19 / (255·std_c)`` after normalization.
"""

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fastmae import reference
from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
from fastmae.kernels._common import poison_outputs
from fastmae.kernels.resized_crop import resized_crop
from tests.compile_harness import KernelSpec, assert_compiles
from tests.tolerance import assert_within_eager_error, atol_for

MOD = "fastmae.kernels.resized_crop"
UINT8_TOL = 1.19  # units of 255 (module docstring)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)


def cubic(t: float) -> float:
    t = abs(t)
    return (1.5 * t - 2.5) * t * t + 1 if t < 1 else -0.5 * (((t - 5) * t + 8) * t - 4) if t < 2 else 0.0


def max_abs_weight_sum(n: int, size: int) -> float:
    """The largest Σ|normalized weight| over the windows of an n → size resample (PIL's windows)."""
    scale = n / size
    f = max(scale, 1.0)
    worst = 0.0
    for i in range(size):
        c = (i + 0.5) * scale
        w = [cubic((j - c + 0.5) / f) for j in range(max(int(c - 2 * f + 0.5), 0), min(int(c + 2 * f + 0.5), n))]
        worst = max(worst, sum(abs(x) for x in w) / sum(w))
    return worst


def test_the_uint8_tolerance_covers_the_worst_window():
    worst = max(max_abs_weight_sum(n, s) for n in range(1, 90) for s in (1, 3, 8, 16, 23, 64, 224))
    assert 1.25 < worst <= 1.269  # a window with both negative lobes weighs up to ~1.27
    assert 0.5 * worst + 0.5 + 0.05 <= UINT8_TOL


def images_and_boxes(specs, seed=0, smooth=False):
    """uint8 images [3, H, W] from ``specs`` = ((H, W, box or None, layout), ...) and their boxes (random when None).

    Layouts: "chw" contiguous, "hwc" (a permuted [H, W, 3] array, as decoded on the CPU), "slice" (a view into a
    wider image). ``smooth``: blurred noise rather than white noise (fewer clamps)."""
    g = torch.Generator().manual_seed(seed)
    images, boxes = [], []
    for h, w, box, layout in specs:
        if layout == "hwc":
            img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
        elif layout == "slice":
            img = torch.randint(0, 256, (3, h + 3, w + 7), dtype=torch.uint8, generator=g)[:, 2 : 2 + h, 5 : 5 + w]
        else:
            img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        if smooth:
            blurred = torch.nn.functional.avg_pool2d(img[None].float(), 5, 1, 2, count_include_pad=False)[0]
            img.copy_(blurred.round().to(torch.uint8))
        if box is None:
            bh, bw = (int(torch.randint(1, n + 1, (), generator=g)) for n in (h, w))
            box = (*(int(torch.randint(0, n - k + 1, (), generator=g)) for n, k in ((h, bh), (w, bw))), bh, bw)
        images.append(img)
        boxes.append(box)
    flips = torch.rand(len(images), generator=g) < 0.5
    return images, torch.tensor(boxes, dtype=torch.int64), flips


def check(images, boxes, flips, size, dtype, name=""):
    with poison_outputs():
        out = resized_crop(images, boxes, flips, size, IMAGENET_MEAN, IMAGENET_STD, dtype)
    assert out.shape == (len(images), 3, size, size) and out.dtype == dtype and out.is_contiguous()
    hi = reference.resized_crop(images, boxes, flips, size, IMAGENET_MEAN, IMAGENET_STD, torch.float64)
    lo = reference.resized_crop(images, boxes, flips, size, IMAGENET_MEAN, IMAGENET_STD, dtype)
    assert_within_eager_error(out.cpu(), hi.cpu(), lo.cpu(), dtype, name, atol_for(out, hi))
    return out


MIXED = (
    (37, 53, (3, 5, 30, 40), "chw"),  # downscale in y, slight in x
    (20, 11, (0, 0, 20, 11), "hwc"),  # the whole image, upscaled
    (90, 70, (10, 2, 77, 61), "slice"),  # downscale ×3
    (5, 5, (1, 2, 1, 3), "chw"),  # one row
    (64, 9, (0, 4, 64, 1), "hwc"),  # one column, full height
    (23, 23, (0, 0, 23, 23), "chw"),  # same size as the output: an identity resample
    (41, 33, None, "slice"),
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(dtype):
    images, boxes, flips = images_and_boxes(MIXED, seed=1)
    check(images, boxes, flips, 23, dtype, str(dtype))  # 23: one partial tile


@pytest.mark.parametrize("size", [1, 8, 40])
def test_output_sizes_and_smooth_images(size):
    """S = 1 (one pixel per view), 8, and 40 (a second, partial tile in each direction)."""
    images, boxes, flips = images_and_boxes(MIXED, seed=2, smooth=True)
    check(images, boxes, flips, size, torch.float32, f"S={size}")


def test_flip_is_the_mirror_of_the_unflipped_view():
    images, boxes, flips = images_and_boxes(MIXED, seed=3)
    plain = resized_crop(images, boxes, torch.zeros_like(flips), 21, IMAGENET_MEAN, IMAGENET_STD)
    mirrored = resized_crop(images, boxes, torch.ones_like(flips), 21, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(mirrored, plain.flip(-1))


def test_a_stacked_batch_equals_the_list_and_the_empty_batch():
    g = torch.Generator().manual_seed(4)
    batch = torch.randint(0, 256, (3, 3, 30, 26), dtype=torch.uint8, generator=g)  # [B, 3, H, W]
    boxes = torch.tensor([[0, 0, 30, 26], [5, 1, 12, 20], [29, 25, 1, 1]])
    flips = torch.tensor([True, False, True])
    stacked = resized_crop(batch, boxes, flips, 16, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(stacked, resized_crop(list(batch), boxes, flips, 16, IMAGENET_MEAN, IMAGENET_STD))
    empty = resized_crop([], torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, dtype=torch.bool), 8,
                         IMAGENET_MEAN, IMAGENET_STD)  # fmt: skip
    assert empty.shape == (0, 3, 8, 8)


def test_a_4000_by_3000_image():
    """Full-height and full-width 1-pixel crops, a far-corner crop (offsets past 2^25) and a 1200×900 crop
    shrunk 150× (about 600 taps a side, the wide pixel blocks); tiny outputs keep the interpreter fast."""
    g = torch.Generator().manual_seed(5)
    img = torch.randint(0, 256, (3, 3000, 4000), dtype=torch.uint8, generator=g)
    cases = [((0, 2500, 3000, 1), 4), ((1777, 0, 1, 4000), 4), ((2950, 3936, 50, 64), 16), ((1000, 1000, 900, 1200), 8)]
    for box, size in cases:
        check([img], torch.tensor([box]), torch.tensor([True]), size, torch.float32, f"box {box} → {size}")


def to_pixels(out: torch.Tensor) -> torch.Tensor:
    """Normalized views back to 0..255."""
    return (out.double().cpu() * STD + MEAN) * 255


def torchvision_uint8(images, boxes, flips, size) -> torch.Tensor:
    """torchvision's uint8 resized_crop (+ flip) of each image on the CPU, as float64 pixel values."""
    views = []
    for img, (top, left, h, w), flip in zip(images, boxes.tolist(), flips.tolist()):
        v = TF.resized_crop(img.cpu(), top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=True)
        views.append((v.flip(-1) if flip else v).double())
    return torch.stack(views)


@pytest.mark.parametrize("smooth", [False, True])
def test_matches_torchvision_uint8_within_its_roundings(smooth):
    images, boxes, flips = images_and_boxes(MIXED, seed=6, smooth=smooth)
    for size in (7, 30):
        out = resized_crop(images, boxes, flips, size, IMAGENET_MEAN, IMAGENET_STD)
        err = (to_pixels(out) - torchvision_uint8(images, boxes, flips, size)).abs().max().item()
        assert err <= UINT8_TOL, f"S={size}: {err:.3f} units of 255 > {UINT8_TOL}"


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (dict(images="x"), TypeError, "images must be a list or tuple"),
        (dict(images=[torch.zeros(3, 4, 4)]), TypeError, r"images\[0\] must be a uint8"),
        (dict(images=[torch.zeros(4, 4, 3, dtype=torch.uint8)]), ValueError, r"images\[0\] must be \[3, H, W\]"),
        (dict(boxes=torch.zeros(1, 4)), TypeError, "boxes must be an integer tensor"),
        (dict(boxes=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "boxes must be"),
        (dict(boxes=torch.tensor([[0, 0, 9, 4]])), ValueError, r"boxes\[0\] = \(top 0, left 0, height 9"),
        (dict(boxes=torch.tensor([[0, 0, 0, 4]])), ValueError, r"boxes\[0\]"),
        (dict(flips=torch.tensor([1])), TypeError, "flips must be a bool tensor"),
        (dict(flips=torch.tensor([True, False])), ValueError, "flips must be"),
        (dict(size=0), ValueError, "size must be"),
        (dict(mean=(0.5, 0.5)), ValueError, "mean must be three numbers"),
        (dict(std=(0.2, 0.0, 0.2)), ValueError, "std must be > 0"),
        (dict(dtype=torch.float64), TypeError, "dtype must be"),
    ],
)
def test_bad_inputs(args, exc, match):
    base = dict(images=[torch.zeros(3, 8, 6, dtype=torch.uint8)], boxes=torch.tensor([[0, 0, 8, 6]]))
    base.update(flips=torch.tensor([False]), size=4, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32)
    with pytest.raises(exc, match=match):
        resized_crop(**{**base, **args})


def compile_specs() -> list[KernelSpec]:
    """Both pixel-block configs, each output dtype."""
    from fastmae.kernels import resized_crop as rc

    ints = ["S", "TILES_X", "s_ob", "s_oc", "s_oh", "s_ow"]
    floats = ["scale0", "scale1", "scale2", "shift0", "shift1", "shift2"]
    specs = []
    for block in sorted(set(rc.BLOCK.values())):
        cx = {"COLS": rc.META_COLS, "BLOCK_Y": rc.TILE, "BLOCK_X": rc.TILE, "BLOCK_R": block, "BLOCK_C": block}
        for out_t in ("*fp32", "*fp16", "*bf16"):
            sig = {"META": "*i64", "OUT": out_t, **dict.fromkeys(ints, "i32"), **dict.fromkeys(floats, "fp32")}
            specs.append(KernelSpec(MOD, "_fwd_kernel", {**sig, **dict.fromkeys(cx, "constexpr")}, cx, rc.NUM_WARPS))
    return specs


def test_compiles_for_sm80_sm90():
    assert_compiles(compile_specs())


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference_and_torchvision_uint8(dtype):
    images, boxes, flips = images_and_boxes(MIXED, seed=7)
    images = [img.cuda() for img in images]
    out = check(images, boxes, flips, 23, dtype, f"cuda {dtype}")
    if dtype == torch.float32:  # the same uint8 tensors through torchvision's CPU uint8 path (PIL's roundings)
        err = (to_pixels(out) - torchvision_uint8(images, boxes, flips, 23)).abs().max().item()
        assert err <= UINT8_TOL


@pytest.mark.cuda
def test_cuda_imagenet_batch_and_a_full_4000_by_3000_crop():
    """256 views at 224 of ImageNet-sized images in one launch, twice (bitwise the same), and whole 12-MP photos."""
    rng = np.random.default_rng(8)
    sizes = [(int(h), int(w)) for h, w in zip(rng.integers(150, 800, 256), rng.integers(150, 800, 256))]
    specs = [(h, w, None, ("chw", "hwc", "slice")[i % 3]) for i, (h, w) in enumerate(sizes)]
    images, boxes, flips = images_and_boxes(specs, seed=8, smooth=True)
    images = [img.cuda() for img in images]
    first = check(images, boxes, flips, 224, torch.bfloat16, "ImageNet batch")
    again = resized_crop(images, boxes, flips, 224, IMAGENET_MEAN, IMAGENET_STD, torch.bfloat16)
    assert torch.equal(first, again)
    big = [torch.randint(0, 256, (3, 3000, 4000), dtype=torch.uint8, device="cuda") for _ in range(2)]
    boxes = torch.tensor([[0, 0, 3000, 4000], [0, 0, 3000, 4000]])
    check(big, boxes, torch.tensor([False, True]), 224, torch.float32, "4000×3000 whole")
