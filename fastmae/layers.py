"""The ViT building blocks of :class:`fastmae.MAE`, with timm's parameter names and switchable fused ops."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops


class PatchEmbed(nn.Module):
    """Image to patch embedding: a p×p, stride-p convolution (``proj``), as in timm.

    The MAE model never calls this module's forward (the fused op reads ``proj``'s parameters directly);
    it exists for the parameter names and for users who want the full ``[N, L, D]`` embedding.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, L, D]


class Attention(nn.Module):
    """Multi-head self-attention with a packed ``qkv`` Linear (bias on) and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.impl = impl
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # [B, N, 3·D]
        x = ops.attention(self.impl, qkv, self.num_heads, self.scale)  # [B, N, D]
        return self.proj(x)


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2.

    On the Triton path fc1's bias is added by the GELU kernel (``bias_in_gelu``, the default): fc1 runs as a plain
    GEMM and the bias gradient comes out of the GELU backward, which saves re-reading fc1's output gradient for a
    separate bias reduction. Set ``Mlp.bias_in_gelu = False`` (or on one instance) to add it in the GEMM instead.
    """

    bias_in_gelu = True

    def __init__(self, dim: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_in_gelu and ops.use_triton(self.impl, "gelu", x):
            h = ops.gelu(self.impl, F.linear(x, self.fc1.weight), self.fc1.bias)  # [B, N, hidden]
        else:
            h = ops.gelu(self.impl, self.fc1(x))
        return self.fc2(h)


def add_norm(impl: str, norm: nn.Module, x: torch.Tensor, branch: torch.Tensor | None = None, out_dtype=None):
    """``(x + branch, norm(x + branch))`` (x itself without a branch): through the fused op when ``norm`` is an affine
    ``nn.LayerNorm`` over the last dim, else eagerly. ``out_dtype``: see :func:`fastmae.ops.layer_norm`."""
    plain = type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1
    if plain and norm.weight is not None and norm.bias is not None:
        out = ops.layer_norm(impl, x, norm.weight, norm.bias, branch, norm.eps, out_dtype)
        return out if branch is not None else (x, out)
    if branch is not None:
        x = x + branch
    y = norm(x)
    return x, y if out_dtype is None else y.to(out_dtype)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    With ``pending=True`` the block leaves its last residual add to the caller, which fuses it with the LayerNorm
    that follows (the next block's norm1, or the final norm): see :func:`run_blocks`. Called as a module either way,
    so module hooks (FSDP's, for one) run.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_layer, impl: str = "auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, impl)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), impl)

    @property
    def impl(self) -> str:
        """The op implementation of the block's attention, LayerNorms and MLP activation; settable."""
        return self.attn.impl

    @impl.setter
    def impl(self, value: str) -> None:
        self.attn.impl = self.mlp.impl = value

    def forward(
        self, x: torch.Tensor, branch: torch.Tensor | None = None, pending: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x + branch`` (``branch``: the previous block's last add, still pending).

        Returns:
            The block's output, or with ``pending`` the pair ``(x, branch)`` whose sum it is, the add left to the
            caller: every residual add then runs fused with the LayerNorm after it.
        """
        x, h = add_norm(self.impl, self.norm1, x, branch)  # x += branch; h = norm1(x)
        x, h = add_norm(self.impl, self.norm2, x, self.attn(h))  # x += attn(h); h = norm2(x)
        branch = self.mlp(h)
        return (x, branch) if pending else x + branch


def run_blocks(blocks, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``blocks`` in turn on x, each one's last residual add fused into the next one's norm1: the output is
    ``x + branch`` (x itself when there are no blocks and branch is None)."""
    branch = None
    for blk in blocks:
        x, branch = blk(x, branch, pending=True)
    return x, branch
