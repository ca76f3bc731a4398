"""What ``bench_data.py`` and ``report.py``'s ``data`` section share: the input path's measurements.

The input path is not a fused op of the model (no gradient, no eager-vs-kernel provider table), so it has its own
rows rather than an entry in :data:`benches.harness.OPS`. Images: the photos shipped in ``fastmae/assets``
re-encoded as ImageNet-like JPEGs (quality 90, 4:2:0, at ImageNet's common sizes :data:`SIZES`), written as an
ImageFolder. They are smoother than camera photos (upscaled from about 256 px), so they decode somewhat faster
than real ImageNet files of the same size.

Measured (``--decode cpu`` is the CPU path, ``--decode gpu`` the GPU path; README, "Input"):

- ``cpu worker``: one loader worker's CPU path per image (read, Pillow decode, RandomResizedCrop, flip,
  normalize, and the batch's collate), on one thread as a worker runs;
- ``gpu worker``: the same for the GPU path (read, header, the box and flip, the batch's collate), with
  ``worker_share``, its time per image over the CPU path's;
- ``decode+crop``: the GPU path's main-process part for a batch: the batched JPEG decode and the views kernel,
  wall time with the device synchronized (``decode_ms``, ``kernel_ms`` alone);
- ``loader``: images/s a loader delivers with ``workers`` workers, for each path (the GPU path's is capped by its
  decode+crop rate), over the training step's images/s of the same run (``loader_over_step``); the GPU path's
  batch time as a share of the step (``step_share``).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benches import harness
from fastmae import data, gpu_data, ops

SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480))  # width × height
QUALITY = 90
GPU_BATCH = 256


def describe_images() -> str:
    return f"{len(data.EMBEDDED_NAMES) * len(SIZES)} JPEGs q{QUALITY} at " + ", ".join(f"{w}×{h}" for w, h in SIZES)


@functools.cache
def image_folder() -> Path:
    """The ImageFolder of re-encoded photos (made once per process, in a temporary folder removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="fastmae-bench-data-"))
    atexit.register(shutil.rmtree, root, True)
    source = data.EmbeddedImages()
    for i in range(len(source)):
        folder = root / "train" / source.names[i]
        folder.mkdir(parents=True)
        for w, h in SIZES:
            source.load(i).resize((w, h), Image.BICUBIC).save(folder / f"{w}x{h}.jpg", quality=QUALITY)
    return root


def workers_available() -> int:
    """The cores this process may run on: the loader workers one GPU gets here."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _per_image_ms(fn, count: int, rounds: int) -> float:
    """Median over ``rounds`` of the time of ``fn(count)`` per image, after one warm-up round (page cache)."""
    times = []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        fn(count)
        if r:
            times.append((time.perf_counter() - t0) * 1e3 / count)
    return statistics.median(times)


def worker_fn(path: str, img_size: int, count: int, batch: int = 64):
    """``fn(n)``: what one loader worker of ``path`` ("cpu" or "gpu") does for the first ``n`` of ``count`` views
    (each sampled, then collated in batches of ``batch``)."""
    source = data.FolderImages(image_folder())
    views, collate = (
        (data.RandomViews(source, img_size, seed=0, length=count), data.collate_views)
        if path == "cpu"
        else (gpu_data.EncodedViews(source, img_size, seed=0, length=count), gpu_data.collate_encoded)
    )

    def fn(n: int) -> None:
        for start in range(0, n, batch):
            collate([views.sample(0, i) for i in range(start, min(start + batch, n))])

    return fn


def worker_row(path: str, img_size: int, count: int = 256, rounds: int = 3) -> dict:
    """The ``cpu worker`` or ``gpu worker`` row: one worker's time per image on ``path``, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    try:
        ms = _per_image_ms(worker_fn(path, img_size, count), count, rounds)
    finally:
        torch.set_num_threads(threads)
    case = f"{describe_images()} (mean {mean_file_kib():.0f} KiB); {count} views of {img_size} px, one thread"
    return {"mode": f"{path} worker", "provider": path, "case": case, "ms": ms, "images_per_s": 1e3 / ms}


