"""Checkpoints across codebases: files of the original MAE training code resume in fastmae, fastmae's resume in
the original's loading logic; --init-from; the original's epoch-named checkpoints.

The ``original_*`` helpers restate what the original code does (main_pretrain.py, util/misc.py ``save_model`` /
``load_model``, timm 0.3.2's ``add_weight_decay``) so that files are built and read the way it builds and reads
them.
"""

import argparse
import os
import pickle

import pytest
import torch

import fastmae
from fastmae import checkpoint as ck
from fastmae import schedule
from fastmae.reference import MaskedAutoencoderViT

from .test_training import one_thread, pretrain, tiny  # noqa: F401 (one_thread: the autouse fixture)

NANO32 = {**fastmae.get_config("mae_vit_nano_patch8").kwargs(), "img_size": 32}  # the TINY runs' model


def original_args(**overrides) -> argparse.Namespace:
    """The ``args`` the original stores: its parser's defaults, then what init_distributed_mode and main() add."""
    args = argparse.Namespace(
        batch_size=64, epochs=400, accum_iter=1, model="mae_vit_large_patch16", input_size=224, mask_ratio=0.75,
        norm_pix_loss=False, weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0, warmup_epochs=40,
        data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir", log_dir="./output_dir",
        device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=8,
        local_rank=-1, dist_on_itp=False, dist_url="env://",
    )  # fmt: skip
    vars(args).update(rank=0, gpu=0, distributed=True, dist_backend="nccl", **overrides)
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * args.world_size / 256
    return args


def original_param_groups(model, weight_decay):
    """timm 0.3.2 ``add_weight_decay``: no decay for 1-D parameters and biases; no-decay group first."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def original_objects(lr=1e-3):
    """The model, optimizer and loss scaler of main_pretrain.py (an enabled GradScaler, here the CPU's)."""
    model = MaskedAutoencoderViT(**NANO32)
    optimizer = torch.optim.AdamW(original_param_groups(model, 0.05), lr=lr, betas=(0.9, 0.95))
    return model, optimizer, torch.amp.GradScaler("cpu")


def original_save_model(path, args, epoch, model, optimizer, loss_scaler):
    """util/misc.py ``save_model`` without DeepSpeed: one dict, ``torch.save``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
    torch.save({**state, "scaler": loss_scaler.state_dict(), "args": args}, path)


def original_load_model(resume, model, optimizer, loss_scaler, weights_only=None) -> int:
    """util/misc.py ``load_model`` for a local file; returns the ``start_epoch`` it sets (0 when it sets none).
    ``torch.load``'s default is the installed torch's (weights_only since torch 2.6, not in the original's)."""
    checkpoint = torch.load(resume, map_location="cpu", weights_only=weights_only)
    model.load_state_dict(checkpoint["model"])  # strict
    start_epoch = 0
    if "optimizer" in checkpoint and "epoch" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch = checkpoint["epoch"] + 1
        if "scaler" in checkpoint:
            loss_scaler.load_state_dict(checkpoint["scaler"])
    return start_epoch


def trained_original_file(path, epoch=1):
    """An original-format checkpoint after a few optimizer and scaler steps of the original's objects."""
    torch.manual_seed(0)
    model, optimizer, scaler = original_objects()
    for _ in range(2):
        loss, _, _ = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    original_save_model(path, original_args(model="mae_vit_nano_patch8"), epoch, model, optimizer, scaler)
    return model, optimizer, scaler


def test_original_file_is_read_safely(tmp_path):
    path = tmp_path / "checkpoint-1.pth"
    model, _, scaler = trained_original_file(path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["argparse.Namespace"]  # nothing else
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)  # why the class must be allowed
    state = ck.load_checkpoint(path)
    assert ck.is_original(state) and isinstance(state["args"], argparse.Namespace)
    assert state["args"].model == "mae_vit_nano_patch8" and state["scaler"] == scaler.state_dict()
    fresh = fastmae.create_model("mae_vit_nano_patch8", img_size=32)
    result = fresh.load_pretrained(path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_corrupt_and_unsupported_files_are_told_apart(tmp_path):
    import datetime

    odd = tmp_path / "odd.pth"
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "args": datetime.date(2021, 11, 11)}, odd)
    with pytest.raises(ck.CheckpointError, match=r"holds objects fastmae does not unpickle: \['datetime.date'\]"):
        ck.load_checkpoint(odd)
    with pytest.raises(ValueError, match=r"cannot read checkpoint.*\['datetime.date'\]"):
        fastmae.create_model("mae_vit_nano_patch8").load_pretrained(odd)
    good = tmp_path / "good.pth"
    trained_original_file(good)
    blob = good.read_bytes()
    for name, content in [("cut.pth", blob[: len(blob) // 2]), ("text.pth", b"not a checkpoint")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ck.CheckpointError, match="truncated or corrupt") as info:
            ck.load_checkpoint(tmp_path / name)
        assert "holds objects" not in str(info.value)
    weights = tmp_path / "weights.pth"
    torch.save({"model": MaskedAutoencoderViT(**NANO32).state_dict(), "args": original_args()}, weights)
    with pytest.raises(ck.CheckpointError, match=r"lacks \['optimizer', 'epoch'\].*--init-from"):
        ck.load_checkpoint(weights)  # released weights: no optimizer, nothing to resume


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fastmae_checkpoint_resumes_in_the_original_load_model(tmp_path, precision):
    run = pretrain.train(tiny(tmp_path, precision=precision, max_steps=7))  # 5 steps per epoch: epoch 0 done
    saved = ck.load_checkpoint(run.checkpoint)
    for weights_only in (None, True):
        model, optimizer, scaler = original_objects()
        start_epoch = original_load_model(run.checkpoint, model, optimizer, scaler, weights_only)
        assert start_epoch == 1  # the original continues at the epoch after the last completed one
        for name, value in run.model.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
        names = {id(p): n for n, p in model.named_parameters()}
        mine = ck.optimizer_by_name(
            saved["optimizer"], [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        )
        assert len(optimizer.state) == len(mine["state"]) == sum(p.requires_grad for p in model.parameters())
        for param, state in optimizer.state.items():
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state[key], mine["state"][names[id(param)]][key]), (names[id(param)], key)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]
        assert scaler.is_enabled() and scaler.get_scale() == 65536.0


@pytest.mark.cuda
def test_fp16_checkpoint_carries_its_loss_scale_to_the_original(tmp_path):
    run = pretrain.train(tiny(tmp_path, device="cuda", precision="fp16", max_steps=6))
    saved = ck.load_checkpoint(run.checkpoint)
    model, optimizer, _ = original_objects()
    scaler = torch.amp.GradScaler("cuda")
    assert original_load_model(run.checkpoint, model, optimizer, scaler) == 1
    assert scaler.get_scale() == saved["scaler"]["scale"] and scaler.state_dict() == saved["scaler"]


def test_original_checkpoint_resumes_at_the_next_epoch_and_continues_exactly(tmp_path, capsys):
    straight = pretrain.train(tiny(tmp_path, "straight", max_steps=13))
    half = pretrain.train(tiny(tmp_path, "half", max_steps=10))  # stops at the end of epoch 1 (5 steps/epoch)
    model, optimizer, scaler = original_objects()  # the original code takes over ...
    start_epoch = original_load_model(half.checkpoint, model, optimizer, scaler)
    assert start_epoch == 2
    handed_back = tmp_path / "checkpoint-1.pth"  # ... and writes the checkpoint of its epoch 1
    original_save_model(handed_back, original_args(), start_epoch - 1, model, optimizer, scaler)
    capsys.readouterr()
    resumed = pretrain.train(tiny(tmp_path, "resumed", resume=str(handed_back), max_steps=13))
    out = capsys.readouterr().out
    assert "written by the original MAE code after epoch 1" in out and "restarts at epoch 2 (step 10)" in out
    assert resumed.losses == straight.losses[10:]  # model, optimizer state and schedule position all carried
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_original_mid_training_file_restarts_at_its_next_epoch(tmp_path, capsys):
    path = tmp_path / "checkpoint-2.pth"
    model, _, _ = trained_original_file(path, epoch=2)
    result = pretrain.train(tiny(tmp_path, "run", resume=str(path), max_steps=16))
    assert [s for s, _ in result.losses] == [16]  # epoch 3 starts at step 15
    assert "training restarts at epoch 3 (step 15)" in capsys.readouterr().out
    saved = ck.load_checkpoint(result.checkpoint)
    assert saved["optimizer"]["state"][0]["step"].item() == 3  # the original's 2 steps, then one here


def test_init_from_full_and_encoder_only_checkpoints(tmp_path, capsys):
    source = pretrain.train(tiny(tmp_path, "source", max_steps=3))
    fresh = pretrain.train(tiny(tmp_path, "fresh", max_steps=1))
    # The first step of a run has lr 0 (warm-up from 0), so after it the weights are the initial ones.
    capsys.readouterr()
    full = pretrain.train(tiny(tmp_path, "full", init_from=str(source.checkpoint), max_steps=1))
    n = len(source.model.state_dict())
    assert f"{n} of {n} tensors loaded; missing (kept as initialized): 0 []; unexpected (ignored): 0 []" in (
        capsys.readouterr().out
    )
    for name, value in source.model.state_dict().items():
        assert torch.equal(full.model.state_dict()[name], value), name
    assert [s for s, _ in full.losses] == [1]  # a new schedule ...
    assert ck.load_checkpoint(full.checkpoint)["optimizer"]["state"][0]["step"].item() == 1  # ... and optimizer
    encoder = pretrain.train(tiny(tmp_path, "encoder", init_from=str(source.output_dir / "encoder.pth"), max_steps=1))
    report = capsys.readouterr().out
    decoder = [k for k in source.model.state_dict() if not k.startswith(fastmae.model.ENCODER_PREFIXES)]
    assert f"{n - len(decoder)} of {n} tensors loaded; missing (kept as initialized): {len(decoder)} " in report
    assert "'mask_token'" in report and "unexpected (ignored): 0 []" in report
    for name, value in encoder.model.state_dict().items():
        expected = source if name.startswith(fastmae.model.ENCODER_PREFIXES) else fresh
        assert torch.equal(value, expected.model.state_dict()[name]), name
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"model": {"head.weight": torch.zeros(2)}}, unrelated)
    with pytest.raises(ck.CheckpointError, match="none of its keys"):
        pretrain.train(tiny(tmp_path, "unrelated", init_from=str(unrelated), max_steps=1))
    with pytest.raises(ck.CheckpointError, match=r"--init-from: .*'pos_embed' has shape \[1, 17, 128\]"):
        pretrain.train(tiny(tmp_path, "other_size", init_from=str(source.checkpoint), input_size=40, max_steps=1))


def test_epoch_named_checkpoints_at_the_original_cadence(tmp_path):
    result = pretrain.train(tiny(tmp_path, save_every_epochs=2, keep_last=1))  # 4 epochs of 5 steps
    out = result.output_dir
    assert [e for e, _ in ck.list_epoch_checkpoints(out)] == [0, 2, 3]  # epoch % 2 == 0, and the last
    assert [s for s, _ in ck.list_checkpoints(out)] == [20]  # --keep-last prunes step-named files only
    assert os.path.samefile(out / "checkpoint-3.pth", ck.checkpoint_path(out, 20))  # one file, two names
    second = ck.load_checkpoint(out / "checkpoint-2.pth")
    assert second["epoch"] == 2 and second["step"] == 15 and not ck.is_original(second)
    again = pretrain.train(tiny(tmp_path, "again", resume=str(out / "checkpoint-2.pth")))
    assert again.losses == result.losses[15:]  # an epoch-named file resumes like any other
    for _, path in ck.list_checkpoints(out):
        path.unlink()
    with pytest.raises(pretrain.ConfigError, match="already holds checkpoints"):
        pretrain.train(tiny(tmp_path))  # epoch-named files alone also mark the folder as another run's


def test_link_falls_back_to_a_copy(tmp_path, monkeypatch):
    src = ck.atomic_save({"model": {"w": torch.ones(2)}}, ck.checkpoint_path(tmp_path, 5))

    def no_links(a, b):
        raise OSError("hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    dst = ck.link_or_copy(src, ck.epoch_checkpoint_path(tmp_path, 0))
    assert dst.read_bytes() == src.read_bytes() and not os.path.samefile(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth", "checkpoint-00000005.pth"]
    assert [e for e, _ in ck.list_epoch_checkpoints(tmp_path)] == [0]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5]
    with pytest.raises(ValueError, match="epoch must be in"):
        ck.epoch_checkpoint_path(tmp_path, 10**7)


def test_optimizer_forms_and_scaler_state():
    model = fastmae.create_model("mae_vit_nano_patch8", img_size=32)
    optimizer = schedule.build_adamw(model, lr=1e-3)
    model(torch.randn(2, 3, 32, 32))[0].backward()
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    indexed = ck.optimizer_by_index(named)
    assert indexed["param_groups"][0]["params"] == list(range(len(named["param_groups"][0]["params"])))
    assert indexed.keys() == optimizer.state_dict().keys() and set(indexed["state"]) == set(
        optimizer.state_dict()["state"]
    )
    for i, state in optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], indexed["state"][i]["exp_avg"])
    groups = [list(g["params"]) for g in named["param_groups"]]
    back = ck.optimizer_by_name(indexed, groups)
    assert back["param_groups"] == named["param_groups"] and back["state"].keys() == named["state"].keys()
    assert ck.optimizer_by_name(named, groups) == dict(named)  # already by name
    with pytest.raises(ck.CheckpointError, match=r"groups of sizes \[\d+, \d+\] in the file, \[1, 2\] here"):
        ck.optimizer_by_name(indexed, [["a"], ["b", "c"]])
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert off.state_dict() == {} and ck.scaler_state(off) == torch.amp.GradScaler("cpu").state_dict()
    torch.amp.GradScaler("cpu").load_state_dict(ck.scaler_state(off))  # what the original's load_model does
    on = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert ck.scaler_state(on)["scale"] == 1024.0
