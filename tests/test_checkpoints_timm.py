"""Interchange with the original release and timm: original-format files, encoder export for fine-tuning."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fastmae
from fastmae.reference import MaskedAutoencoderViT

NAME = "mae_vit_nano_patch8"


def test_encoder_export_loads_strictly_into_timm_and_gives_same_features():
    torch.manual_seed(0)
    model = fastmae.create_model(NAME, impl="eager").eval()
    vit = VisionTransformer(**fastmae.get_config(NAME).timm_vit_kwargs()).eval()
    state = model.encoder_state_dict()
    assert "mask_token" not in state and not any(k.startswith("decoder") for k in state)
    vit.load_state_dict(state, strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    increasing = torch.arange(64, dtype=torch.float32).expand(2, -1).contiguous()
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.0, noise=increasing)
        feats = vit.forward_features(imgs)
        pooled = vit(imgs)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, latent[:, 0], rtol=1e-5, atol=1e-5)


def test_original_format_file_round_trips(tmp_path):
    torch.manual_seed(1)
    ref = MaskedAutoencoderViT(**fastmae.get_config(NAME).kwargs())
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": ref.state_dict(), "epoch": 3}, path)
    model = fastmae.create_model(NAME, impl="eager")
    result = model.load_pretrained(path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    for a, b in zip(model(imgs, noise=noise), ref(imgs, noise=noise)):
        torch.testing.assert_close(a, b)


def test_encoder_only_file_leaves_decoder_initialised(tmp_path):
    source = fastmae.create_model(NAME)
    path = tmp_path / "encoder.pth"
    torch.save({"model": source.encoder_state_dict()}, path)
    model = fastmae.create_model(NAME)
    decoder_before = model.decoder_pred.weight.clone()
    result = model.load_pretrained(path)
    decoder_keys = {k for k in model.state_dict() if not k.startswith(fastmae.model.ENCODER_PREFIXES)}
    assert set(result.missing_keys) == decoder_keys and "mask_token" in decoder_keys
    assert result.unexpected_keys == []
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(model.decoder_pred.weight, decoder_before)


def test_plain_state_dict_and_unexpected_keys():
    model = fastmae.create_model(NAME)
    state = {**fastmae.create_model(NAME).state_dict(), "head.weight": torch.zeros(3)}
    result = model.load_pretrained(state)
    assert result.unexpected_keys == ["head.weight"] and result.missing_keys == []


def test_shape_mismatch_names_the_key():
    model = fastmae.create_model(NAME)
    other = fastmae.create_model(NAME, img_size=32).state_dict()
    with pytest.raises(ValueError, match=r"'pos_embed' has shape \[1, 17, 128\], the model expects \[1, 65, 128\]"):
        model.load_pretrained({"model": other})


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        fastmae.create_model(NAME).load_pretrained(bad)
    with pytest.raises(TypeError, match="path or a state dict"):
        fastmae.create_model(NAME).load_pretrained(42)
