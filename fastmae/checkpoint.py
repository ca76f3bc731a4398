"""Training checkpoints: atomic writes, retention, validated loading and the RNG state they carry.

A checkpoint is the original MAE's dict (``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``) plus
``step``, ``position`` (where in the data stream the run stopped) and ``rng`` (per-rank generator states), all
plain containers, tensors and numbers, so ``torch.load(path, weights_only=True)`` reads it. The first five are
written as the original writes them, so its ``load_model`` resumes a fastmae checkpoint: ``optimizer`` in
``Optimizer.state_dict()`` form (integer ids, groups no-decay then decay) and ``scaler`` a GradScaler state an
enabled scaler accepts in every precision (:func:`scaler_state`).

Files written by the original training code hold ``args`` as an ``argparse.Namespace``; :func:`read_file`
allows exactly that class (:data:`SAFE_GLOBALS`) through ``torch.serialization.safe_globals``, never
``weights_only=False``, and tells a corrupt file apart from one holding other objects.

Names: ``checkpoint-<step, 8 digits>.pth`` (the newest ``keep_last`` kept, for resuming) and, at epoch
boundaries, the original's ``checkpoint-<epoch>.pth`` (never pruned), a hard link to (or copy of) the step file.

Writes are atomic: the bytes go to a temporary file in the destination folder, are flushed and fsync'ed, the
file is renamed over the destination with ``os.replace`` and the folder is fsync'ed. A crash at any point leaves
either the old file or the new one, never a mix; a leftover temporary file (``.<name>.*.tmp``) is ignored by
:func:`list_checkpoints` and removed by :func:`remove_stale_temps`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

FORMAT = "fastmae.pretrain/1"
REQUIRED_KEYS = ("model", "optimizer", "epoch", "scaler", "args", "step", "position")
ORIGINAL_KEYS = ("model", "optimizer", "epoch")  # what the original's load_model needs to resume
# The classes beyond tensors, containers and numbers that MAE checkpoints hold: the original's ``args``.
SAFE_GLOBALS = (argparse.Namespace,)
_NAME = re.compile(r"^checkpoint-(\d{8,})\.pth$")  # step-named: 8 digits or more
_EPOCH_NAME = re.compile(r"^checkpoint-(0|[1-9]\d{0,6})\.pth$")  # the original's epoch names: 7 digits at most


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable (truncated, corrupt) or not matching the run."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """``output_dir/checkpoint-<step, 8 digits>.pth``."""
    return Path(output_dir) / f"checkpoint-{step:08d}.pth"


def epoch_checkpoint_path(output_dir: str | Path, epoch: int) -> Path:
    """``output_dir/checkpoint-<epoch>.pth``, the original's name for the checkpoint after epoch ``epoch``
    (0-based, below 10^7 so that it never reads as a step name)."""
    if not 0 <= epoch < 10**7:
        raise ValueError(f"epoch must be in [0, 10^7), got {epoch}")
    return Path(output_dir) / f"checkpoint-{epoch}.pth"


def _list(output_dir: str | Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The ``(step, path)`` of every step-named ``checkpoint-<step>.pth`` in ``output_dir``, oldest first."""
    return _list(output_dir, _NAME)


