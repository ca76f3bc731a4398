"""Fixed 2-D sin-cos positional embeddings, as in MAE (computed in float64, stored as float32)."""

from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos table: ``[M, embed_dim]`` for positions ``pos`` (any shape, flattened).

    ``omega_i = 1 / 10000^(i / (embed_dim/2))``, ``i = 0..embed_dim/2-1``; output ``concat(sin(pos·omega),
    cos(pos·omega))``.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a 1-D sin-cos table, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, D]


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """2-D sin-cos table ``[(1 +) gh·gw, embed_dim]`` in float64; row 0 (cls) is zeros when ``cls_token``.

    The grid comes from ``meshgrid(w, h)``: the first half of the channels encodes grid[0] (the column index),
    the second half grid[1] (the row index), rows enumerated in raster (h, w) order like the patches.

    Args:
        embed_dim: channels; must be divisible by 4.
        grid_size: patches per side, or ``(gh, gw)``.
        cls_token: prepend an all-zero row for the cls token.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos table, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_h = torch.arange(gh, dtype=torch.float64)
    grid_w = torch.arange(gw, dtype=torch.float64)
    gw_mesh, gh_mesh = torch.meshgrid(grid_w, grid_h, indexing="xy")  # each [gh, gw]: w varies along columns
    emb = torch.cat([sincos_1d(embed_dim // 2, gw_mesh), sincos_1d(embed_dim // 2, gh_mesh)], dim=1)  # [gh*gw, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)  # [1+gh*gw, D]
    return emb
