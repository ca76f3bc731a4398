"""fastmae: Masked Autoencoder pretraining with fused Triton kernels.

``from fastmae import MAE`` gives a drop-in for the original ``MaskedAutoencoderViT``.
"""

from .configs import CONFIGS, MAEConfig, config_table, get_config, list_configs
from .masking import random_masking
from .model import (
    MAE,
    LoadResult,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_nano_patch8,
    mae_vit_small_patch16,
    mae_vit_tiny_patch16,
)
from .pos_embed import sincos_2d

__version__ = "0.1.0"

__all__ = [
    "CONFIGS",
    "MAE",
    "LoadResult",
    "MAEConfig",
    "config_table",
    "create_model",
    "get_config",
    "list_configs",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_nano_patch8",
    "mae_vit_small_patch16",
    "mae_vit_tiny_patch16",
    "random_masking",
    "sincos_2d",
]
