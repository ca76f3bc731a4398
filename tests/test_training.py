"""training/pretrain.py in one process: exact resume, faults, flags, outputs."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import checkpoint as ck
from fastmae import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "pretrain.py"


def load_pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pretrain = load_pretrain()

# A tiny run: 32-px views of the nano model (16 patches, 4 visible), 5 optimizer steps per epoch of 40 views.
TINY = dict(
    model="mae_vit_nano_patch8", input_size=32, batch_size=4, accum_iter=2, views_per_epoch=40, epochs=4,
    warmup_epochs=1, blr=2e-3, num_workers=0, device="cpu", save_every_epochs=0, log_every=1, viz_every=0,
    progress=False, tensorboard=False,
)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread: the tiny model gains nothing from more, and a shared CPU makes them slow."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the script leaves the thread count alone when this is set
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, name="run", **overrides):
    return pretrain.TrainConfig(**{**TINY, "output_dir": str(tmp_path / name), **overrides})


def test_resume_mid_epoch_is_exact(tmp_path):
    straight = pretrain.train(tiny(tmp_path, "straight", max_steps=8))
    first = pretrain.train(tiny(tmp_path, "split", max_steps=4))  # stops mid-epoch 0 (5 steps/epoch)
    assert [s for s, _ in first.losses] == [1, 2, 3, 4]
    assert first.checkpoint.name == "checkpoint-00000004.pth"
    resumed = pretrain.train(tiny(tmp_path, "split", max_steps=8, resume="auto"))
    assert [s for s, _ in resumed.losses] == [5, 6, 7, 8]
    assert resumed.losses == straight.losses[4:]  # bit-identical losses, across the epoch boundary
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    a, b = ck.load_checkpoint(straight.checkpoint), ck.load_checkpoint(resumed.checkpoint)
    for key, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][key][k]), (key, k)
    assert straight.losses[-1][1] < straight.losses[0][1]
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))  # one record per step, none duplicated


def test_gpu_decode_resume_is_exact_and_independent_of_workers(tmp_path):
    """--decode gpu on the CPU (the decoder's CPU stand-in, the eager views): a run resumed mid-epoch, on two
    loader workers, continues bit for bit; the views differ from the CPU path's only by PIL's roundings."""
    gpu = dict(decode="gpu")
    straight = pretrain.train(tiny(tmp_path, "straight", max_steps=8, **gpu))
    pretrain.train(tiny(tmp_path, "split", max_steps=4, **gpu))
    resumed = pretrain.train(tiny(tmp_path, "split", max_steps=8, resume="auto", num_workers=2, **gpu))
    assert resumed.losses == straight.losses[4:]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "split" / "config.json").read_text())["decode"] == "gpu"
    cpu = pretrain.train(tiny(tmp_path, "cpu", max_steps=1, decode="cpu"))
    assert cpu.losses[0][1] == pytest.approx(straight.losses[0][1], rel=1e-2)  # the same views, nearly the same pixels


def test_checkpoint_contents(tmp_path):
    result = pretrain.train(tiny(tmp_path, max_steps=6, save_every_steps=2, keep_last=2))
    assert [s for s, _ in ck.list_checkpoints(result.output_dir)] == [4, 6]
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args", "step", "position", "rng"} <= set(state)
    assert state["step"] == 6 and state["epoch"] == 0  # epoch 0 completed (5 steps), as the original counts
    assert state["position"]["epoch"] == 1 and state["position"]["step_in_epoch"] == 1
    assert type(state["args"]) is dict and state["args"]["model"] == "mae_vit_nano_patch8"
    assert state["scaler"] == torch.amp.GradScaler("cpu").state_dict() and len(state["rng"]) == 1  # not {}: see interop
    assert set(state["model"]) == set(result.model.state_dict())
    out = sorted(p.name for p in result.output_dir.iterdir())
    assert "metrics.jsonl" in out and "loss.png" in out and "encoder.pth" in out and "config.json" in out
    assert "recon-00000000.png" in out and "recon-00000006.png" in out
    assert not [n for n in out if n.endswith(".tmp")]
    record = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "epoch", "lr", "loss", "img_per_s", "peak_mem_mb", "grad_norm"} <= set(record)


def test_encoder_export_loads_into_timm(tmp_path):
    import timm.models.vision_transformer as vit

    import fastmae

    result = pretrain.train(tiny(tmp_path, max_steps=1))
    encoder = torch.load(result.output_dir / "encoder.pth", weights_only=True)["model"]
    kwargs = {**fastmae.get_config("mae_vit_nano_patch8").timm_vit_kwargs(), "img_size": 32}
    vit.VisionTransformer(**kwargs).load_state_dict(encoder, strict=True)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    cfg = tiny(tmp_path, lr=1e30, save_every_steps=1, max_steps=8)  # the weights blow up within a few steps
    with pytest.raises(pretrain.NonFiniteError) as info:
        pretrain.train(cfg)
    found = re.search(r"non-finite (loss|gradient norm) .* at step (\d+) ", str(info.value))
    assert found, str(info.value)
    bad_step = int(found.group(2))
    assert 1 < bad_step < 8
    steps = [s for s, _ in ck.list_checkpoints(cfg.output_dir)]
    assert steps == list(range(1, bad_step))  # every good step saved, the failing one wrote nothing
    ck.load_checkpoint(ck.checkpoint_path(cfg.output_dir, steps[-1]))
    assert not [p for p in Path(cfg.output_dir).iterdir() if p.name.endswith(".tmp")]


def poison_fifth_loss(monkeypatch) -> dict:
    """Make the training loss of the 5th micro-step NaN (step 3's first half at 2 micro-steps a step); returns the
    count of training forwards so far, ``{"n": ...}``."""
    calls = {"n": 0}
    original = pretrain.fastmae.MAE.forward_loss

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        if not torch.is_grad_enabled():  # the reconstruction pictures
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(pretrain.fastmae.MAE, "forward_loss", poisoned)
    return calls


def test_non_finite_check_sees_a_single_nan(tmp_path, monkeypatch):
    poison_fifth_loss(monkeypatch)
    with pytest.raises(pretrain.NonFiniteError, match=r"non-finite loss \(loss nan.* at step 3 \(epoch 0"):
        pretrain.train(tiny(tmp_path, max_steps=5))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--model", "mae_vit_gigantic"], "--model 'mae_vit_gigantic' is unknown"),
        (["--data-path", "/nonexistent/folder"], "does not exist"),
        (["--mask-ratio", "1.0"], "--mask-ratio"),
        (["--warmup-epochs", "50", "--epochs", "10"], "--warmup-epochs"),
        (["--resume", "/nonexistent/ckpt.pth"], "no such file"),
        (["--input-size", "30"], "multiple of the patch size"),
    ],
)
def test_bad_flags_fail_fast(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        pretrain.parse_args(["--model", "mae_vit_nano_patch8", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_presets_and_original_spellings(tmp_path):
    (tmp_path / "train").mkdir()
    cfg = pretrain.parse_args(["--batch_size", "7", "--norm_pix_loss", "--data_path", str(tmp_path), "--blr", "1e-3"])
    assert cfg.batch_size == 7 and cfg.norm_pix_loss and cfg.blr == 1e-3 and cfg.data_path == str(tmp_path)
    assert pretrain.parse_args(["--no-norm-pix-loss"]).norm_pix_loss is False
    demo = pretrain.parse_args(["--preset", "demo"])
    assert demo.model == ("mae_vit_base_patch16" if torch.cuda.is_available() else "mae_vit_nano_patch8")
    assert pretrain.parse_args(["--preset", "demo", "--batch-size", "3"]).batch_size == 3  # flags win
    fields = {f.name for f in pretrain.dataclasses.fields(pretrain.TrainConfig)}
    help_text = cli.build_parser(pretrain.TrainConfig, "MAE pretraining", cli.ORIGINAL_PRETRAIN_FLAGS).format_help()
    assert all(f"--{name.replace('_', '-')}" in help_text for name in fields)


def test_data_folder_errors_and_existing_run(tmp_path):
    (tmp_path / "data" / "train" / "cls").mkdir(parents=True)
    code = pretrain.main([*argv_of(TINY), "--data-path", str(tmp_path / "data"), "--output-dir", str(tmp_path)])
    assert code == 2  # an empty class folder
    result = pretrain.train(tiny(tmp_path, max_steps=1))
    with pytest.raises(pretrain.ConfigError, match="already holds checkpoints"):
        pretrain.train(tiny(tmp_path, max_steps=2))
    assert [s for s, _ in ck.list_checkpoints(result.output_dir)] == [1]


def argv_of(options):
    argv = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv


def test_bad_checkpoints_are_refused_and_kept(tmp_path):
    pretrain.train(tiny(tmp_path, max_steps=2, save_every_steps=1))
    run = tmp_path / "run"
    with pytest.raises(ck.CheckpointError, match=r"'pos_embed' is \[1, 17, 128\] in the file, \[1, 26, 128\]"):
        pretrain.train(tiny(tmp_path, resume="auto", input_size=40, max_steps=3))
    newest = ck.checkpoint_path(run, 2)
    blob = newest.read_bytes()
    newest.write_bytes(blob[:1000])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        pretrain.train(tiny(tmp_path, resume="auto", max_steps=3))
    assert newest.read_bytes() == blob[:1000]  # nothing was written over either file
    ck.load_checkpoint(ck.checkpoint_path(run, 1))
    resumed = pretrain.train(tiny(tmp_path, resume=str(ck.checkpoint_path(run, 1)), max_steps=3))
    assert [s for s, _ in resumed.losses] == [2, 3]


def test_image_folder_training(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(6):
            arr = np.random.default_rng(i).integers(0, 255, (48, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / "train" / cls / f"{i}.png")
    result = pretrain.train(tiny(tmp_path, data_path=str(tmp_path / "data"), batch_size=2, max_steps=4))
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]  # 12 images / (2 × 2) = 3 steps per epoch
    assert json.loads((result.output_dir / "config.json").read_text())["steps_per_epoch"] == 3


def test_cli_entry_point_reports_bad_flags():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch-size", "0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2 and "--batch-size must be >= 1" in proc.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_training(tmp_path, precision):
    result = pretrain.train(tiny(tmp_path, device="cuda", precision=precision, num_workers=2, max_steps=10))
    losses = [loss for _, loss in result.losses]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    state = ck.load_checkpoint(result.checkpoint)
    assert state["scaler"]["scale"] > 0  # an enabled scaler's state in every precision (the original loads it)
    assert all(group.get("fused") for group in state["optimizer"]["param_groups"])


@pytest.mark.cuda
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_cuda_resume_is_exact(tmp_path, decode):
    straight = pretrain.train(tiny(tmp_path, "straight", device="cuda", max_steps=8, decode=decode))
    pretrain.train(tiny(tmp_path, "split", device="cuda", max_steps=4, decode=decode))
    resumed = pretrain.train(tiny(tmp_path, "split", device="cuda", max_steps=8, resume="auto", decode=decode))
    assert resumed.losses == straight.losses[4:]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.cuda
def test_cuda_compiled_training(tmp_path):
    result = pretrain.train(tiny(tmp_path, device="cuda", compile=True, max_steps=6))
    assert all(np.isfinite([loss for _, loss in result.losses]))
