"""The eager reference: the original MAE assembled from timm's blocks, and an eager function per fused op.

Every test and benchmark is measured against this file. :class:`MaskedAutoencoderViT` reproduces the original
release (timm ``PatchEmbed`` and ``Block``, sin-cos pos-embeds, argsort masking, the decoder and the loss) and
loads the same state dicts as :class:`fastmae.MAE`. The functions below are the eager form of each op a kernel
replaces; the kernels in ``fastmae.kernels`` take the same arguments and return the same values.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, PatchEmbed

from .masking import random_masking
from .pos_embed import sincos_2d

__all__ = [
    "MaskedAutoencoderViT",
    "attention",
    "decoder_assembly",
    "gelu",
    "layer_norm",
    "masked_mse",
    "patch_embed",
    "patchify",
    "resized_crop",
    "sdpa_attention",
    "unpatchify",
]

# MAE's norm layer: LayerNorm with eps 1e-6.
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, h·p, w·p]`` → ``[N, h·w, p·p·C]``, pixels ordered (i, j, c) inside a patch."""
    n, c, hp, wp = imgs.shape
    p = patch_size
    h, w = hp // p, wp // p
    x = imgs.reshape(n, c, h, p, w, p)  # [N, C, h, p, w, p]
    x = torch.einsum("nchpwq->nhwpqc", x)  # [N, h, w, p, p, C]
    return x.reshape(n, h * w, p * p * c)  # [N, L, p²C]


def unpatchify(
    x: torch.Tensor, patch_size: int, in_chans: int = 3, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[N, h·w, p·p·C]`` → ``[N, C, h·p, w·p]`` (square grid unless given)."""
    n, num, _ = x.shape
    p = patch_size
    if grid is None:
        h = w = int(round(num**0.5))
        if h * w != num:
            raise ValueError(f"{num} patches do not form a square grid; pass grid=(h, w)")
    else:
        h, w = grid
    x = x.reshape(n, h, w, p, p, in_chans)  # [N, h, w, p, p, C]
    x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, h, p, w, p]
    return x.reshape(n, in_chans, h * p, w * p)  # [N, C, H, W]


def patch_embed(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    cls_token: torch.Tensor,
) -> torch.Tensor:
    """Patch embedding of the visible patches, with positions and the cls token: the encoder's input.

    Args:
        imgs: ``[N, C, H, W]``.
        ids_keep: ``[N, K]`` int64 kept patch indices, in kept order.
        weight: conv weight ``[D, C, p, p]``; bias ``[D]``.
        pos_embed: ``[1, 1+L, D]``; cls_token: ``[1, 1, D]``.

    Returns:
        ``[N, 1+K, D]``: row 0 = cls_token + pos_embed[0]; row 1+k = embedding of patch ids_keep[n, k] + its pos.
    """
    p = weight.shape[-1]
    x = F.conv2d(imgs, weight, bias, stride=p)  # [N, D, h, w]
    x = x.flatten(2).transpose(1, 2)  # [N, L, D]
    x = x + pos_embed[:, 1:, :]
    d = x.shape[-1]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, K, D]
    cls = (cls_token + pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # [N, 1, D]
    return torch.cat([cls, x], dim=1)  # [N, 1+K, D]


def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Multi-head self-attention from the packed qkv projection, with explicit softmax math.

    Args:
        qkv: ``[B, N, 3·H·d]``, the qkv Linear's output viewed as ``[B, N, 3, H, d]``.
        num_heads: H.
        scale: the logit scale, ``d ** -0.5`` when None.

    Returns:
        ``[B, N, H·d]`` = softmax(q·kᵀ·scale)·v per head, heads concatenated (the proj Linear's input layout).
    """
    b, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    scale = d**-0.5 if scale is None else scale
    q, k, v = qkv.reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
    attn = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, N]
    attn = attn.softmax(dim=-1)
    out = attn @ v  # [B, H, N, d]
    return out.transpose(1, 2).reshape(b, n, num_heads * d)  # [B, N, H·d]


