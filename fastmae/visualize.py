"""Seeing a pretraining run: the metrics log, and pictures drawn with Pillow (reconstruction grids, loss curve).

A reconstruction grid has one row per image and four columns: the original, the masked input (removed patches
grey), the model's prediction of every patch, and the prediction with the visible patches pasted back. With
``norm_pix_loss`` the model predicts per-patch normalized pixels; they are mapped back with each patch's mean
and unbiased variance, as the loss defined them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from . import reference
from .checkpoint import atomic_write
from .data import IMAGENET_MEAN, IMAGENET_STD, denormalize

COLUMNS = ("original", "masked", "reconstruction", "recon. + visible")


def unnormalize_patches(pred: torch.Tensor, imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Map per-patch normalized predictions back to the input's scale.

    Args:
        pred: ``[N, L, p²·C]`` predictions of ``(t - mean) / sqrt(var + 1e-6)``.
        imgs: ``[N, C, H, W]`` the images whose patches ``t`` define mean and (unbiased) var.
        patch_size: p.
    """
    target = reference.patchify(imgs, patch_size)  # [N, L, p²C]
    mean = target.mean(dim=-1, keepdim=True)  # [N, L, 1]
    var = target.var(dim=-1, keepdim=True)  # [N, L, 1], unbiased
    return pred * (var + 1e-6) ** 0.5 + mean


