"""Process set-up for training scripts: the torchrun process group, seeds, loader workers, peak memory."""

from __future__ import annotations

import os
import random
import resource
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job (torchrun's environment; a lone process is rank 0 of 1)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for without a process group)."""
        if dist.is_initialized():
            dist.barrier()


def setup(cuda: bool) -> Dist:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and pick this process's device.

    Args:
        cuda: use ``cuda:<LOCAL_RANK>``, else the CPU.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or "RANK" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from non-negative integer keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def cpus_per_rank() -> int:
    """The CPUs this process may use, shared among the ranks of its node."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def default_num_workers(device: torch.device) -> int:
    """Loader processes per rank: up to 8 feeding a GPU, at most 1 next to CPU training (which needs the cores)."""
    per_rank = cpus_per_rank()
    return min(8, max(1, per_rank - 1)) if device.type == "cuda" else min(1, per_rank - 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set on the CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
