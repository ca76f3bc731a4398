"""Seeing a pretraining run: the metrics log, the progress report, and pictures drawn with Pillow
(reconstruction grids, loss curve).

A reconstruction grid has one row per image and four columns: the original, the masked input (removed patches
grey), the model's prediction of the masked patches (visible ones grey), and that prediction with the visible
patches of the input pasted in. Only the masked patches are ever shown as predicted: training scores those
alone, so the decoder's output at visible positions is untrained noise. With ``norm_pix_loss`` the model
predicts per-patch normalized pixels; they are mapped back with each patch's mean and unbiased variance, as the
loss defined them. Each PNG carries the step, the loss on its images and the mask ratio, in a caption and as
PNG text fields.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from . import reference
from .checkpoint import atomic_write
from .data import IMAGENET_MEAN, IMAGENET_STD, denormalize

COLUMNS = ("original", "masked", "prediction", "prediction + visible")


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
    """The grid's four columns (see the module docstring) as ``[N, 3, H, W]`` pixel tensors in [0, 1]; the
    prediction at visible patches is never drawn.

    Args:
        imgs: ``[N, 3, H, W]`` ImageNet-normalized inputs.
        pred: the model's output: ``[N, L, p²·3]`` for every patch, or ``[N, M, p²·3]`` for the masked patches
            only, in raster order (``pred_masked_only=True``).
        mask: ``[N, L]``, 1 = removed.
        patch_size: p.
        norm_pix_loss: whether ``pred`` is in per-patch normalized units.
    """
    imgs, pred, mask = imgs.float().cpu(), pred.float().cpu(), mask.float().cpu()
    n, c, h, w = imgs.shape
    grid = (h // patch_size, w // patch_size)
    if pred.shape[1] != mask.shape[1]:  # masked patches only: put them in place
        full = pred.new_zeros(n, mask.shape[1], pred.shape[-1])  # [N, L, p²C]
        full[mask.bool()] = pred.flatten(0, 1)
        pred = full
    if norm_pix_loss:
        pred = unnormalize_patches(pred, imgs, patch_size)
    recon = reference.unpatchify(pred, patch_size, c, grid)  # [N, C, H, W]
    mask_px = mask.unsqueeze(-1).expand(-1, -1, patch_size * patch_size * c)  # [N, L, p²C]
    mask_px = reference.unpatchify(mask_px, patch_size, c, grid)  # [N, C, H, W], 1 on removed pixels
    grey = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    masked = imgs * (1 - mask_px) + grey * mask_px
    predicted = grey * (1 - mask_px) + recon * mask_px
    pasted = imgs * (1 - mask_px) + recon * mask_px
    return [denormalize(x) for x in (imgs, masked, predicted, pasted)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _to_pil(x: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] → PIL RGB."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
    return Image.fromarray(arr)


def grid_image(
    columns: Sequence[torch.Tensor], titles: Sequence[str] = COLUMNS, cell: int = 128, caption: str | None = None
) -> Image.Image:
    """Tile ``columns`` (each ``[N, 3, H, W]`` in [0, 1]) into rows of samples under a title bar.

    Args:
        columns: the panels, one tensor per column, the same N in each.
        titles: a caption per column.
        cell: the side each image is resized to (nearest, so patches stay sharp).
        caption: a line drawn above the titles (e.g. the step and loss).
    """
    if not columns or len(columns) != len(titles):
        raise ValueError(f"need one title per column, got {len(columns)} columns and {len(titles)} titles")
    n = columns[0].shape[0]
    pad, top = 4, 20 if caption else 0
    header = top + 22
    width = len(columns) * (cell + pad) + pad
    height = header + n * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    if caption:
        draw.text((pad + 2, 4), caption, fill=(0, 0, 0), font=font)
    for j, (col, title) in enumerate(zip(columns, titles)):
        x = pad + j * (cell + pad)
        draw.text((x + 2, top + 4), title, fill=(0, 0, 0), font=font)
        for i in range(n):
            tile = _to_pil(col[i]).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, header + i * (cell + pad)))
    return canvas


def _save_png(img: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write ``img`` as a PNG atomically, so a reader never sees half a file; ``text`` goes into tEXt fields."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    return atomic_write(path, lambda f: img.save(f, format="PNG", pnginfo=info))


def save_reconstructions(
    path: str | Path,
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
    step: int | None = None,
    loss: float | None = None,
) -> Path:
    """Write the reconstruction grid of one forward pass as a PNG (see :func:`reconstruction_panels`), captioned
    with the step, the loss on these images and the mask ratio (also PNG text fields ``step``, ``loss``,
    ``mask_ratio``).

    Args:
        path, imgs, pred, mask, patch_size, norm_pix_loss: as :func:`reconstruction_panels`.
        step: the optimizer step of the weights.
        loss: the model's loss on these images and masks.
    """
    ratio = mask.float().mean().item()  # the fraction of patches removed
    text, shown = {}, []
    if step is not None:
        text["step"] = str(step)
        shown.append(f"step {step}")
    if loss is not None:
        text["loss"] = f"{loss:.6g}"
        shown.append(f"loss {loss:.4f}")
    text["mask_ratio"] = f"{ratio:g}"
    shown.append(f"mask ratio {ratio:g}")
    caption = " · ".join(shown)
    img = grid_image(reconstruction_panels(imgs, pred, mask, patch_size, norm_pix_loss), caption=caption)
    return _save_png(img, path, text)


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
    steps: Sequence[float],
    losses: Sequence[float],
    title: str = "training loss",
    size: tuple[int, int] = (720, 420),
    markers: bool | None = None,
) -> Image.Image:
    """A line plot of ``losses`` against ``steps``: the raw values in light blue, a centred moving
    average (over about 1/50 of the run) in dark blue; each value is also marked with a dot when there are at
    most 60, and the title gives the step range.

    Args:
        steps: x values (optimizer steps), increasing.
        losses: y values, finite.
        title: drawn above the plot.
        size: ``(width, height)`` in pixels.
        markers: mark each value with a dot (None: when there are at most 60).
    """
    if len(steps) != len(losses) or not steps:
        raise ValueError(f"need as many steps as losses and at least one, got {len(steps)} and {len(losses)}")
    width, height = size
    left, right, top, bottom = 64, 16, 30, 40
    x_lo, x_hi = float(steps[0]), float(steps[-1])
    title = f"{title}, steps {steps[0]:g} to {steps[-1]:g} ({len(steps)} values)"
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
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
    if markers or (markers is None and len(raw) <= 60):
        for px, py in raw:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(20, 60, 160))
    return img


def save_loss_curve(
    path: str | Path, steps: Sequence[float], losses: Sequence[float], title: str = "training loss"
) -> Path:
    """Write :func:`loss_curve_image` as a PNG, with the step range and count as PNG text fields."""
    text = {"first_step": f"{steps[0]:g}", "last_step": f"{steps[-1]:g}", "values": str(len(steps))} if steps else {}
    return _save_png(loss_curve_image(steps, losses, title), path, text)


class MetricsLog:
    """A run's record: ``metrics.jsonl`` (one JSON object per line, flushed at once) and, when
    ``torch.utils.tensorboard`` imports, the same numbers as TensorBoard scalars under ``tensorboard/``.

    Args:
        output_dir: where the files go.
        resume_step: when resuming, the checkpoint's step: records after it (logged by the run that was cut
            short, past its last checkpoint) are dropped so that no step appears twice. None starts a new log.
        tensorboard: also write TensorBoard scalars (silently skipped when TensorBoard is not installed).
        tensorboard_dir: their folder (default ``output_dir/tensorboard``).
    """

    SCALARS = ("loss", "lr", "img_per_s", "grad_norm", "peak_mem_mb", "bad_images")

    def __init__(
        self,
        output_dir: str | Path,
        resume_step: int | None = None,
        tensorboard: bool = True,
        tensorboard_dir: str | Path | None = None,
    ):
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
                self.tb = SummaryWriter(str(tensorboard_dir or output_dir / "tensorboard"))

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
        """Draw the loss of every step (a record's ``step_losses``, else its window mean; see
        :func:`save_loss_curve`); None while nothing is logged."""
        steps, losses = [], []
        for r in self.records:
            per_step = r.get("step_losses") or [r["loss"]]
            steps += range(r["step"] - len(per_step) + 1, r["step"] + 1)
            losses += per_step
        return save_loss_curve(path, steps, losses) if steps else None

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (days as ``D days, H:MM:SS``)."""
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def progress_line(record: dict, total: int, eta_s: float) -> str:
    """One log line for a metrics record: step/total, epoch, loss (window mean), lr, images/s, ETA, peak memory
    (and the unreadable images skipped in the window, when any)."""
    line = (
        f"step {record['step']}/{total} ({100 * record['step'] / total:.0f}%) | epoch {record['epoch']:.2f} | "
        f"loss {record['loss']:.4f} | lr {record['lr']:.3g} | {record['img_per_s']:.0f} img/s | "
        f"eta {format_duration(eta_s)} | peak mem {record['peak_mem_mb']:.0f} MiB"
    )
    return line + (f" | {record['bad_images']} unreadable images skipped" if record.get("bad_images") else "")


