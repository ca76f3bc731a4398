"""A training process's input: its image source, views, resumable sampler and loader, and how a batch reaches the
device.

Two paths, chosen by ``decode``: ``"cpu"``, where the loader workers decode and crop with Pillow
(:class:`fastmae.data.RandomViews`), and ``"gpu"``, where the workers only read the files and draw each view's box
and flip, and the GPU decodes and crops the batch (:mod:`fastmae.gpu_data`). For the same seed, epoch and index
both paths use the same image, box and flip; ``"auto"`` is ``"gpu"`` on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import data, gpu_data

DECODES = ("auto", "cpu", "gpu")


def resolve_decode(decode: str, device: torch.device) -> str:
    """``"cpu"`` or ``"gpu"``: ``decode`` itself, or for ``"auto"`` the GPU path on a CUDA device."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    return ("gpu" if device.type == "cuda" else "cpu") if decode == "auto" else decode


@dataclass
class Pipeline:
    """One process's input: rank r reads its ``DistributedSampler`` share and its views use ``seed + r``.
    ``finish(batch)`` turns what the loader yields into a :class:`fastmae.data.ViewBatch` (on the device for the
    GPU path; the CPU path's batches are already views)."""

    source: data.EmbeddedImages | data.FolderImages
    dataset: data.RandomViews | gpu_data.EncodedViews
    sampler: data.ResumableDistributedSampler
    loader: torch.utils.data.DataLoader
    img_size: int
    decode: str
    finish: Callable[[object], data.ViewBatch]


def _identity(batch: data.ViewBatch) -> data.ViewBatch:
    return batch


def build_pipeline(
    source,
    img_size: int,
    *,
    decode: str,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world: int = 1,
    length: int | None = None,
    bad_images: str = "skip",
    batch_size: int,
    num_workers: int,
    pin_memory: bool = True,
    impl: str = "auto",
) -> Pipeline:
    """The views of ``source`` for rank ``rank`` of ``world``, loaded in full batches.

    Args:
        source: :class:`fastmae.data.EmbeddedImages` or :class:`fastmae.data.FolderImages`.
        img_size: the views' side.
        decode: ``"cpu"``, ``"gpu"`` or ``"auto"`` (module docstring).
        device: where training runs (the GPU path decodes there; pinned batches only on CUDA).
        seed: the run's seed: shuffles use it, rank r's views ``seed + r``.
        length: views per epoch (None: one per image).
        bad_images: ``"skip"`` or ``"error"``, as :class:`fastmae.data.RandomViews`.
        batch_size, num_workers: the loader's.
        pin_memory: pinned batches on CUDA (the CPU path's views; the GPU path's bytes need none).
        impl: the GPU path's :func:`fastmae.ops.resized_crop` choice.
    """
    decode = resolve_decode(decode, device)
    gpu = decode == "gpu"
    dataset = (gpu_data.EncodedViews if gpu else data.RandomViews)(source, img_size, seed + rank, length, bad_images)
    sampler = data.ResumableDistributedSampler(dataset, world, rank, seed=seed)
    pin = pin_memory and device.type == "cuda" and not gpu
    collate = gpu_data.collate_encoded if gpu else data.collate_views
    loader = data.build_loader(dataset, sampler, batch_size, num_workers, pin, seed + rank, collate)
    finish = gpu_data.ViewDecoder(dataset, device, impl=impl) if gpu else _identity
    return Pipeline(source, dataset, sampler, loader, img_size, decode, finish)
