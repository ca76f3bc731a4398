"""impl="auto" runs an op eagerly, with one warning per (op, reason), where its kernel does not take the arguments.

On the CPU the ``auto_on_kernels`` fixture lets ``"auto"`` treat the interpreter's tensors as it treats CUDA tensors,
so the choice, the checks and the kernels run for real; the ``cuda`` tests take the real CUDA path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from fastmae import MAE, ops, reference
from fastmae.kernels._common import interpreting
from tests.tolerance import assert_within_eager_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD_DIM_8 = r"head dim d = 384 / \(3 \* 16\) = 8 must be in \[16, 128\]"


@pytest.fixture
def auto_on_kernels(monkeypatch):
    """``impl="auto"`` as on CUDA (the CPU's tensors count under the interpreter, which conftest turns on without a
    GPU), no ``$FASTMAE_IMPL``, and a fresh record of the warnings given."""
    monkeypatch.delenv("FASTMAE_IMPL", raising=False)
    monkeypatch.setattr(ops, "_warned", set())
    if DEVICE == "cpu":
        assert interpreting()
        monkeypatch.setattr(ops, "auto_device", lambda x: True)


def fallbacks(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ops.EagerFallbackWarning)]


def qkv_heads(dim: int, n: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3 * dim, generator=gen).to(DEVICE)  # [B, N, 3·D]


def test_attention_head_dim_8_falls_back_once(auto_on_kernels):
    """d = 128 / 16 heads = 8: the eager op's result, one warning naming the head dim over two calls; d = 16 runs
    the kernel without a warning; impl="triton" raises the kernel's ValueError."""
    qkv = qkv_heads(128).requires_grad_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [ops.attention("auto", qkv, 16) for _ in range(2)]
        assert ops.use_triton("auto", "attention", qkv_heads(128), 8, None)  # d = 16
    (message,) = fallbacks(record)
    assert "attention" in message and re.search(HEAD_DIM_8, message), message
    eager = reference.sdpa_attention(qkv, 16)
    assert all(torch.equal(out, eager) for out in outs)
    outs[0].sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()
    with pytest.raises(ValueError, match=HEAD_DIM_8):
        ops.attention("triton", qkv, 16)


def _args(case: str, dtype: torch.dtype) -> tuple:
    """Valid arguments of the ops-level function (after ``impl``) of ``case`` (an op; ``masked_mse_rows``: the loss
    of predictions for the patches ``ids`` names): 16×16 images of 8×8 patches, 2 kept."""
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    imgs = rand(2, 3, 16, 16)
    ids = torch.tensor([[2, 0], [1, 3]], device=DEVICE)  # [N, K] kept (or masked) patch ids
    if case == "patch_embed":
        return imgs, ids, rand(8, 3, 8, 8), rand(8), rand(1, 5, 8), rand(1, 1, 8)
    if case == "attention":
        return rand(2, 5, 96), 2, None
    if case == "layer_norm":
        return rand(2, 3, 8), rand(8), rand(8)
    if case == "gelu":
        return rand(2, 3, 8), rand(8)
    if case == "resized_crop":  # two decoded uint8 images, views of 4×4 written in ``dtype``
        images = [torch.randint(0, 256, (3, 9, 11), generator=gen, dtype=torch.uint8).to(DEVICE) for _ in range(2)]
        boxes, flips = torch.tensor([[0, 0, 9, 11], [1, 2, 5, 6]]), torch.tensor([False, True])
        return images, boxes, flips, 4, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), dtype
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]], device=DEVICE, dtype=dtype)
    if case == "masked_mse":
        return rand(2, 4, 192), imgs, mask, 8, True
    if case == "masked_mse_rows":
        return rand(2, 2, 192), imgs, None, 8, True, ids
    restore = torch.tensor([[3, 0, 2, 1], [1, 2, 0, 3]], device=DEVICE)  # [N, L]
    return rand(2, 3, 8), restore, rand(1, 1, 8), rand(1, 5, 8)


FUNCS = {op: getattr(ops, op) for op in ops.KERNELS}
CASES = {**{op: op for op in ops.KERNELS}, "masked_mse_rows": "masked_mse"}  # case -> op


@pytest.mark.parametrize("case", list(CASES))
def test_float64_falls_back_for_every_op(auto_on_kernels, case):
    """float64 arguments (eager takes them, no kernel does): the eager result, one warning naming the dtype; in
    float32 the same call is the kernel's."""
    op = CASES[case]
    args = _args(case, torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = [FUNCS[op]("auto", *args) for _ in range(2)]
        kernel_args = _args(case, torch.float32)
        probe = kernel_args[0][0] if op == "resized_crop" else None  # the views' first argument is a list
        assert ops.use_triton("auto", op, *kernel_args, device_of=probe)
    (message,) = fallbacks(record)
    assert op in message and "torch.float64; the kernel takes float32, float16 or bfloat16" in message
    eager = FUNCS[op]("eager", *args)
    assert all(torch.equal(g, eager) for g in got)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        FUNCS[op]("triton", *args)


def test_layer_norm_wider_than_the_kernel_falls_back(auto_on_kernels):
    """A row wider than the LayerNorm kernel's MAX_D: the eager result, one warning naming the width."""
    from fastmae.kernels.layer_norm import MAX_D

    gen = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*shape, generator=gen).to(DEVICE) for shape in ((2, MAX_D + 1), (MAX_D + 1,), (MAX_D + 1,)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = ops.layer_norm("auto", x, w, b)
    (message,) = fallbacks(record)
    assert f"D = {MAX_D + 1} exceeds" in message
    assert torch.equal(got, ops.layer_norm("eager", x, w, b))


@pytest.mark.parametrize("op,arg,reason", [("patch_embed", 4, "pos_embed requires grad"), ("masked_mse", 1, "imgs")])
def test_inputs_needing_grads_a_kernel_does_not_give_fall_back(auto_on_kernels, op, arg, reason):
    """A trainable pos_embed (the kernel treats it as fixed) and images requiring grad (the loss kernel gives them
    none) get their gradients from the eager op."""
    args = list(_args(op, torch.float32))
    args[arg] = args[arg].clone().requires_grad_()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = FUNCS[op]("auto", *args)
    (message,) = fallbacks(record)
    assert reason in message
    out.sum().backward()
    grad = args[arg].grad
    args[arg] = args[arg].detach().requires_grad_()
    FUNCS[op]("eager", *args).sum().backward()
    assert torch.equal(grad, args[arg].grad)


DECODER_HEAD_DIM_8 = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=128, decoder_depth=2,
    decoder_num_heads=16,
)  # fmt: skip


def run_model(model: MAE, imgs: torch.Tensor, noise: torch.Tensor):
    loss, pred, _ = model(imgs, noise=noise)
    loss.backward()
    return loss.detach(), pred.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def check_decoder_head_dim_8(device: str) -> None:
    """An MAE whose decoder has 128 wide, 16-head blocks (head dim 8): impl="auto" runs the kernels (the encoder's
    attention included) and the decoder's attention eagerly with exactly one warning over two steps; loss,
    prediction and gradients match the eager model within the tolerance rule; impl="triton" raises."""
    torch.manual_seed(0)
    eager = MAE(impl="eager", **DECODER_HEAD_DIM_8).to(device)
    auto = MAE(impl="auto", **DECODER_HEAD_DIM_8).to(device)
    hi = MAE(impl="eager", **DECODER_HEAD_DIM_8).to(device, torch.float64)
    auto.load_state_dict(eager.state_dict())
    hi.load_state_dict(eager.state_dict())
    imgs, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 16, device=device)
    kernel_calls = []
    real = {op: ops.triton_kernel(op) for op in ops.KERNELS}

    def counted(*args):
        kernel_calls.append(1)
        return real["attention"](*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "triton_kernel", lambda op: counted if op == "attention" else real[op])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = run_model(auto, imgs, noise)
            auto.zero_grad()
            run_model(auto, imgs, noise)
    (message,) = fallbacks(record)
    assert re.search(HEAD_DIM_8, message), message
    assert len(kernel_calls) == 2 * len(auto.blocks)
    lo, ref = run_model(eager, imgs, noise), run_model(hi, imgs.double(), noise.double())
    for i, what in enumerate(("loss", "pred")):
        assert_within_eager_error(got[i], ref[i], lo[i], torch.float32, what)
    for k in lo[2]:
        assert_within_eager_error(got[2][k], ref[2][k], lo[2][k], torch.float32, k)
    auto.impl = "triton"
    with pytest.raises(ValueError, match=HEAD_DIM_8):
        auto(imgs, noise=noise)


