"""MAE.forward_features: every patch's features in raster order, deterministic, under every impl; bad batches."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fastmae

from .tolerance import assert_within_eager_error

NAME = "mae_vit_nano_patch8"


def nano(impl, img_size=32):
    torch.manual_seed(0)
    return fastmae.create_model(NAME, impl=impl, img_size=img_size).eval()


def timm_encoder(model, dtype):
    kwargs = {**fastmae.get_config(NAME).timm_vit_kwargs(), "img_size": model.patch_embed.img_size[0]}
    vit = VisionTransformer(**kwargs).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    return vit.to(dtype)


@pytest.mark.parametrize("impl", ["eager", "auto", "triton"])
def test_features_are_timm_features_in_raster_order(impl):
    model = nano(impl)
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(imgs)
        again = model.forward_features(imgs)
        ref_hi = timm_encoder(model, torch.float64).forward_features(imgs.double())  # [3, 17, 128]
        ref_lo = timm_encoder(model, torch.float32).forward_features(imgs)
    assert feats.shape == (3, 1 + 16, 128)
    assert torch.equal(feats, again)  # no randomness
    assert_within_eager_error(feats, ref_hi, ref_lo, torch.float32, f"forward_features impl={impl}")


def test_forward_encoder_gives_the_same_features_shuffled():
    model = nano("eager")
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(imgs)
        torch.manual_seed(1)
        shuffled, mask, ids_restore = model.forward_encoder(imgs, 0.0)
    assert mask.sum() == 0
    order = ids_restore.argsort(dim=1)  # [N, L] the patch behind each shuffled token
    assert not torch.equal(order, torch.arange(16).expand(2, -1))  # forward_encoder's tokens are shuffled
    torch.testing.assert_close(shuffled[:, 1:], feats[:, 1:].gather(1, order.unsqueeze(-1).expand(-1, -1, 128)))
    torch.testing.assert_close(shuffled[:, 0], feats[:, 0])


def test_empty_batch_is_an_error():
    model = nano("eager")
    empty = torch.empty(0, 3, 32, 32)
    for call in (
        lambda: model(empty),
        lambda: model.forward_features(empty),
        lambda: model.forward_encoder(empty, 0.5),
    ):
        with pytest.raises(ValueError, match=r"imgs holds no image \(shape \[0, 3, 32, 32\]\)"):
            call()