def list_epoch_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The ``(epoch, path)`` of every epoch-named ``checkpoint-<epoch>.pth`` in ``output_dir``, oldest first."""
    return _list(output_dir, _EPOCH_NAME)


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


def link_or_copy(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` hold the bytes of ``src`` atomically: a hard link when the filesystem has them (no extra
    space), else a copy; a file already at ``dst`` is replaced."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
    except OSError:
        tmp.unlink(missing_ok=True)
        with src.open("rb") as f:
            return atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    return dst


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
    """Delete all but the ``keep_last`` newest step-named checkpoints (``keep_last <= 0`` keeps all; epoch-named
    ones are never deleted); returns the deleted."""
    if keep_last <= 0:
        return []
    old = [path for _, path in list_checkpoints(output_dir)[:-keep_last]]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def read_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed, onto the CPU.

    Args:
        path: the file.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or holds objects beyond tensors, containers,
            numbers and :data:`SAFE_GLOBALS` (the message names them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = _unsafe_globals(path) if isinstance(e, pickle.UnpicklingError) else []
        if unsafe:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects fastmae does not unpickle: {unsafe}. It reads tensors, "
                "containers, numbers and argparse.Namespace only (weights_only=True); if you trust the file, load "
                "it with torch.load(weights_only=False) and pass the state dict instead"
            ) from e
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated or corrupt ({type(e).__name__}: {reason})"
        ) from e


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions in the pickle at ``path`` that :func:`read_file` refuses ([] when unreadable)."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []
    return [name for name in found if name not in allowed]


def is_original(ckpt: Mapping) -> bool:
    """Whether a checkpoint that :func:`load_checkpoint` accepted was written by the original training code (no
    data position: it resumes at the next epoch boundary)."""
    return "position" not in ckpt or "step" not in ckpt


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint, fastmae's or the original MAE code's, safely (:func:`read_file`).

    Args:
        path: the file.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, holds unsupported objects, or is not a
            training checkpoint (e.g. released weights, which lack the optimizer and epoch).
    """
    ckpt = read_file(path)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a training checkpoint")
    missing = [k for k in (ORIGINAL_KEYS if is_original(ckpt) else REQUIRED_KEYS) if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a fastmae training checkpoint nor one of the original MAE code: it "
            f"lacks {missing} (to start from its weights, use --init-from or MAE.load_pretrained instead)"
        )
    return dict(ckpt)


def resume_step(ckpt: Mapping, layout: Mapping, steps_per_epoch: int, path="checkpoint") -> tuple[int, bool]:
    """Where a run with data ``layout`` continues from a checkpoint: ``(step, exact)``.

    A fastmae checkpoint of the same layout continues at its step, mid-epoch too (``exact``: restore its RNG
    states); of another layout (e.g. more GPUs) at its epoch boundary. One written by the original code (no data
    position) restarts at the epoch after its ``epoch``, as the original's ``load_model`` does.

    Raises:
        CheckpointError: a mid-epoch checkpoint of another layout.
    """
    if is_original(ckpt):
        return (int(ckpt["epoch"]) + 1) * steps_per_epoch, False
    pos = ckpt["position"]
    if all(pos.get(k) == v for k, v in layout.items()):
        return ckpt["step"], True
    if pos["step_in_epoch"] == 0:
        return pos["epoch"] * steps_per_epoch, False
    raise CheckpointError(
        f"checkpoint {str(path)!r} stopped mid-epoch with {dict(pos)}; this run has {dict(layout)}: an exact "
        "mid-epoch resume needs the same layout (or resume from an end-of-epoch checkpoint)"
    )


def optimizer_by_index(state: Mapping) -> dict:
    """A full optimizer state dict keyed by parameter names (``torch.distributed.checkpoint``'s form) in
    ``Optimizer.state_dict()``'s form: integer ids numbered through the groups in order, as the original writes."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    ids = {name: i for i, name in enumerate(names)}
    return {
        "state": {ids[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_by_name(state: Mapping, group_names: Sequence[Sequence[str]], path="checkpoint") -> dict:
    """The inverse of :func:`optimizer_by_index`: integer ids → the parameter names of the running optimizer's
    groups (``group_names[g]`` lists group g's names in order). A state keyed by names is returned as is.

    Raises:
        CheckpointError: the groups differ in number or size.
    """
    groups = state["param_groups"]
    if all(isinstance(p, str) for g in groups for p in g["params"]):
        return dict(state)
    sizes, expected = [len(g["params"]) for g in groups], [len(n) for n in group_names]
    if sizes != expected:
        raise CheckpointError(
            f"{str(path)!r}: the optimizer has parameter groups of sizes {sizes} in the file, {expected} here "
            "(no-decay, decay): was it written for another model?"
        )
    names = {i: n for g, group in zip(groups, group_names) for i, n in zip(g["params"], group)}
    return {
        "state": {names[i]: value for i, value in state["state"].items() if i in names},
        "param_groups": [{**g, "params": list(n)} for g, n in zip(groups, group_names)],
    }


def scaler_state(scaler: torch.amp.GradScaler) -> dict:
    """What to write as ``scaler``: the scaler's state (fp16), or with a disabled scaler (bf16, fp32) the fresh
    state of an enabled one, since the original's ``load_model`` hands it to an enabled GradScaler, which refuses
    the ``{}`` a disabled one returns. A disabled scaler ignores what it is given, so fastmae reads either."""
    return scaler.state_dict() if scaler.is_enabled() else torch.amp.GradScaler("cpu").state_dict()


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
