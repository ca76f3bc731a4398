"""The optimization recipe: lr scaling, warm-up + half-cycle cosine, AdamW parameter groups."""

import math

import pytest
import torch

import fastmae
from fastmae import schedule


def formula(t, peak, epochs, warmup, min_lr):
    """The schedule as the MAE paper's recipe states it, written independently of the code under test."""
    if t < warmup:
        return peak * t / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))


def test_scaled_lr_is_linear_in_batch():
    assert schedule.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert schedule.scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)
    with pytest.raises(ValueError, match="effective_batch"):
        schedule.scaled_lr(1.5e-4, 0)


@pytest.mark.parametrize("epochs,warmup,min_lr", [(800, 40, 0.0), (10, 3, 1e-5), (7, 0, 0.0)])
def test_lr_matches_formula_at_every_step(epochs, warmup, min_lr):
    peak, steps_per_epoch = 2.4e-3, 13
    for step in range(epochs * steps_per_epoch + 1):
        t = step / steps_per_epoch
        assert schedule.lr_at(t, peak, epochs, warmup, min_lr) == pytest.approx(
            formula(t, peak, epochs, warmup, min_lr), rel=1e-12, abs=1e-15
        )


def test_lr_landmarks():
    peak = 1e-3
    assert schedule.lr_at(0, peak, 100, 10) == 0.0
    assert schedule.lr_at(5, peak, 100, 10) == pytest.approx(peak / 2)
    assert schedule.lr_at(10, peak, 100, 10) == pytest.approx(peak)
    assert schedule.lr_at(55, peak, 100, 10) == pytest.approx(peak / 2)  # half-way down the cosine
    assert schedule.lr_at(100, peak, 100, 10, min_lr=1e-6) == pytest.approx(1e-6)
    lrs = [schedule.lr_at(t / 10, peak, 100, 10) for t in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay after warm-up


def test_lr_rejects_bad_ranges():
    with pytest.raises(ValueError, match="warmup_epochs"):
        schedule.lr_at(0, 1e-3, 10, 11)
    with pytest.raises(ValueError, match="epochs"):
        schedule.lr_at(0, 1e-3, 0, 0)


def test_param_groups_follow_the_original_rule():
    model = fastmae.create_model("mae_vit_nano_patch8", impl="eager")
    groups = schedule.param_groups(model, 0.05)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    # frozen sin-cos position embeddings are not optimized
    assert id(names["pos_embed"]) not in by_id and id(names["decoder_pos_embed"]) not in by_id
    for name, p in names.items():
        if not p.requires_grad:
            continue
        expected = 0.0 if (p.ndim == 1 or name.endswith(".bias")) else 0.05
        assert by_id[id(p)] == expected, name
    assert by_id[id(names["blocks.0.norm1.weight"])] == 0.0
    assert by_id[id(names["blocks.0.attn.qkv.bias"])] == 0.0
    assert by_id[id(names["blocks.0.attn.qkv.weight"])] == 0.05
    assert by_id[id(names["cls_token"])] == 0.05  # [1, 1, D], decayed as in the original
    assert len(by_id) == sum(p.requires_grad for p in model.parameters())


def test_build_adamw_and_set_lr():
    model = fastmae.create_model("mae_vit_nano_patch8", impl="eager")
    opt = schedule.build_adamw(model, lr=1e-3)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert not any(g.get("fused") for g in opt.param_groups)  # CPU parameters: no fused kernel
    schedule.set_lr(opt, 3e-4)
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)
    opt.param_groups[0]["lr_scale"] = 0.5
    schedule.set_lr(opt, 2e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4) and opt.param_groups[1]["lr"] == pytest.approx(2e-4)
    assert isinstance(opt, torch.optim.AdamW)
