"""fastmae.MAE(impl="eager") against the timm-built reference: outputs, gradients, keys, init, bad input."""

import math

import pytest
import torch

import fastmae
from fastmae import MAE
from fastmae.reference import MaskedAutoencoderViT

SMALL = dict(embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)


def pair(**kwargs):
    """An eager MAE and the reference with identical weights."""
    model = MAE(impl="eager", **{**SMALL, **kwargs})
    ref = MaskedAutoencoderViT(**{**SMALL, **kwargs})
    ref.load_state_dict(model.state_dict())
    return model, ref


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("img,p,c", [(64, 16, 3), (56, 14, 3), (32, 8, 1)])
def test_matches_reference_outputs_and_gradients(seed, norm_pix, img, p, c):
    torch.manual_seed(seed)
    model, ref = pair(img_size=img, patch_size=p, in_chans=c, norm_pix_loss=norm_pix)
    imgs = torch.randn(3, c, img, img)
    noise = torch.rand(3, (img // p) ** 2)
    outs = model(imgs, 0.75, noise)
    refs = ref(imgs, 0.75, noise)
    for name, a, b in zip(("loss", "pred", "mask"), outs, refs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    outs[0].backward()
    refs[0].backward()
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-7, msg=name)
        else:
            assert param.grad is None and ref_params[name].grad is None


def test_same_rng_gives_same_mask_as_reference():
    model, ref = pair(img_size=32, patch_size=8)
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    a = model(imgs)
    torch.manual_seed(5)
    b = ref(imgs)
    assert torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0], b[0])


def test_deterministic_with_fixed_noise():
    model = fastmae.mae_vit_nano_patch8(impl="eager")
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    a, b = model(imgs, noise=noise), model(imgs, noise=noise)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_noise_fixes_the_mask_with_argsort_semantics():
    model = fastmae.mae_vit_nano_patch8(impl="eager")
    noise = torch.rand(2, 64)
    _, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 64, 64), 0.75, noise)
    kept = noise.argsort(dim=1)[:, :16]
    expect = torch.ones(2, 64).scatter_(1, kept, 0.0)
    assert torch.equal(mask, expect) and torch.equal(ids_restore, noise.argsort(1).argsort(1))


def test_feature_extraction_with_mask_ratio_zero():
    model = fastmae.mae_vit_nano_patch8(impl="eager")
    latent, mask, _ = model.forward_encoder(torch.randn(2, 3, 64, 64), 0.0)
    assert latent.shape == (2, 65, 128) and mask.sum() == 0


def test_state_dict_matches_reference_for_paper_configs():
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"):
        with torch.device("meta"):
            model = fastmae.create_model(name)
            ref = MaskedAutoencoderViT(**fastmae.get_config(name).kwargs())
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert ours == theirs, name
    d = fastmae.get_config("mae_vit_huge_patch14")
    assert ours["pos_embed"] == (1, 257, d.embed_dim) and ours["decoder_pred.weight"] == (14 * 14 * 3, 512)
    assert "blocks.31.attn.qkv.weight" in ours and "decoder_blocks.7.mlp.fc2.bias" in ours


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    model = fastmae.mae_vit_tiny_patch16()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0].double(), fastmae.sincos_2d(192, 14).float().double())
    torch.testing.assert_close(model.decoder_pos_embed[0].double(), fastmae.sincos_2d(128, 14).float().double())
    w = model.patch_embed.proj.weight.view(192, -1)
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert 0.95 * bound < w.abs().max() <= bound
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and torch.all(m.bias == 0)
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and m.eps == 1e-6
    for tok in (model.cls_token, model.mask_token):
        assert 0.01 < tok.std() < 0.03


def test_configs_and_factories():
    assert {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"} <= set(fastmae.list_configs())
    assert "| mae_vit_base_patch16 | 224 | 16 | 768 | 12 | 12 | 512/8/16 | 50/197 |" in fastmae.config_table()
    assert "| mae_vit_huge_patch14 | 224 | 14 | 1280 | 32 | 16 | 512/8/16 | 65/257 |" in fastmae.config_table()
    with pytest.raises(ValueError, match="unknown model 'vit_nope'"):
        fastmae.create_model("vit_nope")
    model = fastmae.mae_vit_nano_patch8(norm_pix_loss=True, impl="eager")
    assert model.norm_pix_loss and model.impl == "eager"


def test_patchify_unpatchify_roundtrip():
    model = fastmae.mae_vit_nano_patch8()
    imgs = torch.randn(2, 3, 64, 64)
    assert model.patchify(imgs).shape == (2, 64, 192)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


class TestBadInput:
    model = fastmae.mae_vit_nano_patch8(impl="eager")

    @pytest.mark.parametrize(
        "imgs,err,match",
        [
            ([[1.0]], TypeError, "imgs must be a torch.Tensor"),
            (torch.randn(3, 64, 64), ValueError, "4-D"),
            (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating"),
            (torch.randn(1, 1, 64, 64), ValueError, "in_chans=3"),
            (torch.randn(1, 3, 48, 64), ValueError, "img_size=64"),
            (torch.randn(1, 3, 64, 64, dtype=torch.float64), TypeError, "float64"),
        ],
    )
    def test_images(self, imgs, err, match):
        with pytest.raises(err, match=match):
            self.model(imgs)

    @pytest.mark.parametrize(
        "ratio,err,match",
        [
            (1.0, ValueError, r"\[0, 1\)"),
            (0.999, ValueError, "keeps no patch"),
            (-0.1, ValueError, r"\[0, 1\)"),
            ("0.5", TypeError, "mask_ratio"),
            (0.0, ValueError, "masks no patch"),
        ],
    )
    def test_mask_ratio(self, ratio, err, match):
        with pytest.raises(err, match=match):
            self.model(torch.randn(1, 3, 64, 64), ratio)

    def test_encoder_rejects_ratio_keeping_nothing(self):
        with pytest.raises(ValueError, match="keeps no patch"):
            self.model.forward_encoder(torch.randn(1, 3, 64, 64), 0.99)

    @pytest.mark.parametrize(
        "noise,err,match",
        [
            (torch.rand(2, 63), ValueError, r"\[2, 64\]"),
            (torch.randint(0, 9, (2, 64)), TypeError, "floating"),
            (torch.rand(2, 64, device="meta"), ValueError, "noise is on meta"),
        ],
    )
    def test_noise(self, noise, err, match):
        with pytest.raises(err, match=match):
            self.model(torch.randn(2, 3, 64, 64), 0.75, noise)

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="imgs is on meta but the model is on cpu"):
            self.model(torch.randn(1, 3, 64, 64, device="meta"))

    def test_low_precision_images_allowed_under_autocast(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pred, _ = self.model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
        assert torch.isfinite(loss) and pred.dtype == torch.bfloat16


class TestImpl:
    def test_env_overrides_constructor(self, monkeypatch):
        monkeypatch.setenv("FASTMAE_IMPL", "eager")
        model = fastmae.mae_vit_nano_patch8(impl="triton")
        assert model.impl == "eager" and all(b.attn.impl == "eager" for b in model.blocks)

    def test_bad_values(self, monkeypatch):
        with pytest.raises(ValueError, match="impl must be one of"):
            fastmae.mae_vit_nano_patch8(impl="cuda")
        monkeypatch.setenv("FASTMAE_IMPL", "fast")
        with pytest.raises(ValueError, match=r"\$FASTMAE_IMPL must be one of"):
            fastmae.mae_vit_nano_patch8()

    def test_setter_propagates(self):
        model = fastmae.mae_vit_nano_patch8(impl="auto")
        model.impl = "eager"
        assert all(b.attn.impl == b.mlp.impl == "eager" for b in [*model.blocks, *model.decoder_blocks])

    def test_triton_on_cpu_without_interpreter_is_a_clear_error(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        model = fastmae.mae_vit_nano_patch8(impl="triton")
        with pytest.raises(RuntimeError, match="impl='triton' needs CUDA tensors"):
            model(torch.randn(1, 3, 64, 64))

    def test_auto_on_cpu_never_asks_for_kernels(self, monkeypatch):
        asked = []
        monkeypatch.setattr(fastmae.ops, "triton_kernel", lambda op: asked.append(op))
        fastmae.mae_vit_nano_patch8(impl="auto")(torch.randn(1, 3, 64, 64))
        assert asked == []

    def test_triton_asks_for_every_op(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        asked = set()
        monkeypatch.setattr(fastmae.ops, "triton_kernel", lambda op: asked.add(op))  # None: no kernel, eager
        fastmae.mae_vit_nano_patch8(impl="triton")(torch.randn(1, 3, 64, 64))
        assert asked == {"patch_embed", "attention", "masked_mse", "decoder_assembly", "layer_norm", "gelu"}
