"""``fastmae.MAE``: a drop-in for the original ``MaskedAutoencoderViT`` whose hot ops run as Triton kernels."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from . import ops, reference
from .checkpoint import CheckpointError, read_file
from .configs import get_config
from .layers import Block, PatchEmbed, add_norm, run_blocks
from .masking import num_kept, random_masking
from .pos_embed import sincos_2d

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a full MAE state dict, with timm ``VisionTransformer`` keys (no ``mask_token``)."""
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


class LoadResult(NamedTuple):
    """What :meth:`MAE.load_pretrained` did not match: keys the model has that the file lacks, and the reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]

    def summary(self, num_keys: int) -> str:
        """One line: how many of the model's ``num_keys`` entries were loaded, and the keys left on each side."""
        show = lambda keys: f"{len(keys)} {keys[:4]}{'...' if len(keys) > 4 else ''}"
        return (
            f"{num_keys - len(self.missing_keys)} of {num_keys} tensors loaded; missing (kept as initialized): "
            f"{show(self.missing_keys)}; unexpected (ignored): {show(self.unexpected_keys)}"
        )


class MAE(nn.Module):
    """Masked Autoencoder with a ViT backbone: the original architecture, keys and outputs, with fused kernels.

    Args:
        img_size: input resolution (square).
        patch_size: p; the encoder sees ``(img_size/p)² · (1 - mask_ratio)`` patches plus a cls token.
        in_chans: image channels C.
        embed_dim, depth, num_heads: encoder width, blocks and heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width, blocks and heads.
        mlp_ratio: MLP hidden size over width.
        norm_layer: normalization constructor (LayerNorm, eps 1e-6).
        norm_pix_loss: normalize each target patch by its mean and unbiased variance.
        impl: ``"auto"`` (Triton kernels for CUDA tensors, eager otherwise and for shapes or dtypes a kernel
            does not take, e.g. a head dim outside 16..128, with a warning), ``"triton"`` (such shapes raise)
            or ``"eager"``; the environment variable ``FASTMAE_IMPL`` overrides it.
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
        norm_layer=reference.LayerNorm6,
        norm_pix_loss: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        impl = ops.resolve_impl(impl)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, norm_layer, impl) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer, impl) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        self._impl = impl
        self.initialize_weights()

    @property
    def impl(self) -> str:
        """The op implementation in use (``"auto"``, ``"triton"`` or ``"eager"``); settable."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        value = ops.resolve_impl(value)
        self._impl = value
        for blk in [*self.blocks, *self.decoder_blocks]:
            blk.impl = value

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def initialize_weights(self) -> None:
        """The paper's initialization: fixed sin-cos positions, xavier-uniform Linears and patch embedding."""
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(reference.MaskedAutoencoderViT._init_weights)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` → ``[N, L, p²·C]``, (i, j, c) order inside a patch."""
        return reference.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, L, p²·C]`` → ``[N, C, H, W]``."""
        return reference.unpatchify(x, self.patch_size, self.in_chans, self.patch_embed.grid_size)

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor [N, C, H, W], got {type(imgs).__name__}")
        if imgs.dim() != 4:
            raise ValueError(f"imgs must be 4-D [N, C, H, W], got shape {list(imgs.shape)}")
        if imgs.shape[0] == 0:
            raise ValueError(f"imgs holds no image (shape {list(imgs.shape)}); pass a batch of at least one")
        if not imgs.is_floating_point():
            raise TypeError(f"imgs must be a floating tensor, got {imgs.dtype}")
        _, c, h, w = imgs.shape
        if c != self.in_chans:
            raise ValueError(f"imgs has {c} channels, the model expects in_chans={self.in_chans}")
        if (h, w) != self.patch_embed.img_size:
            raise ValueError(f"imgs is {h}x{w}, the model expects img_size={self.patch_embed.img_size[0]}")
        param = self.patch_embed.proj.weight
        if imgs.device != param.device:
            raise ValueError(f"imgs is on {imgs.device} but the model is on {param.device}")
        if imgs.dtype != param.dtype and not torch.is_autocast_enabled(imgs.device.type):
            raise TypeError(
                f"imgs is {imgs.dtype} but the model's parameters are {param.dtype}; convert one, or run under "
                "torch.autocast"
            )
        ops.check_device(self.impl, imgs)

    def _encode(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the patches ``ids_keep`` ``[N, K]`` (in that order) plus the cls token: ``[N, 1+K, D]``."""
        proj = self.patch_embed.proj
        x = ops.patch_embed(
            self.impl, imgs, ids_keep, proj.weight, proj.bias, self.pos_embed, self.cls_token
        )  # [N, 1+K, D]
        x, branch = run_blocks(self.blocks, x)
        _, latent = add_norm(self.impl, self.norm, x, branch, x.dtype)  # the last add fused with the norm
        return latent

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Encode the visible patches, as the original does: the tokens come in shuffled order.

        The K patch tokens after the cls token are those of ``ids_keep = argsort(noise)[:, :K]``, the order of
        a random permutation, even with ``mask_ratio=0`` (every patch, shuffled). For per-patch features in
        raster order use :meth:`forward_features`.

        Args:
            imgs: ``[N, C, H, W]``.
            mask_ratio: fraction of patches removed, in [0, 1).
            noise: optional ``[N, L]`` noise fixing the mask (patches with the smallest noise are kept, in
                increasing order of noise).

        Returns:
            ``(latent [N, 1+K, D], mask [N, L] with 1 = removed, ids_restore [N, L])``; ``latent[:, 1 + k]`` is
            patch ``argsort(ids_restore)[:, k]``.
        """
        self._check_imgs(imgs)
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], self.num_patches, mask_ratio, imgs.device, noise)
        return self._encode(imgs, ids_keep), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder's features of every patch, in raster order, with no masking and no randomness: the
        same as timm ``VisionTransformer.forward_features`` on :meth:`encoder_state_dict`.

        Args:
            imgs: ``[N, C, H, W]``.

        Returns:
            ``[N, 1+L, D]``: the cls token, then patch ``(i, j)`` at ``1 + i·(W/p) + j``.
        """
        self._check_imgs(imgs)
        ids = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1).contiguous()  # [N, L]
        return self._encode(imgs, ids)

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, masked_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict every patch's pixels: ``[N, 1+K, D]`` → ``[N, L, p²·C]``.

        With ``masked_ids`` (``[N, M]`` int64 patch indices) only those patches get the final norm and
        ``decoder_pred``: the result is ``[N, M, p²·C]``, row m predicting patch ``masked_ids[n, m]``.
        """
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        x = ops.decoder_assembly(self.impl, x, ids_restore, self.mask_token, self.decoder_pos_embed)  # [N, 1+L, Dd]
        x, branch = run_blocks(self.decoder_blocks, x)
        x = x if branch is None else x + branch  # [N, 1+L, Dd]
        if masked_ids is not None:
            x = torch.gather(x[:, 1:, :], 1, masked_ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, M, Dd]
            return self.decoder_pred(add_norm(self.impl, self.decoder_norm, x)[1])  # [N, M, p²C]
        x = self.decoder_pred(add_norm(self.impl, self.decoder_norm, x)[1])  # [N, 1+L, p²C]
        return x[:, 1:, :]  # [N, L, p²C]

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, masked_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MSE on masked patches against (optionally per-patch normalized) pixels.

        With ``masked_ids`` (``[N, M]``, the masked patches of the 0/1 ``mask``), ``pred`` is ``[N, M, p²·C]``
        holding those patches only (see :meth:`forward_decoder`); the loss is the same.
        """
        weights = mask if masked_ids is None else None  # the rows of masked_ids are exactly the scored ones
        return ops.masked_mse(self.impl, pred, imgs, weights, self.patch_size, self.norm_pix_loss, masked_ids)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float = 0.75,
        noise: torch.Tensor | None = None,
        pred_masked_only: bool = False,
    ):
        """Mask, encode, decode and score.

        Args:
            imgs: ``[N, C, H, W]``.
            mask_ratio: fraction of patches removed, in (0, 1): at least one patch kept and one masked.
            noise: optional ``[N, L]`` noise fixing the mask.
            pred_masked_only: predict the masked patches only (the loss needs no other): less decoder_pred work
                and memory, same loss and gradients. ``pred`` is then ``[N, M, p²·C]``, the masked patches in
                raster order, so ``full[mask.bool()] = pred.flatten(0, 1)`` puts them in place.

        Returns:
            ``(loss, pred [N, L, p²·C], mask [N, L])``; pred is ``[N, M, p²·C]`` with ``pred_masked_only``.
        """
        num_masked = self.num_patches - num_kept(self.num_patches, mask_ratio)
        if num_masked == 0:
            raise ValueError(f"mask_ratio={mask_ratio} masks no patch out of {self.num_patches}; the loss needs one")
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        masked_ids = None
        if pred_masked_only:
            masked_ids = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :num_masked]  # [N, M] ascending
        pred = self.forward_decoder(latent, ids_restore, masked_ids)
        loss = self.forward_loss(imgs, pred, mask, masked_ids)
        return loss, pred, mask

    def load_pretrained(self, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> LoadResult:
        """Load original-format MAE weights: a file or dict holding a state dict, under ``'model'`` or not.

        Encoder-only files leave the decoder as initialized. Files are read with ``weights_only=True``, allowing
        the ``argparse.Namespace`` that the original's training checkpoints hold (see
        :func:`fastmae.checkpoint.read_file`).

        Args:
            checkpoint: a path, or a (possibly nested under ``'model'``) state dict.

        Returns:
            The missing and unexpected keys.

        Raises:
            ValueError: the file cannot be read (the message says whether it is corrupt or holds unsupported
                objects), or a key's shape differs from the model's.
        """
        if isinstance(checkpoint, (str, Path)):
            try:
                checkpoint = read_file(checkpoint)
            except CheckpointError as e:
                raise ValueError(f"cannot read checkpoint: {e}") from e
        if not isinstance(checkpoint, Mapping):
            raise TypeError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
        state = checkpoint.get("model", checkpoint)
        own = self.state_dict()
        for key, value in state.items():
            if key in own and tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"checkpoint key {key!r} has shape {list(value.shape)}, the model expects {list(own[key].shape)}"
                )
        result = self.load_state_dict(state, strict=False)
        return LoadResult(list(result.missing_keys), list(result.unexpected_keys))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with timm ``VisionTransformer`` keys (no ``mask_token``, no decoder)."""
        return encoder_state(self.state_dict())


def create_model(name: str, **kwargs) -> MAE:
    """Build the named config (see :func:`fastmae.list_configs`); keywords override it (e.g. ``impl``)."""
    return MAE(**{**get_config(name).kwargs(), **kwargs})


def mae_vit_base_patch16(**kwargs) -> MAE:
    """ViT-B/16 encoder (768-d, 12 blocks, 12 heads), 512-d 8-block decoder."""
    return create_model("mae_vit_base_patch16", **kwargs)


def mae_vit_large_patch16(**kwargs) -> MAE:
    """ViT-L/16 encoder (1024-d, 24 blocks, 16 heads), 512-d 8-block decoder."""
    return create_model("mae_vit_large_patch16", **kwargs)


def mae_vit_huge_patch14(**kwargs) -> MAE:
    """ViT-H/14 encoder (1280-d, 32 blocks, 16 heads), 512-d 8-block decoder."""
    return create_model("mae_vit_huge_patch14", **kwargs)


def mae_vit_small_patch16(**kwargs) -> MAE:
    """ViT-S/16 encoder (384-d, 12 blocks, 6 heads), 256-d 4-block decoder."""
    return create_model("mae_vit_small_patch16", **kwargs)


def mae_vit_tiny_patch16(**kwargs) -> MAE:
    """ViT-Ti/16 encoder (192-d, 12 blocks, 3 heads), 128-d 4-block decoder."""
    return create_model("mae_vit_tiny_patch16", **kwargs)


def mae_vit_nano_patch8(**kwargs) -> MAE:
    """A toy model for tests and CPU demos: 64-px images, 8-px patches, 128-d 4-block encoder."""
    return create_model("mae_vit_nano_patch8", **kwargs)
