"""Checkpoint files: atomic writes, retention, refusal of bad files, RNG state round trip."""

import os
import random

import numpy as np
import pytest
import torch

from fastmae import checkpoint as ck


def sample_checkpoint(step=1, value=1.0):
    return {
        "model": {"w": torch.full((3, 4), value)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 0,
        "scaler": {},
        "args": {"model": "x", "lr": None},
        "step": step,
        "position": {"epoch": 0, "step_in_epoch": step},
        "rng": [ck.rng_state()],
    }


def test_atomic_save_and_weights_only_load(tmp_path):
    path = ck.atomic_save(sample_checkpoint(5), ck.checkpoint_path(tmp_path, 5))
    assert path.name == "checkpoint-00000005.pth"
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 5 and torch.equal(loaded["model"]["w"], torch.ones(3, 4))
    torch.load(path, weights_only=True)  # everything in it passes the safe unpickler
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~(os.umask(0o022) or 0o022))


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = ck.checkpoint_path(tmp_path, 7)
    ck.atomic_save(sample_checkpoint(7, 1.0), path)

    def crash(src, dst):
        raise KeyboardInterrupt("killed just before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save(sample_checkpoint(7, 2.0), path)
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(path)["model"]["w"], torch.ones(3, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_save_failing_mid_write_keeps_the_previous_file(tmp_path):
    path = ck.checkpoint_path(tmp_path, 1)
    ck.atomic_save(sample_checkpoint(1), path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("serialization failed half-way")

    bad = sample_checkpoint(1, 3.0)
    bad["args"]["oops"] = Unpicklable()
    with pytest.raises(RuntimeError, match="half-way"):
        ck.atomic_save(bad, path)
    assert ck.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_stale_temp_files_are_ignored_and_removed(tmp_path):
    ck.atomic_save(sample_checkpoint(2), ck.checkpoint_path(tmp_path, 2))
    stale = tmp_path / ".checkpoint-00000009.pth.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert ck.latest_checkpoint(tmp_path) == ck.checkpoint_path(tmp_path, 2)
    assert ck.remove_stale_temps(tmp_path) == [stale] and not stale.exists()


def test_truncated_checkpoint_is_refused_clearly(tmp_path):
    path = ck.atomic_save(sample_checkpoint(3), tmp_path / "checkpoint-00000003.pth")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope.pth")


def test_foreign_files_are_refused(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, weights)
    with pytest.raises(ck.CheckpointError, match="not a fastmae training checkpoint"):
        ck.load_checkpoint(weights)
    torch.save([1, 2], weights)
    with pytest.raises(ck.CheckpointError, match="holds a list"):
        ck.load_checkpoint(weights)


def test_model_state_mismatch_is_named():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    ck.check_model_state({"a": torch.ones(2, 3), "b": torch.ones(4)}, expected, "f.pth")
    with pytest.raises(ck.CheckpointError, match=r"'a' is \[3, 3\] in the file, \[2, 3\] in the model"):
        ck.check_model_state({"a": torch.ones(3, 3), "b": torch.ones(4)}, expected, "f.pth")
    with pytest.raises(ck.CheckpointError, match=r"missing keys \['b'\]"):
        ck.check_model_state({"a": torch.ones(2, 3)}, expected, "f.pth")


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 10, 2, 30):
        ck.atomic_save(sample_checkpoint(step), ck.checkpoint_path(tmp_path, step))
    removed = ck.prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-00000001.pth", "checkpoint-00000002.pth"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [10, 30]
    assert ck.prune(tmp_path, 0) == []


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = ck.atomic_save(sample_checkpoint(), tmp_path / "checkpoint-00000001.pth")
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    ck.set_rng_state(ck.load_checkpoint(path)["rng"][0])
    again = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]
