"""Training checkpoints: atomic writes, retention, validated loading and the RNG state they carry.

A checkpoint is the original MAE's dict (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``) plus
``step``, ``position`` (where in the data stream the run stopped) and ``rng`` (per-rank generator states), all
plain containers, tensors and numbers, so ``torch.load(path, weights_only=True)`` reads it.

Writes are atomic: the bytes go to a temporary file in the destination folder, are flushed and fsync'ed, the
file is renamed over the destination with ``os.replace`` and the folder is fsync'ed. A crash at any point leaves
either the old file or the new one, never a mix; a leftover temporary file (``.<name>.*.tmp``) is ignored by
:func:`list_checkpoints` and removed by :func:`remove_stale_temps`.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

FORMAT = "fastmae.pretrain/1"
REQUIRED_KEYS = ("model", "optimizer", "epoch", "scaler", "args", "step", "position")
_NAME = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable (truncated, corrupt) or not matching the run."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """``output_dir/checkpoint-<step, 8 digits>.pth``."""
    return Path(output_dir) / f"checkpoint-{step:08d}.pth"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The ``(step, path)`` of every ``checkpoint-<step>.pth`` in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which is flushed,
    fsync'ed and renamed over ``path``, then the folder is fsync'ed. On any error the temporary file is removed
    and ``path`` is untouched, so a reader never sees half a file.

    Args:
        path: the destination; its folder is created when missing.
        write: fills the open binary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temps(output_dir: str | Path) -> list[Path]:
    """Delete temporary files left by a writer that was killed mid-save; returns what was removed."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".checkpoint-*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (``keep_last <= 0`` keeps all); returns the deleted."""
    if keep_last <= 0:
        return []
    old = [path for _, path in list_checkpoints(output_dir)[:-keep_last]]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint with ``weights_only=True`` and check its keys.

    Args:
        path: the file.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or not a fastmae training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated or corrupt ({type(e).__name__}: {reason})"
        ) from e
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a training checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a fastmae training checkpoint: it lacks {missing} "
            "(to start from released weights, load them into the model instead of resuming)"
        )
    return dict(ckpt)


def check_model_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``expected``'s keys and shapes.

    Args:
        state: the checkpoint's model state dict.
        expected: the running model's (full, unsharded) state dict.
        path: the checkpoint's path, for the message.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''} (was it written for another --model?)"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not match the model: {key!r} is {list(state[key].shape)} in the "
                f"file, {list(value.shape)} in the model (was it written for another --model or --input-size?)"
            )


def rng_state() -> dict:
    """This process's generator states (torch CPU, torch CUDA of the current device, numpy, python) as tensors and
    numbers, so that ``weights_only`` loading accepts them."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state only when CUDA is in use here)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
