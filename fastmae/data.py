"""Pretraining data: the embedded demo images or an ImageFolder, served as MAE's random views.

A view is RandomResizedCrop (scale 0.2–1, aspect 3/4–4/3, bicubic) + a horizontal flip with probability ½,
then ImageNet mean/std normalization: the original's augmentation. Every view is a pure function of
``(seed, epoch, index)``: the random numbers come from a generator seeded with those keys, not from a global or
per-worker RNG. So the stream does not depend on the number of loader workers, and a run resumed mid-epoch
sees exactly the views it would have seen (:class:`ResumableDistributedSampler` skips what was consumed).

The sampler yields ``(epoch, index)`` keys, which :class:`RandomViews` turns into views.

Bad images: a file that cannot be read or decoded (truncated, empty, not an image) does not stop a run. With
``bad_images="skip"`` the view of ``(epoch, index)`` is taken from the next readable image (index + 1, + 2, ...)
with the same random numbers, so the stream stays a pure function of ``(seed, epoch, index)`` and of the files
on disk; the loader's batches list what was skipped (:class:`BadImage`). ``bad_images="error"`` raises
:class:`BadImageError` naming the file instead. CMYK, palette, alpha and 16-bit images are decoded to 8-bit RGB.
"""

from __future__ import annotations

import io
import itertools
import math
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EMBEDDED_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)
BAD_IMAGE_POLICIES = ("skip", "error")
# What Pillow raises on a file it cannot read or decode (truncated, empty, not an image, broken PNG chunks).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file and the reason.

    Args:
        message: the full message (a one-argument constructor, so that DataLoader workers can re-raise it).
        path, reason: the file and what went wrong, when known.
    """

    def __init__(self, message: str, path: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.reason = path, reason


class BadImage(NamedTuple):
    """An image that was skipped: its index in the source, its path and why it could not be used."""

    index: int
    path: str
    reason: str


class BadImageLog:
    """Prints each unreadable image once (on stderr), the first time it is met.

    Args:
        prefix: put before each line (e.g. the rank).
    """

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.seen: set[str] = set()

    def __call__(self, bad: BadImage) -> None:
        if bad.path in self.seen:
            return
        self.seen.add(bad.path)
        print(
            f"{self.prefix}skipping unreadable image {bad.path} ({bad.reason}); the next readable image takes its "
            "place (--bad-images error stops instead)",
            file=sys.stderr,
            flush=True,
        )


def read_image(path: str | Path) -> Image.Image:
    """Decode the image file at ``path`` to 8-bit RGB.

    Pillow's ``convert("RGB")`` clips 16-bit greyscale (modes ``I;16*``, ``I``) to 255, a white picture; those
    are scaled to 8 bits (÷ 257) first. CMYK, palette, greyscale and alpha images go through ``convert``.

    Raises:
        BadImageError: the file cannot be read or decoded (the message names it and gives the reason).
    """
    try:
        with open(path, "rb") as f:
            return _decode(f)
    except DECODE_ERRORS as e:
        raise bad_image_error(path, e) from e


def decode_image(data: bytes, name: str) -> Image.Image:
    """:func:`read_image` of a file's bytes (``name`` for the message)."""
    try:
        return _decode(NamedBytes(data, name))
    except DECODE_ERRORS as e:
        raise bad_image_error(name, e) from e