class Progress:
    """What the main process reports while training: a metrics record every ``log_every`` steps (and at the
    last), shown either on a progress bar (a terminal) or as one :func:`progress_line` per record (a file, a
    pipe, or ``bar=False``).

    Args:
        metrics: where records go (None on other ranks: nothing is reported, losses are still kept); closed
            with :meth:`close`.
        start, stop: the first step this run takes is ``start + 1``; it ends at ``stop``.
        steps_per_epoch, eff_batch: to give each record its epoch and images/s.
        log_every: steps per record; its loss is the mean over those steps.
        bar: draw a tqdm bar instead of lines (the caller decides, e.g. only when the stream is a terminal).
        memory: returns the peak memory in MiB.
        stream: where lines and the bar go.
    """

    def __init__(
        self,
        metrics: MetricsLog | None,
        start: int,
        stop: int,
        steps_per_epoch: int,
        eff_batch: int,
        log_every: int,
        bar: bool,
        memory: Callable[[], float],
        stream: TextIO | None = None,
    ):
        self.metrics, self.start, self.stop = metrics, start, stop
        self.steps_per_epoch, self.eff_batch, self.log_every, self.memory = (
            steps_per_epoch,
            eff_batch,
            log_every,
            memory,
        )
        self.stream = stream or sys.stdout
        self.losses: list[tuple[int, float]] = []
        self.window: list[float] = []
        self.window_bad = 0
        self.bad_total = 0
        self.first_record: dict | None = None
        self.last_record: dict | None = None
        self.t0 = self.t_window = time.perf_counter()
        self.bar = None
        if bar and metrics is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=stop, initial=start, file=self.stream, dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float, grad_norm: float, bad_images: int = 0) -> dict | None:
        """Account for optimizer step ``step``; returns the metrics record when one is due."""
        self.losses.append((step, loss))
        self.window.append(loss)
        self.window_bad += bad_images
        self.bad_total += bad_images
        if self.bar is not None:
            self.bar.update(1)
        if self.metrics is None or not (step % self.log_every == 0 or step == self.stop):
            return None
        now = time.perf_counter()
        record = dict(step=step, epoch=round(step / self.steps_per_epoch, 4), lr=lr)
        record.update(loss=sum(self.window) / len(self.window), grad_norm=grad_norm)
        record.update(img_per_s=len(self.window) * self.eff_batch / max(now - self.t_window, 1e-9))
        record.update(peak_mem_mb=self.memory(), bad_images=self.window_bad, time=time.time())
        record["step_losses"] = list(self.window)
        self.metrics.write(record)
        eta = (self.stop - step) * (now - self.t0) / (step - self.start)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['img_per_s']:.0f}")
        else:
            print(progress_line(record, self.stop, eta), file=self.stream, flush=True)
        self.first_record = self.first_record or record
        self.last_record = record
        self.window, self.window_bad, self.t_window = [], 0, now
        return record

    def summary(self, step: int, output_dir: str | Path) -> str:
        """The closing line: the first and last records' window-mean losses (as logged), time, bad images."""
        took = format_duration(time.perf_counter() - self.t0)
        if self.first_record is None:
            return f"done: step {step}, no step taken ({took}); outputs in {output_dir}"
        first, last = self.first_record, self.last_record
        first_step = lambda r: r["step"] - len(r["step_losses"]) + 1
        span = lambda r: f"step {r['step']}" if first_step(r) == r["step"] else f"steps {first_step(r)}–{r['step']}"
        bad = f", {self.bad_total} unreadable images skipped" if self.bad_total else ""
        return (
            f"done: step {step}, loss {first['loss']:.4f} ({span(first)}) → {last['loss']:.4f} ({span(last)}), "
            f"window means as logged; {took}{bad}; outputs in {output_dir}"
        )

    def close(self) -> None:
        """Close the bar and the metrics log."""
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