def reconstruction_panels(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> list[torch.Tensor]:
    """The grid's four columns as ``[N, 3, H, W]`` pixel tensors in [0, 1].

    Args:
        imgs: ``[N, 3, H, W]`` ImageNet-normalized inputs.
        pred: ``[N, L, p²·3]`` the model's output.
        mask: ``[N, L]``, 1 = removed.
        patch_size: p.
        norm_pix_loss: whether ``pred`` is in per-patch normalized units.
    """
    imgs, pred, mask = imgs.float().cpu(), pred.float().cpu(), mask.float().cpu()
    n, c, h, w = imgs.shape
    grid = (h // patch_size, w // patch_size)
    if norm_pix_loss:
        pred = unnormalize_patches(pred, imgs, patch_size)
    recon = reference.unpatchify(pred, patch_size, c, grid)  # [N, C, H, W]
    mask_px = mask.unsqueeze(-1).expand(-1, -1, patch_size * patch_size * c)  # [N, L, p²C]
    mask_px = reference.unpatchify(mask_px, patch_size, c, grid)  # [N, C, H, W], 1 on removed pixels
    grey = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    masked = imgs * (1 - mask_px) + grey * mask_px
    pasted = imgs * (1 - mask_px) + recon * mask_px
    return [denormalize(x) for x in (imgs, masked, recon, pasted)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _to_pil(x: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] → PIL RGB."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
    return Image.fromarray(arr)


def grid_image(columns: Sequence[torch.Tensor], titles: Sequence[str] = COLUMNS, cell: int = 128) -> Image.Image:
    """Tile ``columns`` (each ``[N, 3, H, W]`` in [0, 1]) into rows of samples under a title bar.

    Args:
        columns: the panels, one tensor per column, the same N in each.
        titles: a caption per column.
        cell: the side each image is resized to (nearest, so patches stay sharp).
    """
    if not columns or len(columns) != len(titles):
        raise ValueError(f"need one title per column, got {len(columns)} columns and {len(titles)} titles")
    n = columns[0].shape[0]
    pad, header = 4, 22
    width = len(columns) * (cell + pad) + pad
    height = header + n * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for j, (col, title) in enumerate(zip(columns, titles)):
        x = pad + j * (cell + pad)
        draw.text((x + 2, 4), title, fill=(0, 0, 0), font=font)
        for i in range(n):
            tile = _to_pil(col[i]).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, header + i * (cell + pad)))
    return canvas


def _save_png(img: Image.Image, path: str | Path) -> Path:
    """Write ``img`` as a PNG atomically, so a reader never sees half a file."""
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_reconstructions(
    path: str | Path, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool
) -> Path:
    """Write the reconstruction grid of one forward pass as a PNG (see :func:`reconstruction_panels`)."""
    return _save_png(grid_image(reconstruction_panels(imgs, pred, mask, patch_size, norm_pix_loss)), path)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 × 10^k) covering ``[lo, hi]``."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def smooth(values: Sequence[float], radius: int) -> list[float]:
    """Centred moving average over ``2·radius + 1`` values (fewer at the ends), so the trend does not lag."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - radius), min(len(values), i + radius + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def loss_curve_image(
    steps: Sequence[float], losses: Sequence[float], title: str = "training loss", size: tuple[int, int] = (720, 420)
) -> Image.Image:
    """A line plot of ``losses`` against ``steps``: the raw values in light blue, a centred moving
    average (over about 1/50 of the run) in dark blue.

    Args:
        steps: x values (optimizer steps), increasing.
        losses: y values, finite.
        title: drawn above the plot.
        size: ``(width, height)`` in pixels.
    """
    if len(steps) != len(losses) or not steps:
        raise ValueError(f"need as many steps as losses and at least one, got {len(steps)} and {len(losses)}")
    width, height = size
    left, right, top, bottom = 64, 16, 30, 40
    x_lo, x_hi = float(steps[0]), float(steps[-1])
    if x_hi == x_lo:
        x_hi = x_lo + 1
    y_lo, y_hi = float(min(losses)), float(max(losses))
    margin = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - margin, y_hi + margin

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)
        py = top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)
        return px, py

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(12)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    for y in nice_ticks(y_lo, y_hi):
        _, py = to_px(x_lo, y)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.text((4, py - 7), f"{y:.4g}", fill=(60, 60, 60), font=font)
    for x in nice_ticks(x_lo, x_hi):
        px, _ = to_px(x, y_lo)
        draw.line([(px, top), (px, height - bottom)], fill=(230, 230, 230))
        draw.text((px - 10, height - bottom + 6), f"{x:g}", fill=(60, 60, 60), font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    draw.text((width // 2 - 14, height - 18), "step", fill=(0, 0, 0), font=font)
    raw = [to_px(x, y) for x, y in zip(steps, losses)]
    trend = [to_px(x, y) for x, y in zip(steps, smooth(losses, max(1, len(losses) // 100)))]
    if len(raw) > 1:
        draw.line(raw, fill=(160, 190, 235), width=1)
        draw.line(trend, fill=(20, 60, 160), width=2)
    else:
        px, py = raw[0]
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(20, 60, 160))
    return img


def save_loss_curve(
    path: str | Path, steps: Sequence[float], losses: Sequence[float], title: str = "training loss"
) -> Path:
    """Write :func:`loss_curve_image` as a PNG."""
    return _save_png(loss_curve_image(steps, losses, title), path)


class MetricsLog:
    """A run's record: ``metrics.jsonl`` (one JSON object per line, flushed at once) and, when
    ``torch.utils.tensorboard`` imports, the same numbers as TensorBoard scalars under ``tensorboard/``.

    Args:
        output_dir: where the files go.
        resume_step: when resuming, the checkpoint's step: records after it (logged by the run that was cut
            short, past its last checkpoint) are dropped so that no step appears twice. None starts a new log.
        tensorboard: also write TensorBoard scalars (silently skipped when TensorBoard is not installed).
    """

    SCALARS = ("loss", "lr", "img_per_s", "grad_norm", "peak_mem_mb")

    def __init__(self, output_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        output_dir = Path(output_dir)
        self.path = output_dir / "metrics.jsonl"
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("step", math.inf) <= resume_step:
                        self.records.append(record)
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.records).encode()))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        """Append one record (it must hold ``step``); its numeric :attr:`SCALARS` go to TensorBoard."""
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key in self.SCALARS:
                if isinstance(record.get(key), (int, float)):
                    self.tb.add_scalar(f"train/{key}", record[key], record["step"])

    def save_loss_curve(self, path: str | Path) -> Path | None:
        """Draw the logged losses (see :func:`save_loss_curve`); None while nothing is logged."""
        if not self.records:
            return None
        return save_loss_curve(path, [r["step"] for r in self.records], [r["loss"] for r in self.records])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
