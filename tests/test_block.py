"""The fused transformer block (LayerNorm with the residual add, GELU with fc1's bias) in fastmae.layers and the model.

Under the interpreter: a block and the nano model with the kernels against the eager ones and a float64 reference
(outputs and every gradient, tolerance rule), the eager model bitwise equal to the timm-built reference, timm export
unchanged, and one graph from torch.compile(fullgraph=True). On a GPU: ViT-B blocks under bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fastmae
from fastmae import layers, ops
from fastmae.reference import LayerNorm6, MaskedAutoencoderViT
from tests.tolerance import assert_model_within_eager_error, assert_within_eager_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAME = "mae_vit_nano_patch8"


def only_kernels(monkeypatch, names: set[str]) -> list[str]:
    """Let ``ops`` find only the kernels in ``names`` (the rest run eagerly); returns the list of kernel calls."""
    monkeypatch.delenv("FASTMAE_IMPL", raising=False)
    calls: list[str] = []
    kernels = {op: ops.triton_kernel(op) for op in names}  # resolved here: importing cannot be traced by dynamo

    def pick(op):
        if op not in names:
            return None
        return lambda *args: calls.append(op) or kernels[op](*args)

    monkeypatch.setattr(ops, "triton_kernel", pick)
    return calls


def blocks_and_norm(dim: int, heads: int, depth: int, impl: str, dtype=torch.float32):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([layers.Block(dim, heads, 4.0, LayerNorm6, impl) for _ in range(depth)])
    norm = LayerNorm6(dim)
    for m in (*blocks, norm):  # non-trivial norm parameters and biases
        for p in m.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    return blocks.to(DEVICE, dtype), norm.to(DEVICE, dtype)


def encode(blocks, norm, x):
    """The model's encoder loop: each block's last add fused into the next norm, the last one into ``norm``."""
    x, branch = layers.run_blocks(blocks, x)
    return layers.add_norm(blocks[0].impl, norm, x, branch, x.dtype)[1]


def grads_of(blocks, norm, x, dy):
    x = x.clone().requires_grad_()
    out = encode(blocks, norm, x)
    out.backward(dy.to(out.dtype))
    params = {f"{i}.{k}": p.grad for i, m in enumerate((*blocks, norm)) for k, p in m.named_parameters()}
    return out.detach(), {"x": x.grad, **params}


@pytest.mark.parametrize("bias_in_gelu", [True, False], ids=["bias-in-gelu", "bias-in-gemm"])
def test_fused_blocks_match_eager(bias_in_gelu, monkeypatch):
    """Two blocks and a final norm, every op on its kernel (attention too), 17 tokens of width 64: output and the
    gradient of x and of every parameter within the rule against the eager blocks (fp64 reference)."""
    calls = only_kernels(monkeypatch, {"layer_norm", "gelu", "attention"})
    monkeypatch.setattr(layers.Mlp, "bias_in_gelu", bias_in_gelu)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, 64, generator=gen).to(DEVICE)
    dy = torch.randn(2, 17, 64, generator=gen).to(DEVICE)
    out, grads = grads_of(*blocks_and_norm(64, 2, 2, "triton"), x, dy)
    assert calls.count("layer_norm") == 5 and calls.count("gelu") == 2 and calls.count("attention") == 2
    out_lo, grads_lo = grads_of(*blocks_and_norm(64, 2, 2, "eager"), x, dy)
    out_hi, grads_hi = grads_of(*blocks_and_norm(64, 2, 2, "eager", torch.float64), x.double(), dy)
    assert_within_eager_error(out, out_hi, out_lo, torch.float32, "out")
    assert grads.keys() == grads_lo.keys()
    for k in grads:
        assert_within_eager_error(grads[k], grads_hi[k], grads_lo[k], torch.float32, k)


def test_block_output_is_the_pending_pair_summed(monkeypatch):
    """The plain block's output equals the pending form's ``x + branch``, on the kernels and eagerly, and the
    pending form runs the module's hooks."""
    only_kernels(monkeypatch, {"layer_norm", "gelu"})
    x = torch.randn(3, 5, 32, device=DEVICE)
    for impl in ("triton", "eager"):
        (blk,), _ = blocks_and_norm(32, 2, 1, impl)
        seen: list[str] = []
        blk.register_forward_pre_hook(lambda module, args, seen=seen, impl=impl: seen.append(impl))
        residual, branch = blk(x, pending=True)
        assert torch.equal(blk(x), residual + branch) and seen == [impl, impl]