def sdpa_attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """:func:`attention` through ``F.scaled_dot_product_attention``, as timm's attention computes it: the eager form
    :class:`fastmae.MAE` runs under ``impl="eager"``. Same arguments and result."""
    b, n, three_hd = qkv.shape
    d = three_hd // (3 * num_heads)
    q, k, v = qkv.reshape(b, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [B, H, N, d]
    return out.transpose(1, 2).reshape(b, n, num_heads * d)  # [B, N, H·d]


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    branch: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim, after an optional residual add: a transformer block's ``x + branch, norm(x)``.

    Args:
        x: ``[..., D]``, the residual stream.
        weight, bias: ``[D]``.
        branch: optional ``[..., D]`` added to x first.
        eps: added to the variance (MAE: 1e-6).
        out_dtype: cast the normalized output to it (None: ``F.layer_norm``'s dtype, fp32 under autocast).

    Returns:
        ``y = F.layer_norm(x_new)`` with ``x_new = x + branch`` (x without a branch): ``y``, or ``(x_new, y)``
        with a branch.
    """
    x_new = x if branch is None else x + branch
    y = F.layer_norm(x_new, x_new.shape[-1:], weight, bias, eps)
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y if branch is None else (x_new, y)


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Exact (erf) GELU of ``x + bias``: an MLP's activation, with fc1's bias added here when fc1 runs without it.

    Args:
        x: ``[..., H]``, fc1's output.
        bias: optional ``[H]``.

    Returns:
        ``0.5 · z · (1 + erf(z / √2))`` with ``z = x + bias`` (x without a bias), in z's dtype.
    """
    return F.gelu(x if bias is None else x + bias)


def masked_mse(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor | None,
    patch_size: int,
    norm_pix_loss: bool = False,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """MAE's loss: the per-patch MSE against (optionally per-patch normalized) pixels, on masked patches only.

    Args:
        pred: ``[N, R, p²·C]`` predictions, (i, j, c) order within a patch: of every patch (``R = L``), or with
            ``ids`` of the patches ``ids`` names.
        imgs: ``[N, C, H, W]``.
        mask: ``[N, R]`` weights of pred's rows: 1 = removed (scored), 0 = visible; None scores every row.
        patch_size: p.
        norm_pix_loss: normalize each target patch by its mean and unbiased variance (+1e-6).
        ids: optional ``[N, R]`` int64 patch indices (raster order): row r of pred predicts patch ``ids[n, r]``.
            With the masked patches of a 0/1 mask and no ``mask``, the loss equals the full prediction's.

    Returns:
        A scalar: ``Σ mask · mean_j (pred − target)² / Σ mask``.
    """
    target = patchify(imgs, patch_size)  # [N, L, p²C]
    if ids is not None:
        target = torch.gather(target, 1, ids.unsqueeze(-1).expand(-1, -1, target.shape[-1]))  # [N, R, p²C]
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [N, R]
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum()


def decoder_assembly(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """The decoder's input: embedded visible tokens plus mask tokens, unshuffled, plus positions.

    Args:
        x: ``[N, 1+K, Dd]``, the decoder_embed output (cls, then the kept tokens in kept order).
        ids_restore: ``[N, L]`` int64 inverse shuffle.
        mask_token: ``[1, 1, Dd]``; pos_embed: ``[1, 1+L, Dd]``.

    Returns:
        ``[N, 1+L, Dd]``: row 0 = x[:, 0] + pos[0]; row 1+l = (x[:, 1+r] if r = ids_restore[n, l] < K else
        mask_token) + pos[1+l].
    """
    n, k1, d = x.shape
    num_patches = ids_restore.shape[1]
    mask_tokens = mask_token.expand(n, num_patches + 1 - k1, -1)  # [N, L-K, Dd]
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd]
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # [N, L, Dd] unshuffled
    x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1+L, Dd]
    return x + pos_embed


def resized_crop(
    images,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    mean,
    std,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One view of each decoded image: crop, bicubic resize (antialiased when shrinking), flip, normalize.

    Args:
        images: a sequence of B uint8 tensors ``[3, H_b, W_b]`` (any strides), on one device.
        boxes: ``[B, 4]`` integer ``(top, left, height, width)`` of each crop, inside its image (read on the host).
        flips: ``[B]`` bool: flip that view left-right.
        size: the side S of the square views.
        mean, std: three values each, the per-channel normalization on the 0..1 scale.
        dtype: the output dtype; float64 also computes in float64 (the tests' reference), any other in float32.

    Returns:
        ``[B, 3, S, S]``: ``(v / 255 − mean) / std``, flipped left-right where asked, with ``v`` PIL's bicubic
        resample of the crop (a = −0.5, its support widened by the scale factor when shrinking: torchvision's
        ``antialias=True`` filter) in PIL's two passes, horizontal then vertical, each clamped to 0..255 as PIL's
        8-bit images are, but not rounded to integers.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    device = images[0].device if len(images) else boxes.device
    views = []
    for img, (top, left, h, w), flip in zip(images, boxes.tolist(), flips.tolist()):
        v = img[:, top : top + h, left : left + w].to(compute)  # [3, h, w]
        v = TF.resize(v, [h, size], InterpolationMode.BICUBIC, antialias=True).clamp(0, 255)  # [3, h, S]
        v = TF.resize(v, [size, size], InterpolationMode.BICUBIC, antialias=True).clamp(0, 255)  # [3, S, S]
        views.append(v.flip(-1) if flip else v)
    x = torch.stack(views) if views else torch.empty(0, 3, size, size, dtype=compute, device=device)  # [B, 3, S, S]
    m = torch.tensor(mean, dtype=compute, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=compute, device=device).view(1, 3, 1, 1)
    return ((x / 255 - m) / s).to(dtype)


class MaskedAutoencoderViT(nn.Module):
    """The original MAE with a ViT backbone, built from timm's ``PatchEmbed`` and ``Block``.

    Same constructor keywords, state-dict keys, initialization and outputs as the original release.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=LayerNorm6,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_embed.patch_size[0])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_embed.patch_size[0], self.patch_embed.proj.in_channels)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(x)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        n, num_patches, d = x.shape
        ids_keep, mask, ids_restore = random_masking(n, num_patches, mask_ratio, x.device, noise)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # [N, K, D]
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls.expand(n, -1, -1), x], dim=1)  # [N, 1+K, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [N, 1+K, Dd]
        x = decoder_assembly(x, ids_restore, self.mask_token, self.decoder_pos_embed)  # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1+L, p²C]
        return x[:, 1:, :]  # [N, L, p²C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mse(pred, imgs, mask, self.patch_embed.patch_size[0], self.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p²C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask
