"""The whole model with every kernel on a GPU: bf16 autocast at ViT-B/H shapes, and under torch.compile.

Each compares ``MAE(impl="triton")`` with the timm reference run in the same precision, both against the
reference in fp32, with the kernels' tolerance rule (error at most twice the eager bf16 error plus atol).
"""

import pytest
import torch

import fastmae
from fastmae.reference import MaskedAutoencoderViT
from tests.tolerance import assert_within_eager_error

pytestmark = pytest.mark.cuda

GRADS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "mask_token", "decoder_pred.weight")


def run(model, imgs, noise, dtype):
    """loss, pred and a few gradients of one forward/backward, under autocast unless dtype is fp32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss, pred, mask = model(imgs, 0.75, noise)
    loss.backward()
    params = dict(model.named_parameters())
    return {"loss": loss.float(), "pred": pred.float(), **{k: params[k].grad.float() for k in GRADS}}


def setup(name, impl, norm_pix=False):
    """A model and the reference with the same weights, inputs, and the reference's fp32 and bf16 results."""
    torch.manual_seed(0)
    model = fastmae.create_model(name, norm_pix_loss=norm_pix, impl=impl).cuda()
    ref = MaskedAutoencoderViT(**fastmae.get_config(name).kwargs(), norm_pix_loss=norm_pix).cuda()
    ref.load_state_dict(model.state_dict())
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    noise = torch.rand(8, model.num_patches, device="cuda")
    return model, imgs, noise, run(ref, imgs, noise, torch.float32), run(ref, imgs, noise, torch.bfloat16)


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_huge_patch14"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_triton_model_matches_reference_in_bf16(name, norm_pix):
    model, imgs, noise, hi, lo = setup(name, "triton", norm_pix)
    out = run(model, imgs, noise, torch.bfloat16)
    again = run(model, imgs, noise, torch.bfloat16)
    for key in hi:
        assert_within_eager_error(out[key], hi[key], lo[key], torch.bfloat16, name=key)
        assert torch.equal(out[key], again[key]), f"{key}: two runs differ"


@pytest.mark.parametrize("impl,compile", [("triton", True), ("eager", False)])
def test_vit_b_matches_reference(impl, compile):
    model, imgs, noise, hi, lo = setup("mae_vit_base_patch16", impl)
    out = run(torch.compile(model) if compile else model, imgs, noise, torch.bfloat16)
    for key in hi:
        assert_within_eager_error(out[key], hi[key], lo[key], torch.bfloat16, name=key)