def encoded_batch(img_size: int, batch: int) -> tuple[gpu_data.EncodedViews, gpu_data.EncodedBatch]:
    """A collated GPU-path batch of ``batch`` views (the files repeat when there are fewer)."""
    enc = gpu_data.EncodedViews(data.FolderImages(image_folder()), img_size, seed=0, length=batch)
    return enc, gpu_data.collate_encoded([enc.sample(0, i) for i in range(batch)])


def decode_crop_row(img_size: int, device: torch.device, batch: int = GPU_BATCH) -> dict:
    """The ``decode+crop`` row: the main process's work for one batch on ``device`` (on the CPU: the decoder's
    stand-in and the kernel under the interpreter, which show that the code runs, not how fast)."""
    enc, encoded = encoded_batch(img_size, batch)
    decoder = gpu_data.ViewDecoder(enc, device, impl="triton")
    offsets = encoded.offsets.tolist()
    files = [encoded.data[offsets[i] : offsets[i + 1]] for i in range(batch)]
    images = decoder.decode_jpegs(files)
    if any(img is None for img in images):
        raise RuntimeError("a generated JPEG failed to decode")
    boxes, flips = encoded.boxes, encoded.flips

    def crop():
        args = (images, boxes, flips, img_size, data.IMAGENET_MEAN, data.IMAGENET_STD)
        return ops.resized_crop("triton", *args)

    for _ in range(2 if device.type == "cuda" else 1):  # warm-up: the decoder's and the kernel's set-up
        decoder(encoded)
    harness.sync(device)
    total = harness.time_ms(lambda: decoder(encoded), device, rep_ms=1000)
    decode = harness.time_ms(lambda: decoder.decode_jpegs(files), device, rep_ms=1000)
    kernel = harness.time_ms(crop, device, rep_ms=200)
    where = "CUDA decode_jpeg" if device.type == "cuda" else "CPU stand-in decoder, kernel interpreted"
    return {"mode": "decode+crop", "provider": "gpu", "case": f"batch {batch}, {where}", "ms": total,
            "images_per_s": batch / (total * 1e-3), "decode_ms": decode, "kernel_ms": kernel}  # fmt: skip


def loader_rows(rows: list[dict], step: dict | None, workers: int, batch: int) -> list[dict]:
    """Completes the data rows: ``worker_share`` on the gpu worker row, and returns the two ``loader`` rows
    (``step``: the training step's row of the same run, None when it was not measured)."""
    by_mode = {r["mode"]: r for r in rows if r.get("status", "ok") == "ok"}
    if "cpu worker" in by_mode and "gpu worker" in by_mode:
        by_mode["gpu worker"]["worker_share"] = by_mode["gpu worker"]["ms"] / by_mode["cpu worker"]["ms"]
    step_ips = step.get("images_per_s") if step else None
    step_ms = batch / step_ips * 1e3 if step_ips else None
    out = []
    for path in ("cpu", "gpu"):
        worker = by_mode.get(f"{path} worker")
        if worker is None or (path == "gpu" and "decode+crop" not in by_mode):
            continue
        ips = worker["images_per_s"] * workers
        row = {"mode": "loader", "provider": path, "case": f"{workers} workers, batch {batch}", "images_per_s": ips}
        if path == "gpu":
            row["images_per_s"] = min(ips, by_mode["decode+crop"]["images_per_s"])
            row["step_share"] = by_mode["decode+crop"]["ms"] / step_ms if step_ms else None
        row["ms"] = batch / row["images_per_s"] * 1e3  # per batch
        row["loader_over_step"] = row["images_per_s"] / step_ips if step_ips else None
        out.append(row)
    return out


def mean_file_kib() -> float:
    """The generated files' mean size (KiB), for the case label."""
    files = list(image_folder().rglob("*.jpg"))
    return float(np.mean([f.stat().st_size for f in files])) / 1024