def test_model_with_decoder_head_dim_8(auto_on_kernels):
    check_decoder_head_dim_8("cpu")


@pytest.mark.cuda
def test_model_with_decoder_head_dim_8_cuda(auto_on_kernels):
    check_decoder_head_dim_8("cuda")


class QKVAttention(torch.nn.Module):
    """qkv Linear, ``ops.attention`` under impl="auto", proj Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(ops.attention("auto", self.qkv(x), self.heads))  # [B, N, D]


def check_compiled(backend: str, heads: int) -> list[str]:
    """torch.compile(fullgraph=True) of a module dispatching under impl="auto": one graph (no break in the choice,
    the checks or the warning), forward and gradients equal to the uncompiled module's; the warnings given."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = QKVAttention(128, heads).to(DEVICE)
    x = torch.randn(2, 9, 128, device=DEVICE)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for fn in (torch.compile(module, backend=counter, fullgraph=True), module):
            module.zero_grad()
            out = fn(x)
            out.square().sum().backward()
            results.append((out.detach(), module.qkv.weight.grad.clone()))
    assert counter.frame_count == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    return fallbacks(record)


@pytest.mark.parametrize("heads", [16, 8])
def test_torch_compile_traces_the_choice(auto_on_kernels, heads):
    """16 heads (d = 8): the eager op in one graph, one warning, given while tracing; 8 heads (d = 16): the kernel."""
    messages = check_compiled("aot_eager", heads)
    assert len(messages) == (1 if heads == 16 else 0)


@pytest.mark.cuda
@pytest.mark.parametrize("heads", [16, 8])
def test_torch_compile_inductor_traces_the_choice_cuda(auto_on_kernels, heads):
    messages = check_compiled("inductor", heads)
    assert len(messages) == (1 if heads == 16 else 0)


REGISTERED = {
    "fastmae::patch_embed_fwd": ["_fwd_kernel", "_fwd_weight_kernel"],
    "fastmae::patch_embed_bwd": ["_bwd_dimg_kernel", "_bwd_dw_kernel", "_bwd_reduce_kernel", "_fwd_weight_kernel"],
    "fastmae::masked_mse_fwd": ["_fwd_kernel", "_fwd_reduce_kernel", "_fwd_wsum_kernel"],
    "fastmae::masked_mse_bwd": ["_bwd_kernel", "_fwd_wsum_kernel"],
    "fastmae::masked_mse_bwd_scale": ["_bwd_scale_kernel"],
    "fastmae::decoder_assembly_fwd": ["_fwd_kernel"],
    "fastmae::decoder_assembly_bwd": ["_bwd_kernel", "_bwd_sum_kernel"],
}


def test_compiled_build_registers_triton_ops_with_their_kernels():
    """Without the interpreter (as on a GPU) the forward and backward of the patch embedding, the loss and the
    decoder assembly are triton_ops, and torch.library finds every kernel they launch (torch.compile's cache keys
    hash their sources). Imported in a subprocess: this one is interpreted."""
    code = "import json, torch._library.triton as t\n"
    code += "import fastmae.kernels.patch_embed, fastmae.kernels.masked_mse, fastmae.kernels.decoder_assembly\n"
    code += f"for op in {list(REGISTERED)!r}:\n"
    code += "    print(json.dumps(sorted(k.fn.__name__ for k in t.get_triton_kernels_for_op(op))))\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads(line) for line in proc.stdout.splitlines()[-len(REGISTERED) :]]
    assert dict(zip(REGISTERED, found)) == REGISTERED