class NamedBytes(io.BytesIO):
    """A file's bytes in memory that Pillow's messages call by the file's name."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return repr(self.name)


def _decode(f) -> Image.Image:
    img = Image.open(f)
    img.load()  # decode now, inside the caller's try: Image.open only reads the header
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)  # [H, W], 0..65535
        img = Image.fromarray((arr / 257).round().clip(0, 255).astype(np.uint8))  # mode L
    return img.convert("RGB")


def bad_image_error(path, e: BaseException) -> BadImageError:
    """The :class:`BadImageError` for file ``path`` that failed with ``e``."""
    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return BadImageError(f"cannot read image {str(path)!r}: {reason}", str(path), reason)


class EmbeddedImages:
    """The photographs shipped in ``fastmae/assets`` (public domain / CC0; see its NOTICE), decoded, RGB."""

    def __init__(self):
        root = resources.files("fastmae.assets")
        self.names = list(EMBEDDED_NAMES)
        self.files = [(root / f"{name}.jpg").read_bytes() for name in self.names]
        self.images = [Image.open(io.BytesIO(data)).convert("RGB") for data in self.files]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return self.images[i]

    def path(self, i: int) -> str:
        return f"{self.names[i]}.jpg"

    def read_bytes(self, i: int) -> bytes:
        """The encoded file of image ``i``."""
        return self.files[i]


class FolderImages:
    """The images of a torchvision ``ImageFolder`` at ``root/train`` (``root/train/<class>/<image>``), as the
    original reads ImageNet; labels are ignored.

    Args:
        root: the dataset folder (holding ``train/``).
    """

    def __init__(self, root: str | Path):
        from torchvision.datasets import ImageFolder

        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data_path {str(root)!r} is not a folder (expected DIR/train/<class>/<images>)")
        train = root / "train"
        if not train.is_dir():
            raise ValueError(f"data_path {str(root)!r} has no train/ folder (expected DIR/train/<class>/<images>)")
        try:
            folder = ImageFolder(str(train))
        except FileNotFoundError as e:
            raise ValueError(f"data_path {str(root)!r}: no images under train/<class>/ ({e})") from e
        self.root = train
        self.paths = [path for path, _ in folder.samples]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; raises :class:`BadImageError` when its file cannot be decoded."""
        return read_image(self.paths[i])

    def path(self, i: int) -> str:
        return self.paths[i]

    def read_bytes(self, i: int) -> bytes:
        """The bytes of image ``i``'s file; raises :class:`BadImageError` when it cannot be read."""
        try:
            with open(self.paths[i], "rb") as f:
                return f.read()
        except OSError as e:
            raise bad_image_error(self.paths[i], e) from e


def load_readable(source, index: int, bad_images: str = "skip", load: Callable | None = None) -> tuple:
    """Image ``index`` of ``source``, or with ``bad_images="skip"`` the first readable one after it (wrapping
    around), and the images skipped on the way: ``(load(i), skipped)``.

    Args:
        source: an object with ``__len__`` and ``load(i)``, which raises :class:`BadImageError` on a bad file.
        index: in ``[0, len(source))``.
        bad_images: ``"skip"`` or ``"error"`` (re-raise the first :class:`BadImageError`).
        load: what reads image i instead of ``source.load`` (it raises :class:`BadImageError` the same way).
    """
    load = source.load if load is None else load
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
    skipped = []
    for k in range(len(source)):
        i = (index + k) % len(source)
        try:
            return load(i), skipped
        except BadImageError as e:
            if bad_images == "error":
                raise
            skipped.append(BadImage(i, e.path or str(i), e.reason or str(e)))
    raise BadImageError(
        f"none of the {len(source)} images can be read; the first: {skipped[0].path}: {skipped[0].reason}"
    )


def crop_box(
    height: int, width: int, rng: np.random.Generator, scale=CROP_SCALE, ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(top, left, h, w)``: area fraction ~ U(scale), log-aspect ~ U(log ratio).

    Up to ten draws; when none fits, the largest centred box whose aspect lies in ``ratio``.

    Args:
        height, width: the image size.
        rng: the generator the draws come from.
        scale: the range of the crop's area over the image's.
        ratio: the range of the crop's width over its height.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_model_input(img: Image.Image) -> torch.Tensor:
    """PIL RGB → ``[3, H, W]`` float32, ImageNet-normalized."""
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo :func:`to_model_input`'s normalization: ``[..., 3, H, W]`` → pixel values in [0, 1] (clamped)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


class RandomViews(Dataset):
    """MAE's random views of an image source; the view for key ``(epoch, index)`` depends only on
    ``(seed, epoch, index)``.

    Args:
        source: an object with ``__len__`` and ``load(i) -> PIL RGB image`` (:class:`EmbeddedImages`,
            :class:`FolderImages`).
        img_size: the side of the square views.
        seed: the data seed (the trainer passes ``seed + rank``).
        length: the number of views in an epoch; item ``i`` is a view of image ``i mod len(source)``.
            Defaults to ``len(source)`` (one view of every image per epoch).
        bad_images: ``"skip"`` (view the next readable image instead) or ``"error"`` (raise
            :class:`BadImageError`).
    """

    def __init__(self, source, img_size: int, seed: int = 0, length: int | None = None, bad_images: str = "skip"):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        if len(source) == 0:
            raise ValueError("the image source is empty")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        self.source = source
        self.img_size = img_size
        self.seed = seed
        self.bad_images = bad_images
        self.length = len(source) if length is None else length
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")

    def __len__(self) -> int:
        return self.length

    def sample(self, epoch: int, index: int) -> tuple[torch.Tensor, list[BadImage]]:
        """The view for ``(epoch, index)`` (``[3, img_size, img_size]`` float32, normalized) and the unreadable
        images skipped to make it (empty unless a file is bad)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} views")
        rng = np.random.default_rng([self.seed, epoch, index])
        img, skipped = load_readable(self.source, index % len(self.source), self.bad_images)
        top, left, h, w = crop_box(img.height, img.width, rng)
        size = [self.img_size, self.img_size]
        img = TF.resized_crop(img, top, left, h, w, size, interpolation=InterpolationMode.BICUBIC)
        if rng.uniform() < 0.5:
            img = TF.hflip(img)
        return to_model_input(img), skipped

    def view(self, epoch: int, index: int) -> torch.Tensor:
        """The view for ``(epoch, index)``: ``[3, img_size, img_size]`` float32, normalized."""
        return self.sample(epoch, index)[0]

    def __getitem__(self, key) -> torch.Tensor:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return self.view(epoch, index)


class _Samples(Dataset):
    """The loader's view of a :class:`RandomViews` (each item ``(view, skipped images)``), or of any dataset with
    ``sample(epoch, index)``."""

    def __init__(self, views):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, key):
        return self.views.sample(*key)


class ViewBatch(NamedTuple):
    """A loader batch: ``images [B, 3, S, S]`` and the unreadable images skipped while making it."""

    images: torch.Tensor
    bad: list[BadImage]


def collate_views(samples: Sequence[tuple[torch.Tensor, list[BadImage]]]) -> ViewBatch:
    """Stack the views of ``(view, skipped)`` samples into a :class:`ViewBatch`."""
    return ViewBatch(torch.stack([view for view, _ in samples]), [b for _, bad in samples for b in bad])


def center_views(
    source, img_size: int, count: int, bad_images: str = "skip", on_bad: Callable[[BadImage], None] | None = None
) -> torch.Tensor:
    """A fixed batch for looking at reconstructions: ``count`` images spread over ``source``, resized
    (shorter side, bicubic) and centre-cropped to ``img_size``: ``[count', 3, S, S]`` with
    ``count' = min(count, len(source))``.

    Args:
        source, img_size, count: as above.
        bad_images: ``"skip"`` (take the next readable image) or ``"error"``, as :class:`RandomViews`.
        on_bad: called with each skipped image.
    """
    count = min(count, len(source))
    picks = np.linspace(0, len(source) - 1, count).round().astype(int)
    views = []
    for i in picks:
        img, skipped = load_readable(source, int(i), bad_images)
        for bad in skipped if on_bad is not None else ():
            on_bad(bad)
        img = TF.resize(img, img_size, interpolation=InterpolationMode.BICUBIC)
        views.append(to_model_input(TF.center_crop(img, [img_size, img_size])))
    return torch.stack(views)  # [count, 3, S, S]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)`` keys and can start an epoch part-way through.

    ``set_epoch(epoch, start)`` picks the epoch's shuffle (as ``DistributedSampler.set_epoch``) and skips the
    first ``start`` indices of this rank's share: those already consumed before a checkpoint.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = itertools.islice(super().__iter__(), self.start, None)
        return ((self.epoch, i) for i in indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_loader(
    dataset: Dataset,
    sampler: ResumableDistributedSampler,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    seed: int = 0,
    collate_fn: Callable = collate_views,
) -> DataLoader:
    """A loader over ``sampler``'s keys with full batches only (``drop_last``, as the original); it yields
    :class:`ViewBatch` es (or what ``collate_fn`` makes).

    Args:
        dataset: a :class:`RandomViews` (or any dataset with ``sample(epoch, index)``).
        sampler: its sampler (call ``set_epoch`` before each ``iter``).
        batch_size: images per batch.
        num_workers: loader processes (0: load in the main process).
        pin_memory: page-locked batches for faster host→GPU copies.
        seed: seeds the loader's own generator, so creating an iterator leaves the global RNG untouched.
        collate_fn: makes a batch of ``dataset.sample`` results.
    """
    return DataLoader(
        _Samples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def open_source(data_path: str | Path | None) -> EmbeddedImages | FolderImages:
    """The embedded images when ``data_path`` is None, else the ImageFolder at ``data_path/train``."""
    return EmbeddedImages() if data_path is None else FolderImages(data_path)


def describe(source: Sequence | EmbeddedImages | FolderImages) -> str:
    """One line naming the source, for logs."""
    if isinstance(source, EmbeddedImages):
        return f"{len(source)} embedded images ({', '.join(source.names)})"
    if isinstance(source, FolderImages):
        return f"{len(source)} images under {source.root}"
    return f"{len(source)} images"
