"""The model with the fused loss and assembly: impl="triton" against impl="eager", and pred for masked rows only."""

import pytest
import torch

import fastmae
from fastmae import ops
from fastmae.kernels.decoder_assembly import decoder_assembly
from fastmae.kernels.masked_mse import masked_mse


def pair(norm_pix):
    """Two nano models with the same weights: Triton kernels and eager ops."""
    torch.manual_seed(0)
    fast = fastmae.mae_vit_nano_patch8(impl="triton", norm_pix_loss=norm_pix)
    eager = fastmae.mae_vit_nano_patch8(impl="eager", norm_pix_loss=norm_pix)
    eager.load_state_dict(fast.state_dict())
    return fast, eager


def run(model, imgs, noise, bf16_autocast=False, **kwargs):
    """(loss, pred, mask, {param: grad}) of one forward (under CUDA bf16 autocast if asked) and backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16_autocast):
        loss, pred, mask = model(imgs, 0.75, noise, **kwargs)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), pred.detach(), mask, grads


def assert_same_training_signal(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6, msg="loss")
    assert set(a[3]) == set(b[3])
    for name in a[3]:
        assert a[3][name] is not None and torch.isfinite(a[3][name]).all(), name
        torch.testing.assert_close(a[3][name], b[3][name], rtol=1e-4, atol=1e-6, msg=name)


def test_triton_impl_dispatches_to_these_kernels():
    x = torch.zeros(1)
    assert ops.use_triton("triton", "masked_mse", x) and ops.triton_kernel("masked_mse") is masked_mse
    assert ops.use_triton("triton", "decoder_assembly", x)
    assert ops.triton_kernel("decoder_assembly") is decoder_assembly


@pytest.mark.parametrize("norm_pix", [False, True])
def test_triton_model_matches_eager(norm_pix):
    fast, eager = pair(norm_pix)
    imgs, noise = torch.rand(2, 3, 64, 64), torch.rand(2, 64)
    a, b = run(fast, imgs, noise), run(eager, imgs, noise)
    assert torch.equal(a[2], b[2])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-5, msg="pred")
    assert_same_training_signal(a, b)


@pytest.mark.parametrize("impl", ["triton", "eager"])
def test_pred_masked_only_gives_the_same_loss_and_gradients(impl):
    fast, eager = pair(True)
    model = fast if impl == "triton" else eager
    imgs, noise = torch.rand(2, 3, 64, 64), torch.rand(2, 64)
    full = run(eager, imgs, noise)
    rows = run(model, imgs, noise, pred_masked_only=True)
    assert torch.equal(rows[2], full[2])
    assert rows[1].shape == (2, 48, 192)
    torch.testing.assert_close(rows[1], full[1][full[2].bool()].view(2, 48, 192), rtol=1e-4, atol=1e-5)
    assert_same_training_signal(rows, full)


def test_pred_masked_only_with_other_mask_ratios():
    _, eager = pair(False)
    imgs, noise = torch.rand(3, 3, 64, 64), torch.rand(3, 64)
    for ratio, masked in [(0.5, 32), (0.9, 58), (0.01, 1)]:
        loss, pred, mask = eager(imgs, ratio, noise, pred_masked_only=True)
        ref_loss, ref_pred, _ = eager(imgs, ratio, noise)
        assert pred.shape == (3, masked, 192) and int(mask[0].sum()) == masked
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pred.flatten(0, 1), ref_pred[mask.bool()], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("pred_masked_only", [False, True])
def test_cuda_base_model_bf16_autocast_matches_eager(pred_masked_only):
    torch.manual_seed(0)
    fast = fastmae.mae_vit_base_patch16(impl="triton", norm_pix_loss=True).cuda()
    eager = fastmae.mae_vit_base_patch16(impl="eager", norm_pix_loss=True).cuda()
    eager.load_state_dict(fast.state_dict())
    imgs, noise = torch.rand(8, 3, 224, 224, device="cuda"), torch.rand(8, 196, device="cuda")
    a = run(fast, imgs, noise, True, pred_masked_only=pred_masked_only)
    b = run(eager, imgs, noise, True)
    c = run(fast, imgs, noise, True, pred_masked_only=pred_masked_only)
    torch.testing.assert_close(a[0], b[0], rtol=2e-2, atol=2e-3)
    assert torch.equal(a[0], c[0]) and all(torch.equal(a[3][k], c[3][k]) for k in a[3])
