"""Per-sample uniform random masking with MAE's argsort semantics (small noise is kept)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Masking(NamedTuple):
    """The result of :func:`random_masking`.

    ids_keep: ``[N, K]`` int64, kept patch indices in kept order.
    mask: ``[N, L]`` float32, 1 = removed, 0 = kept.
    ids_restore: ``[N, L]`` int64, the inverse permutation of the shuffle.
    """

    ids_keep: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """``int(L * (1 - mask_ratio))``, the number of visible patches, as the original computes it."""
    if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool):
        raise TypeError(f"mask_ratio must be a float in [0, 1), got {type(mask_ratio).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch out of {num_patches}; lower it")
    return keep


def check_noise(noise: torch.Tensor, batch: int, num_patches: int, device: torch.device) -> None:
    """Raise a clear error unless ``noise`` is a floating ``[batch, num_patches]`` tensor on ``device``."""
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor of shape [N, L], got {type(noise).__name__}")
    if noise.shape != (batch, num_patches):
        raise ValueError(f"noise must have shape [N, L] = [{batch}, {num_patches}], got {list(noise.shape)}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating tensor, got {noise.dtype}")
    if noise.device != device:
        raise ValueError(f"noise is on {noise.device} but imgs are on {device}")


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
) -> Masking:
    """Draw (or take from ``noise``) a per-sample random mask.

    ``ids_shuffle = argsort(noise)`` ascending, ``ids_restore = argsort(ids_shuffle)``, the first
    ``K = int(L·(1-mask_ratio))`` shuffled indices are kept; ``mask`` is 1 on removed patches.

    Args:
        batch: N.
        num_patches: L.
        mask_ratio: fraction removed, in [0, 1); must keep at least one patch.
        device: where to draw the noise when ``noise`` is None.
        noise: optional ``[N, L]`` floating tensor fixing the mask.
    """
    device = torch.device(device)
    keep = num_kept(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)  # [N, L]
    else:
        check_noise(noise, batch, num_patches, device)
    ids_shuffle = torch.argsort(noise, dim=1)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    ids_keep = ids_shuffle[:, :keep]  # [N, K]
    mask = torch.ones(batch, num_patches, device=device)  # [N, L] float32, as the original
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # [N, L]
    return Masking(ids_keep, mask, ids_restore)