@pytest.mark.parametrize(
    "bias_in_gelu,pred_masked_only",
    [(True, False), (True, True), (False, True)],
    ids=["bias-in-gelu-all-rows", "bias-in-gelu-masked-rows", "bias-in-gemm-masked-rows"],
)
def test_model_with_fused_blocks_matches_eager(pred_masked_only, bias_in_gelu, monkeypatch):
    """The nano model with the LayerNorm and GELU kernels (the other ops eager): loss, prediction and every
    parameter gradient within the rule against the eager model (fp64 reference)."""
    calls = only_kernels(monkeypatch, {"layer_norm", "gelu"})
    monkeypatch.setattr(layers.Mlp, "bias_in_gelu", bias_in_gelu)
    torch.manual_seed(0)
    build = lambda impl: fastmae.create_model(NAME, impl=impl)  # noqa: E731
    eager = assert_model_within_eager_error(build, DEVICE, 64, 64, pred_masked_only=pred_masked_only)
    depth, decoder_depth = len(eager.blocks), len(eager.decoder_blocks)
    assert calls.count("layer_norm") == 2 * (depth + decoder_depth) + 2
    assert calls.count("gelu") == depth + decoder_depth


def test_other_norm_layers_run_eagerly(monkeypatch):
    """A norm that is not an affine nn.LayerNorm (here RMSNorm) is called as a module, never through the kernel."""
    calls = only_kernels(monkeypatch, {"layer_norm", "gelu"})
    torch.manual_seed(0)
    blk = layers.Block(32, 2, 2.0, torch.nn.RMSNorm, "triton").to(DEVICE)
    x, branch = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 5, 32, device=DEVICE)
    residual, y = layers.add_norm("triton", blk.norm1, x, branch)
    assert torch.equal(residual, x + branch) and torch.equal(y, blk.norm1(x + branch))
    blk(x)
    assert "layer_norm" not in calls and calls == ["gelu"]


def test_eager_model_is_bitwise_the_timm_reference():
    """impl="eager" runs the blocks in the pending form through add_norm: still the very ops of timm's blocks."""
    torch.manual_seed(0)
    model = fastmae.create_model(NAME, impl="eager")
    ref = MaskedAutoencoderViT(**fastmae.get_config(NAME).kwargs())
    ref.load_state_dict(model.state_dict())
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 64)
    outs, refs = model(imgs, noise=noise), ref(imgs, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip(outs, refs))
    outs[0].backward()
    refs[0].backward()
    ref_params = dict(ref.named_parameters())
    for k, p in model.named_parameters():
        assert (p.grad is None and ref_params[k].grad is None) or torch.equal(p.grad, ref_params[k].grad), k


def test_timm_export_unchanged(monkeypatch):
    """Same state-dict keys as the reference; the encoder export loads strictly into timm's ViT, whose features
    match the model's with the fused blocks."""
    only_kernels(monkeypatch, {"layer_norm", "gelu"})
    torch.manual_seed(0)
    model = fastmae.create_model(NAME, impl="triton").eval()
    ref = MaskedAutoencoderViT(**fastmae.get_config(NAME).kwargs())
    assert list(model.state_dict()) == list(ref.state_dict())
    vit = VisionTransformer(**fastmae.get_config(NAME).timm_vit_kwargs()).eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    vit64 = VisionTransformer(**fastmae.get_config(NAME).timm_vit_kwargs()).double().eval()
    vit64.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    increasing = torch.arange(64, dtype=torch.float32).expand(2, -1).contiguous()  # keeps every patch in order
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(imgs, 0.0, noise=increasing)
        feats, feats64 = vit.forward_features(imgs), vit64.forward_features(imgs.double())
    assert latent.dtype == torch.float32
    assert_within_eager_error(latent, feats64, feats, torch.float32, "features")


