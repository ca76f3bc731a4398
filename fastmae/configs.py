"""Named MAE configurations: the three of the paper, and small ones for tests and CPU demos."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class MAEConfig:
    """The architecture of one MAE: encoder and decoder sizes (constructor keywords of :class:`fastmae.MAE`)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    in_chans: int = 3

    def kwargs(self) -> dict:
        """The constructor keywords of :class:`fastmae.MAE` for this config."""
        return asdict(self)

    def timm_vit_kwargs(self) -> dict:
        """Keywords for ``timm.models.vision_transformer.VisionTransformer`` that load the encoder strictly."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=True,
            global_pool="token",
            num_classes=0,
        )


CONFIGS: dict[str, MAEConfig] = {
    # Paper configurations (decoder 512-d, 8 blocks, 16 heads).
    "mae_vit_base_patch16": MAEConfig(224, 16, 768, 12, 12, 512, 8, 16),
    "mae_vit_large_patch16": MAEConfig(224, 16, 1024, 24, 16, 512, 8, 16),
    "mae_vit_huge_patch14": MAEConfig(224, 14, 1280, 32, 16, 512, 8, 16),
    # Smaller encoders with the same recipe, for quick experiments.
    "mae_vit_small_patch16": MAEConfig(224, 16, 384, 12, 6, 256, 4, 8),
    "mae_vit_tiny_patch16": MAEConfig(224, 16, 192, 12, 3, 128, 4, 4),
    # Toy size for tests and the CPU demo: 64-px images, 8-px patches (64 patches, 16 visible).
    "mae_vit_nano_patch8": MAEConfig(64, 8, 128, 4, 4, 64, 2, 4),
}


def list_configs() -> list[str]:
    """The names :func:`fastmae.create_model` accepts."""
    return list(CONFIGS)


def get_config(name: str) -> MAEConfig:
    """The :class:`MAEConfig` called ``name``; a clear error lists the known names otherwise."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def config_table() -> str:
    """A markdown table of every config (as in the README)."""
    rows = [
        "| name | img | patch | D | depth | heads | decoder D/depth/heads | tokens (enc/dec) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in CONFIGS.items():
        num_patches = (c.img_size // c.patch_size) ** 2
        keep = int(num_patches * 0.25)
        rows.append(
            f"| {name} | {c.img_size} | {c.patch_size} | {c.embed_dim} | {c.depth} | {c.num_heads} | "
            f"{c.decoder_embed_dim}/{c.decoder_depth}/{c.decoder_num_heads} | {keep + 1}/{num_patches + 1} |"
        )
    return "\n".join(rows)
