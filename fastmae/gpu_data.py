"""The GPU input path (``--decode gpu``): loader workers serve encoded images; the GPU decodes and crops them.

A worker does what :class:`fastmae.data.RandomViews` does up to the pixels: it reads the file's bytes, takes the
image size from the header (no decoding), and draws the view's crop box and flip from the generator seeded with
``(seed, epoch, index)``, in the same order. So the stream is the same function of ``(seed, epoch, index)`` and the
files as on the CPU path: independent of the number of workers, exact after a resume, and with the same boxes and
flips. The main process (:class:`ViewDecoder`) then decodes the batch's JPEGs in one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call and makes every view with one launch of
:func:`fastmae.kernels.resized_crop.resized_crop` (through :func:`fastmae.ops.resized_crop`).

What the GPU decoder gets: baseline, extended-sequential or progressive Huffman JPEGs, 8-bit, three YCbCr
components with 4:4:4, 4:2:2, 4:2:0 or 4:4:0 sampling, ending with the end-of-image marker (:func:`gpu_decodable`).
Everything else (PNG and other formats, CMYK, greyscale, RGB-coded or arithmetic-coded JPEGs, other subsampling,
truncated files), and any JPEG the GPU decoder fails on, is decoded by Pillow in the main process, that sample
alone, exactly as the CPU path decodes it. A file that Pillow cannot decode either is a bad image: with
``bad_images="skip"`` the next readable image takes its place under the same random numbers, as on the CPU path
(the worker skips files whose header cannot be read; the main process those whose data cannot be decoded).

Without CUDA the same path runs with a CPU stand-in for the GPU decoder (``decode_jpeg`` on the CPU, the same
libjpeg-turbo as Pillow) and the eager :func:`fastmae.reference.resized_crop` (or the kernel under
``TRITON_INTERPRET=1``), which is how it is tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from . import data, ops

# Start-of-frame markers (0xC4, 0xC8 and 0xCC share the range but are not frames).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
GPU_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential and progressive, Huffman-coded
LUMA_SAMPLING = ((1, 1), (2, 1), (2, 2), (1, 2))  # 4:4:4, 4:2:2, 4:2:0, 4:4:0 (chroma 1×1)
RGB_IDS = (ord("R"), ord("G"), ord("B"))


class JpegHeader(NamedTuple):
    """A JPEG's frame header: its SOF marker, sample precision, size, components ``(id, h, v)`` and the Adobe
    APP14 colour transform (None without that segment)."""

    marker: int
    precision: int
    height: int
    width: int
    components: tuple[tuple[int, int, int], ...]
    adobe_transform: int | None


def jpeg_header(buf: bytes) -> JpegHeader | None:
    """The frame header of a JPEG file's bytes, read by walking its markers; None when ``buf`` is not a JPEG or
    its markers cannot be followed up to the frame header."""
    if buf[:2] != b"\xff\xd8":
        return None
    pos, adobe, n = 2, None, len(buf)
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        segment = buf[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2 or marker in (0xD9, 0xDA):  # cut short, or no frame first
            return None
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        if marker in SOF_MARKERS:
            count = segment[5] if len(segment) >= 6 else 0
            if count == 0 or len(segment) < 6 + 3 * count:
                return None
            comps = tuple((segment[6 + 3 * k], segment[7 + 3 * k] >> 4, segment[7 + 3 * k] & 15) for k in range(count))
            h, w = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            return JpegHeader(marker, segment[0], h, w, comps, adobe)
        pos += 2 + length
    return None


def gpu_decodable(header: JpegHeader | None, buf: bytes) -> bool:
    """Whether the GPU decoder gets this file (module docstring); the rest goes to Pillow."""
    if header is None or header.marker not in GPU_SOF or header.precision != 8 or min(header.height, header.width) < 1:
        return False
    comps = header.components
    if len(comps) != 3 or header.adobe_transform == 0 or tuple(c[0] for c in comps) == RGB_IDS:
        return False  # not YCbCr
    if comps[0][1:] not in LUMA_SAMPLING or comps[1][1:] != (1, 1) or comps[2][1:] != (1, 1):
        return False
    return buf.rstrip(b"\0")[-2:] == b"\xff\xd9"  # complete: truncated files get Pillow's verdict


def probe(buf: bytes, name: str) -> tuple[int, int, bool]:
    """``(height, width, gpu_decodable)`` of an encoded image from its header alone.

    Raises:
        BadImageError: the header cannot be read (the file cannot be decoded either).
    """
    header = jpeg_header(buf)
    if header is not None and min(header.height, header.width) >= 1:
        return header.height, header.width, gpu_decodable(header, buf)
    try:
        with Image.open(data.NamedBytes(buf, name)) as img:  # reads the header only
            width, height = img.size
    except data.DECODE_ERRORS as e:
        raise data.bad_image_error(name, e) from e
    return height, width, False


class EncodedView(NamedTuple):
    """What a worker serves for key ``(epoch, index)``: the file's bytes, the view's crop box ``(top, left, h, w)``
    and flip, whether the GPU decoder takes it, the source image it comes from and the images skipped."""

    data: bytes
    box: tuple[int, int, int, int]
    flip: bool
    gpu: bool
    key: tuple[int, int]
    source_index: int
    skipped: list[data.BadImage]


class EncodedBatch(NamedTuple):
    """A loader batch of the GPU path: the files' bytes back to back (``data [total]``, image i is
    ``data[offsets[i]:offsets[i + 1]]``), ``boxes [B, 4]``, ``flips [B]``, ``gpu [B]``, ``keys [B, 2]``,
    ``sources [B]`` and the unreadable images skipped."""

    data: torch.Tensor
    offsets: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    gpu: torch.Tensor
    keys: torch.Tensor
    sources: torch.Tensor
    bad: list[data.BadImage]


def collate_encoded(views: Sequence[EncodedView]) -> EncodedBatch:
    """One :class:`EncodedBatch` of the views: one buffer for all bytes, so a batch crosses from a worker in one
    shared-memory block."""
    sizes = np.fromiter((len(v.data) for v in views), dtype=np.int64, count=len(views))
    buf = np.concatenate([np.frombuffer(v.data, dtype=np.uint8) for v in views]) if views else np.zeros(0, np.uint8)
    return EncodedBatch(
        torch.from_numpy(buf),
        torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)])),
        torch.tensor([v.box for v in views], dtype=torch.int64).view(-1, 4),
        torch.tensor([v.flip for v in views], dtype=torch.bool),
        torch.tensor([v.gpu for v in views], dtype=torch.bool),
        torch.tensor([v.key for v in views], dtype=torch.int64).view(-1, 2),
        torch.tensor([v.source_index for v in views], dtype=torch.int64),
        [b for v in views for b in v.skipped],
    )


class EncodedViews(Dataset):
    """:class:`fastmae.data.RandomViews` up to the pixels: ``sample(epoch, index)`` is an :class:`EncodedView`
    with the same box and flip as the view ``RandomViews`` makes for that key.

    Args:
        source: an image source with ``read_bytes(i)`` and ``path(i)`` as well (:class:`fastmae.data.EmbeddedImages`,
            :class:`fastmae.data.FolderImages`).
        img_size, seed, length, bad_images: as :class:`fastmae.data.RandomViews`.
    """

    def __init__(self, source, img_size: int, seed: int = 0, length: int | None = None, bad_images: str = "skip"):
        self.views = data.RandomViews(source, img_size, seed, length, bad_images)  # the same checks and fields
        self.source, self.img_size, self.seed, self.bad_images = source, img_size, seed, bad_images

    def __len__(self) -> int:
        return len(self.views)

    def _read(self, i: int) -> tuple[bytes, int, int, bool]:
        buf = self.source.read_bytes(i)
        return (buf, *probe(buf, self.source.path(i)))

    def sample(self, epoch: int, index: int) -> EncodedView:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} views")
        rng = np.random.default_rng([self.seed, epoch, index])
        start = index % len(self.source)
        (buf, height, width, gpu), skipped = data.load_readable(self.source, start, self.bad_images, self._read)
        box = data.crop_box(height, width, rng)
        flip = bool(rng.uniform() < 0.5)
        used = (start + len(skipped)) % len(self.source)
        return EncodedView(buf, box, flip, gpu, (epoch, index), used, skipped)

    def substitute(self, epoch: int, index: int, failed: int) -> tuple[Image.Image, tuple, bool, list]:
        """The view of key ``(epoch, index)`` when its image ``failed`` (whose header was readable) cannot be
        decoded: the next readable image after it, decoded by Pillow, with the box and flip drawn from the key's
        generator (as the CPU path draws them): ``(image, box, flip, images skipped after failed)``."""
        rng = np.random.default_rng([self.seed, epoch, index])
        img, skipped = data.load_readable(self.source, (failed + 1) % len(self.source), self.bad_images)
        return img, data.crop_box(img.height, img.width, rng), bool(rng.uniform() < 0.5), skipped


class ViewDecoder:
    """Turns an :class:`EncodedBatch` into the :class:`fastmae.data.ViewBatch` of its views, on ``device``.

    Args:
        views: the :class:`EncodedViews` the batch comes from (for its source, size, seed and bad-image policy).
        device: where the views go; on CUDA the JPEGs are decoded there, elsewhere by the CPU stand-in.
        dtype: the views' dtype (the model's input dtype: float32 under autocast, as the CPU path's).
        impl: :func:`fastmae.ops.resized_crop`'s implementation choice (``$FASTMAE_IMPL`` overrides it, as for
            the model's ops).

    ``gpu_decoded`` and ``pillow_decoded`` count the images each decoder made (for logs and benchmarks).
    """

    def __init__(self, views: EncodedViews, device: torch.device | str, dtype=torch.float32, impl: str = "auto"):
        self.views, self.device, self.dtype, self.impl = views, torch.device(device), dtype, ops.resolve_impl(impl)
        self.gpu_decoded = self.pillow_decoded = 0

    def decode_jpegs(self, files: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """``[3, H, W]`` uint8 RGB images of JPEG files, batched; None for each one the decoder fails on."""
        from torchvision.io import ImageReadMode, decode_jpeg

        where = self.device if self.device.type == "cuda" else "cpu"
        if not files:
            return []
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=where))
        except (RuntimeError, ValueError):  # one bad file fails the batch: retry one by one
            out = []
            for f in files:
                try:
                    out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=where))
                except (RuntimeError, ValueError):
                    out.append(None)
            return out

    def __call__(self, batch: EncodedBatch) -> data.ViewBatch:
        offsets = batch.offsets.tolist()
        files = [batch.data[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        images: list[torch.Tensor | None] = [None] * len(files)
        jpegs = batch.gpu.nonzero().flatten().tolist()
        for i, img in zip(jpegs, self.decode_jpegs([files[i] for i in jpegs])):
            images[i] = img
        self.gpu_decoded += sum(img is not None for img in images)
        boxes, flips, bad = batch.boxes.clone(), batch.flips.clone(), list(batch.bad)
        for i in (i for i, img in enumerate(images) if img is None):  # Pillow, this sample alone
            source = int(batch.sources[i])
            try:
                img = data.decode_image(files[i].numpy().tobytes(), self.views.source.path(source))
            except data.BadImageError as e:
                if self.views.bad_images == "error":
                    raise
                bad.append(data.BadImage(source, e.path or str(source), e.reason or str(e)))
                epoch, index = batch.keys[i].tolist()
                img, box, flip, skipped = self.views.substitute(epoch, index, source)
                boxes[i], flips[i] = torch.tensor(box), flip
                bad += skipped
            pixels = torch.from_numpy(np.array(img))  # [H, W, 3]
            if self.device.type == "cuda":  # through pinned memory: the copy does not block the host
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            images[i] = pixels.permute(2, 0, 1)  # [3, H, W], HWC strides
            self.pillow_decoded += 1
        views = ops.resized_crop(
            self.impl, images, boxes, flips, self.views.img_size, data.IMAGENET_MEAN, data.IMAGENET_STD, self.dtype
        )
        return data.ViewBatch(views, bad)  # [B, 3, S, S] on device
