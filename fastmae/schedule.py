"""The MAE optimization recipe: learning-rate scaling, warm-up + half-cycle cosine schedule, AdamW parameter groups.

The schedule is a function of the fractional epoch ``t = epoch + step_in_epoch / steps_per_epoch``::

    lr(t) = peak_lr · t / warmup_epochs                                              if t < warmup_epochs
    lr(t) = min_lr + (peak_lr - min_lr) · ½ · (1 + cos(π · (t - warmup_epochs) / (epochs - warmup_epochs)))   else

and ``peak_lr = base_lr · effective_batch / 256`` (the linear scaling rule), with ``base_lr = 1.5e-4`` in the
paper's recipe. It is set before every optimizer step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

BASE_LR = 1.5e-4
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.05


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule: ``base_lr · effective_batch / 256``.

    Args:
        base_lr: the learning rate for a batch of 256 (``blr``).
        effective_batch: batch per process × processes × gradient-accumulation steps.
    """
    if effective_batch < 1:
        raise ValueError(f"effective_batch must be >= 1, got {effective_batch}")
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    return base_lr * effective_batch / 256


def lr_at(epoch: float, peak_lr: float, epochs: float, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """The learning rate at fractional epoch ``epoch``: linear warm-up to ``peak_lr``, then cosine to ``min_lr``.

    Args:
        epoch: fractional epoch, ``epoch_index + step_in_epoch / steps_per_epoch``, in ``[0, epochs]``.
        peak_lr: the learning rate reached at the end of the warm-up.
        epochs: the length of the whole schedule in epochs.
        warmup_epochs: the length of the linear warm-up, ``0 <= warmup_epochs < epochs`` (or ``== epochs``:
            warm-up only).
        min_lr: the floor the cosine decays to.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    if epoch < warmup_epochs:
        return peak_lr * epoch / warmup_epochs
    if epochs == warmup_epochs:
        return peak_lr
    progress = min((epoch - warmup_epochs) / (epochs - warmup_epochs), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group (scaled by a group's ``lr_scale`` when it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """AdamW parameter groups as in MAE: no weight decay on biases and 1-D parameters (norm weights).

    Parameters that do not require grad (the fixed sin-cos position embeddings) are left out. The cls and mask
    tokens (``[1, 1, D]``) are decayed, as in the original recipe.

    Args:
        model: the (unwrapped or FSDP-sharded) model; names are those of ``model.named_parameters()``.
        weight_decay: the decay of the weight matrices.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def no_decay_names(model: nn.Module) -> list[str]:
    """The names of the trainable parameters that :func:`param_groups` exempts from weight decay."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float = WEIGHT_DECAY, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with β = (0.9, 0.95) over :func:`param_groups`.

    Args:
        model: the model to optimize (build the optimizer after DDP/FSDP wrapping).
        lr: the initial learning rate (the schedule overwrites it every step).
        weight_decay: the decay of the weight matrices.
        fused: use the fused CUDA implementation (``None``: when every parameter is on CUDA).
    """
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=fused or None)