def test_torch_compile_fullgraph_captures_the_fused_blocks(monkeypatch):
    """Dynamo and AOTAutograd trace two fused blocks and the final norm (LayerNorm, GELU and attention ops) into one
    graph; compiled and uncompiled runs agree bitwise, forward and backward."""
    import torch._dynamo.testing

    only_kernels(monkeypatch, {"layer_norm", "gelu", "attention"})
    torch._dynamo.reset()
    blocks, norm = blocks_and_norm(64, 2, 2, "triton")
    x = torch.randn(2, 9, 64, device=DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    results = []
    for fn in (torch.compile(encode, backend=counter, fullgraph=True), encode):
        for m in (*blocks, norm):
            m.zero_grad()
        xs = x.clone().requires_grad_()
        out = fn(blocks, norm, xs)
        out.square().sum().backward()
        results.append([out.detach(), xs.grad, *(p.grad for m in (*blocks, norm) for p in m.parameters())])
    assert counter.frame_count == 1
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---- GPU only -------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dim,heads,tokens", [(768, 12, 50), (512, 16, 197)], ids=["vit-b-encoder", "vit-b-decoder"])
@pytest.mark.parametrize("bias_in_gelu", [True, False], ids=["bias-in-gelu", "bias-in-gemm"])
def test_vit_b_blocks_under_autocast_cuda(dim, heads, tokens, bias_in_gelu, monkeypatch):
    """Two ViT-B blocks and a final norm at batch 16 under bf16 autocast: the fused blocks against the eager ones
    under the same autocast, both against fp32 eager (the rule with the bf16 atol)."""
    monkeypatch.delenv("FASTMAE_IMPL", raising=False)
    monkeypatch.setattr(layers.Mlp, "bias_in_gelu", bias_in_gelu)
    x = torch.randn(16, tokens, dim, device="cuda")
    dy = torch.randn(16, tokens, dim, device="cuda")
    res = {}
    for name, impl in (("fused", "triton"), ("eager", "eager"), ("fp32", "eager")):
        blocks, norm = blocks_and_norm(dim, heads, 2, impl)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "fp32"):
            res[name] = grads_of(blocks, norm, x, dy)
    for k in ("out", *res["fp32"][1]):
        got, lo, hi = ((r[0] if k == "out" else r[1][k]).float() for r in (res["fused"], res["eager"], res["fp32"]))
        assert_within_eager_error(got, hi, lo, torch.bfloat16, k)


def test_byte_count_of_one_gemm_and_a_view():
    """benches/block_bytes counts what an op takes and returns, views nothing, and a GEMM's FLOPs."""
    from benches.block_bytes import ByteCounter

    a, b, bias = torch.randn(6, 4), torch.randn(4, 5), torch.randn(5)
    with ByteCounter() as count:
        torch.addmm(bias, a, b).t().reshape(-1)  # the transpose's reshape copies: read 30 floats, write 30
    assert dict(count.read) == {"aten::addmm": 4 * (5 + 24 + 20), "aten::clone": 4 * 30}
    assert dict(count.written) == {"aten::addmm": 4 * 30, "aten::clone": 4 * 30}
    assert count.gemm_flops == 2 * 6 * 4 * 5 and count.other_bytes() == 4 * 60


@pytest.mark.parametrize("tokens, dim, heads", [((2, 5), 64, 2), ((3, 17), 80, 1)])
def test_fused_block_moves_fewer_bytes_than_timm(tokens, dim, heads):
    """The fused block (pending residual, LayerNorm with the add, attention writing dqkv in place, GELU with fc1's
    bias) moves fewer bytes forward and backward than timm's, with the same GEMM work."""
    from benches.block_bytes import block_bytes

    eager, fused = (block_bytes(kind, tokens, dim, heads, 4.0) for kind in ("timm", "fastmae"))
    assert fused.gemm_flops == eager.gemm_flops > 0
    assert fused.other_bytes() < 0.8 * eager.other_bytes()
    assert {"fastmae::layer_norm_fwd", "fastmae::attention_fwd", "fastmae::gelu_fwd"} <= fused.read.keys()
    assert not {"aten::native_layer_norm", "aten::gelu", "aten::stack"} & fused.read.keys()
