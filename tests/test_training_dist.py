"""training/pretrain.py under ``torchrun`` with 2 CPU processes (gloo): DDP, FSDP2 against DDP, exact multi-rank
resume (single-process resume is in test_training.py)."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae import checkpoint as ck

from .test_training import SCRIPT, TINY, argv_of

# Several torchrun jobs of 2 processes, built once by a session-scoped fixture: the module stays on one
# pytest-xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]

# Runs the script's train() in each process, then dumps that rank's parameters (its shard under FSDP) and losses.
DRIVER = """
import importlib.util, os, sys
import torch
spec = importlib.util.spec_from_file_location("pretrain_dist", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
cfg = mod.parse_args(sys.argv[2:])
result = mod.train(cfg)
state = {k: getattr(v, "to_local", lambda: v)().detach().clone() for k, v in result.model.state_dict().items()}
torch.save({"state": state, "losses": result.losses}, os.path.join(cfg.output_dir, f"rank{os.environ['RANK']}.pt"))
"""


def torchrun(tmp_path: Path, name: str, *flags: str) -> list[dict]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    cmd += [str(SCRIPT), *argv_of(TINY), "--output-dir", str(out), "--max-steps", "6", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@functools.cache
def saved_model(tmp_path: Path, name: str, step: int) -> dict:
    return ck.load_checkpoint(ck.checkpoint_path(tmp_path / name, step))["model"]


@pytest.fixture(scope="session")  # once per worker (one worker with xdist_group)
def runs(tmp_path_factory):
    """Three 2-process runs of 6 steps (40 views, 2 ranks × 4 images × 2 micro-steps: 2 steps per epoch)."""
    tmp = tmp_path_factory.mktemp("dist")
    every3 = ("--save-every-steps", "3")
    ddp = torchrun(tmp, "ddp", *every3)
    fsdp = torchrun(tmp, "fsdp", "--fsdp", *every3)
    fsdp_resumed = torchrun(tmp, "fsdp_resumed", "--fsdp", "--resume", str(ck.checkpoint_path(tmp / "fsdp", 3)))
    return tmp, ddp, fsdp, fsdp_resumed


def test_ddp_ranks_hold_identical_parameters(runs):
    tmp, ddp, *_ = runs
    rank0, rank1 = ddp
    assert [s for s, _ in rank0["losses"]] == [1, 2, 3, 4, 5, 6]
    assert rank0["losses"] == rank1["losses"]  # the loss is averaged over ranks
    assert rank0["losses"][-1][1] < rank0["losses"][0][1]
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
    for name, value in saved_model(tmp, "ddp", 6).items():
        assert torch.equal(value, rank0["state"][name]), name
    position = ck.load_checkpoint(ck.checkpoint_path(tmp / "ddp", 3))["position"]
    assert position["world_size"] == 2 and position["epoch"] == 1 and position["step_in_epoch"] == 1


def test_fsdp_matches_ddp(runs):
    tmp, ddp, fsdp, _ = runs
    assert fsdp[0]["losses"] == fsdp[1]["losses"]
    ddp_losses = torch.tensor([loss for _, loss in ddp[0]["losses"]])
    fsdp_losses = torch.tensor([loss for _, loss in fsdp[0]["losses"]])
    torch.testing.assert_close(fsdp_losses, ddp_losses, rtol=1e-4, atol=1e-5)
    sharded = {k: v for k, v in fsdp[0]["state"].items() if v.shape != saved_model(tmp, "fsdp", 6)[k].shape}
    assert sharded, "FSDP should hold only a shard of some parameters on each rank"
    ddp_model, fsdp_model = saved_model(tmp, "ddp", 6), saved_model(tmp, "fsdp", 6)
    for name, value in ddp_model.items():
        torch.testing.assert_close(fsdp_model[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_resume_is_exact(runs):
    tmp, _, fsdp, fsdp_resumed = runs
    assert fsdp_resumed[0]["losses"] == fsdp[0]["losses"][3:]  # per-rank data position and RNG restored
    for rank in (0, 1):
        for name, value in fsdp[rank]["state"].items():
            assert torch.equal(value, fsdp_resumed[rank]["state"][name]), (rank, name)
    for name, value in saved_model(tmp, "fsdp", 6).items():
        assert torch.equal(value, saved_model(tmp, "fsdp_resumed", 6)[name]), name
