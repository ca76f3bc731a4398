"""fastmae.kernels.attention against the eager op (fastmae.reference.attention) and the MAE model's eager path.

Under the interpreter (no GPU): forward and dq, dk, dv for every listed N and head dim in fp32 and fp16, NaN-poisoned
outputs, bitwise determinism, bad inputs, the model with impl="triton" vs "eager", and an sm_80/sm_90 compile of
every kernel and config. On a GPU (``-m cuda``): bf16/fp16/fp32 at MAE's shapes, every autotune config, autocast
and torch.compile.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from fastmae import reference
from fastmae.kernels import attention as attn
from fastmae.kernels._common import poison_outputs
from tests.compile_harness import KernelSpec, assert_compiles
from tests.tolerance import assert_model_within_eager_error, assert_within_eager_error

NS = (1, 7, 50, 65, 197, 257)
DS = (32, 64, 80, 128)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_qkv(b: int, n: int, h: int, d: int, dtype: torch.dtype, seed: int, mult: float = 1.0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * h * d, generator=gen) * mult  # [B, N, 3·H·d]
    dout = torch.randn(b, n, h * d, generator=gen)  # [B, N, H·d]
    return qkv.to(device=device, dtype=dtype), dout.to(device=device, dtype=dtype)


def run_kernel(qkv: torch.Tensor, dout: torch.Tensor, h: int, scale=None):
    """Kernel output and dqkv, every buffer the kernels allocate NaN-poisoned."""
    x = qkv.clone().requires_grad_()
    with poison_outputs():
        out = attn.attention(x, h, scale)
        out.backward(dout)
    return out.detach(), x.grad


def run_eager(qkv: torch.Tensor, dout: torch.Tensor, h: int, scale=None, dtype=None):
    x = qkv.to(dtype or qkv.dtype).clone().requires_grad_()
    out = reference.attention(x, h, scale)
    out.backward(dout.to(x.dtype))
    return out.detach(), x.grad


def parts(dqkv: torch.Tensor, h: int) -> dict[str, torch.Tensor]:
    b, n, three_hd = dqkv.shape
    g = dqkv.reshape(b, n, 3, h, three_hd // (3 * h))  # [B, N, 3, H, d]
    return {"dq": g[:, :, 0], "dk": g[:, :, 1], "dv": g[:, :, 2]}


def check_against_eager(b, n, h, d, dtype, scale=None, mult=1.0, seed=0):
    qkv, dout = make_qkv(b, n, h, d, dtype, seed, mult)
    out, dqkv = run_kernel(qkv, dout, h, scale)
    out_hi, dqkv_hi = run_eager(qkv, dout, h, scale, torch.float64)
    out_lo, dqkv_lo = run_eager(qkv, dout, h, scale)
    tag = f"B={b} N={n} H={h} d={d} {dtype}"
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert_within_eager_error(out, out_hi, out_lo, dtype, f"out {tag}")
    got, hi, lo = parts(dqkv, h), parts(dqkv_hi, h), parts(dqkv_lo, h)
    for name in ("dq", "dk", "dv"):
        assert_within_eager_error(got[name], hi[name], lo[name], dtype, f"{name} {tag}")


# ---- against the eager op under the interpreter (and on the GPU) ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,d", [(n, d) for n in NS for d in DS])
def test_forward_and_grads_match_eager(n, d, dtype):
    """Every listed N with every listed head dim (80 as 5 column groups of 16); B·H = 3; default and set scale.
    fp16 covers every backward: fused (N <= 64), one pass (65, 197 at d = 32), two kernels (the rest)."""
    i = NS.index(n) + DS.index(d)
    b, h = (3, 1) if i % 2 else (1, 3)
    check_against_eager(b, n, h, d, dtype, scale=None if i % 3 else 0.37, mult=1.5, seed=i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,scale", [(257, None), (65, -0.6), (40, 0.9)])
def test_peaked_and_negative_scale_softmax(n, scale, dtype):
    """Large logits whose row maximum moves from key tile to key tile, a negative scale, a one-tile sequence."""
    check_against_eager(1, n, 2, 64, dtype, scale=scale, mult=4.0, seed=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [16, 64, 128])
def test_exact_tile_multiples(n, dtype):
    """No tail tile: N a multiple of the 64 (fp32: 32) block, or exactly one fused tile."""
    check_against_eager(1, n, 3, 48, dtype, seed=n)


# Under the interpreter every dot is a numpy matmul, whose OpenBLAS picks its kernels by CPU. Its Haswell kernels
# (AVX2 machines without AVX-512) round q·kᵀ and k·qᵀ differently: a backward recomputing the logits in another
# orientation than the forward's gave fp32 dv errors of 10× eager's there, unseen on AVX-512 machines.
_HASWELL_BLAS_CASES = """
import ctypes, glob, os, sys, numpy
libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs", "*openblas*"))
get = getattr(ctypes.CDLL(libs[0]), "scipy_openblas_get_corename64_", None) if libs else None
if get is None:
    sys.exit(3)
get.restype = ctypes.c_char_p
if get() != b"Haswell":
    sys.exit(3)
import torch
from tests import test_attention as t
for n, scale in [(40, 0.9), (257, None), (65, -0.6)]:
    t.test_peaked_and_negative_scale_softmax(n, scale, torch.float32)
for n, d in [(50, 64), (65, 128), (197, 80)]:
    t.test_forward_and_grads_match_eager(n, d, torch.float32)
"""


@pytest.mark.skipif(DEVICE == "cuda" or not attn._INTERPRETED, reason="the interpreter's numpy dots only")
def test_fp32_grads_under_openblas_haswell_kernels():
    """The fp32 cases that failed with OpenBLAS' Haswell kernels, run under them (forced in a subprocess)."""
    from numpy._core._multiarray_umath import __cpu_features__ as cpu

    if not (cpu.get("AVX2") and cpu.get("FMA3")):
        pytest.skip("OpenBLAS' Haswell kernels need AVX2 and FMA")
    env = {**os.environ, "OPENBLAS_CORETYPE": "Haswell"}
    proc = subprocess.run(
        [sys.executable, "-c", _HASWELL_BLAS_CASES], capture_output=True, text=True, env=env, timeout=600
    )
    if proc.returncode == 3:
        pytest.skip("numpy's OpenBLAS does not report its core, or does not run the Haswell kernels")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_head_dim_16_and_long_sequence():
    check_against_eager(2, 300, 1, 16, torch.float16, seed=5)


@pytest.mark.parametrize(
    "n,d,dtype", [(50, 64, torch.float16), (65, 64, torch.float16), (197, 32, torch.float16), (197, 64, torch.float32)]
)
def test_bitwise_deterministic(n, d, dtype):
    qkv, dout = make_qkv(3, n, 1, d, dtype, seed=3)
    out_a, grad_a = run_kernel(qkv, dout, 1)
    out_b, grad_b = run_kernel(qkv, dout, 1)
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)


def test_strided_inputs_are_read_in_place():
    """qkv as a slice of a wider buffer, and a stride-0 dout (from ``.sum()``), give the contiguous results."""
    b, n, h, d = 2, 65, 2, 32
    wide = torch.randn(b, n, 3 * h * d + 24, device=DEVICE, dtype=torch.float16)  # [B, N, 3·H·d + 24]
    qkv = wide[..., 5 : 5 + 3 * h * d]
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    x = qkv.clone().requires_grad_()
    attn.attention(x, h).sum().backward()
    y = qkv.requires_grad_()
    out = attn.attention(y, h)
    out.sum().backward()
    assert torch.equal(out, attn.attention(x.detach(), h)) and torch.equal(y.grad, x.grad)


def test_empty_batch():
    x = torch.randn(0, 9, 96, device=DEVICE, requires_grad=True)
    out = attn.attention(x, 2)
    out.sum().backward()
    assert out.shape == (0, 9, 32) and x.grad.shape == x.shape


@pytest.mark.parametrize(
    "make,heads,kwargs,exc,match",
    [
        (lambda: torch.randn(5, 96), 1, {}, ValueError, "3-D"),
        (lambda: torch.randn(2, 5, 100), 1, {}, ValueError, "divisible by 3"),
        (lambda: torch.randn(2, 5, 96), 4, {}, ValueError, r"head dim d = .* = 8 must be in \[16, 128\]"),
        (lambda: torch.randn(2, 5, 3 * 256), 1, {}, ValueError, r"256 must be in \[16, 128\]"),
        (lambda: torch.randn(2, 0, 96), 1, {}, ValueError, "N >= 1"),
        (lambda: torch.randn(2, 5, 96).double(), 1, {}, TypeError, "float32, float16 or bfloat16"),
        (lambda: torch.ones(2, 5, 96, dtype=torch.int64), 1, {}, TypeError, "float32, float16 or bfloat16"),
        (lambda: [[0.0] * 96], 1, {}, TypeError, "torch.Tensor"),
        (lambda: torch.randn(1, 1, 96).expand(1, 2**30, 96), 1, {}, ValueError, "int32 offsets"),
        (lambda: torch.randn(2, 5, 96), 0, {}, ValueError, "num_heads must be >= 1"),
        (lambda: torch.randn(2, 5, 96), -2, {}, ValueError, "num_heads must be >= 1"),
        (lambda: torch.randn(2, 5, 96), 2.0, {}, TypeError, "num_heads must be an int"),
        (lambda: torch.randn(2, 5, 96), True, {}, TypeError, "num_heads must be an int"),
        (lambda: torch.randn(2, 5, 96), 1, {"scale": "0.1"}, TypeError, "scale must be a float"),
        (lambda: torch.randn(2, 5, 96), 1, {"scale": float("nan")}, ValueError, "scale must be finite"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, heads, kwargs, exc, match):
    x = make()
    x = x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    with pytest.raises(exc, match=match):
        attn.attention(x, heads, **kwargs)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(attn, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        attn.attention(torch.randn(1, 4, 96), 1)


def test_force_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown kernel names"):
        with attn.force_config(bwd_fused=0, bwd_all=0):
            pass


@pytest.mark.parametrize(
    "n,d,dtype,backward",
    [
        (50, 64, torch.float16, "fused"),
        (64, 32, torch.float16, "fused"),
        (65, 32, torch.float16, "one_pass"),
        (197, 32, torch.float16, "one_pass"),
        (256, 16, torch.float16, "one_pass"),
        (257, 32, torch.float16, "split"),
        (197, 64, torch.float16, "split"),
        (65, 80, torch.bfloat16, "split"),
        (197, 32, torch.float32, "split"),
        (50, 32, torch.float32, "split"),
    ],
)
def test_tiling_picks_the_backward(n, d, dtype, backward, monkeypatch):
    monkeypatch.delenv(attn.BWD_ENV, raising=False)
    assert attn.tiling(n, dtype, d).backward == backward
    monkeypatch.setenv(attn.BWD_ENV, "split")
    assert attn.tiling(n, dtype, d).backward == ("split" if backward == "one_pass" else backward)
    monkeypatch.setenv(attn.BWD_ENV, "fast")
    with pytest.raises(ValueError, match=r"\$FASTMAE_ATTENTION_BWD must be"):
        attn.tiling(197, torch.float16, 32)


@pytest.mark.parametrize("d,groups", [(16, (16, 1)), (32, (32, 1)), (80, (16, 5)), (48, (16, 3)), (96, (32, 3))])
def test_column_groups(d, groups):
    """A head dim as equal power-of-two groups where they pad less than the next power of two (20: one of 32)."""
    assert attn.column_groups(d) == groups
    assert attn.column_groups(20) == (32, 1) and attn.column_groups(112) == (16, 7)


@pytest.mark.parametrize("n", [65, 197, 256])
def test_one_pass_and_two_kernel_backward_agree(n, monkeypatch):
    """The one-pass backward against the two-kernel one it replaces (``$FASTMAE_ATTENTION_BWD=split``), both within
    the rule against fp64 (fp16; d = 32 with 3 heads, tail rows of 1, 5 and 0)."""
    monkeypatch.delenv(attn.BWD_ENV, raising=False)
    assert attn.tiling(n, torch.float16, 32).backward == "one_pass"
    check_against_eager(2, n, 3, 32, torch.float16, mult=2.0, seed=n)
    monkeypatch.setenv(attn.BWD_ENV, "split")
    check_against_eager(2, n, 3, 32, torch.float16, mult=2.0, seed=n)


def test_model_triton_attention_matches_eager(monkeypatch):
    """mae_vit_nano_patch8 (d = 32 encoder, 16 decoder; 17 and 65 tokens) with only attention on the kernel: same
    loss, prediction and every parameter gradient as the eager model, within the tolerance rule (fp64 reference)."""
    from fastmae import mae_vit_nano_patch8, ops

    monkeypatch.delenv("FASTMAE_IMPL", raising=False)
    calls = []
    real = ops.triton_kernel

    def only_attention(op):
        if op != "attention":
            return None
        return lambda *args: calls.append(1) or real(op)(*args)

    monkeypatch.setattr(ops, "triton_kernel", only_attention)
    torch.manual_seed(0)
    eager = assert_model_within_eager_error(lambda impl: mae_vit_nano_patch8(impl=impl), DEVICE, 64, 64)
    assert len(calls) == len(eager.blocks) + len(eager.decoder_blocks)


class QKVAttention(torch.nn.Module):
    """qkv Linear, the op, proj Linear: how a ViT block uses it."""

    def __init__(self, dim: int, heads: int, fn=attn.attention):
        super().__init__()
        self.qkv, self.proj, self.heads, self.fn = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // self.heads
        return self.proj(self.fn(self.qkv(x), self.heads, d**-0.5))  # [B, N, D]


def compiled_vs_eager(backend: str, n: int, dtype: torch.dtype = torch.float32, fn=attn.attention):
    """torch.compile(fullgraph=True) of a module using the op: one graph; output and gradients of both runs."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch.manual_seed(0)
    module = QKVAttention(64, 2, fn).to(DEVICE, dtype)
    x = torch.randn(3, n, 64, device=DEVICE, dtype=dtype)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    results = []
    for fn in (torch.compile(module, backend=counter, fullgraph=True), module):
        module.zero_grad()
        out = fn(x)
        out.square().sum().backward()
        results.append((out.detach(), module.qkv.weight.grad.clone(), module.proj.weight.grad.clone()))
    assert counter.frame_count == 1
    return results


@pytest.mark.parametrize("n", [50, 197])
def test_torch_compile_fullgraph_traces_the_op(n):
    """Dynamo and AOTAutograd trace autograd.Function + custom_fwd + the ops in one graph (the interpreter's
    opaque ops run the kernels); compiled and eager runs agree bitwise."""
    compiled, eager = compiled_vs_eager("aot_eager", n)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


def test_torch_compile_fullgraph_traces_the_ops_dispatch():
    """Through ``fastmae.ops`` (the model's path) the kernel's lookup and import add no graph break."""
    from fastmae import ops

    compiled, eager = compiled_vs_eager("aot_eager", 50, fn=functools.partial(ops.attention, "triton"))
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


def test_compiled_build_registers_triton_ops_with_their_kernels():
    """Without the interpreter (as on a GPU) the ops are triton_ops and torch.library finds every kernel in their
    bodies (torch.compile's cache keys hash those sources). Imported in a subprocess: this one is interpreted."""
    code = (
        "import torch._library.triton as t, fastmae.kernels.attention as a\n"
        "for op in ('fastmae::attention_fwd', 'fastmae::attention_bwd'):\n"
        "    print(sorted({k.fn.__name__ for k in t.get_triton_kernels_for_op(op)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = str(sorted(attn._tuner_for(name, "16").fn.__name__ for name in attn.CONFIGS))
    assert proc.stdout.splitlines()[-2:] == [names, names]


# ---- GPU only -------------------------------------------------------------------------------------------------------

MAE_SHAPES = [(50, 12, 64), (50, 16, 64), (65, 16, 80), (197, 16, 32), (257, 16, 32)]  # (N, H, d) of ViT-B/L/H


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n,h,d", MAE_SHAPES)
def test_mae_shapes_cuda(n, h, d, dtype):
    """Encoder and decoder shapes at batch 8 (autotuned configs), and a second run for races: bitwise equal."""
    check_against_eager(8, n, h, d, dtype, seed=n + d)
    qkv, dout = make_qkv(8, n, h, d, dtype, seed=1)
    out_a, grad_a = run_kernel(qkv, dout, h)
    out_b, grad_b = run_kernel(qkv, dout, h)
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(attn.CONFIGS))
def test_every_config_cuda(name):
    """Each autotune candidate, forced, at a shape where that kernel runs with full and tail tiles."""
    n = 50 if name == "bwd_fused" else 197
    cases = [(torch.float16, 32)] if name == "bwd" else [(torch.bfloat16, 80), (torch.float16, 32)]
    for index in range(len(attn.CONFIGS[name])):
        with attn.force_config(**{name: index}):
            for dtype, d in cases:
                check_against_eager(5, n, 3, d, dtype, seed=index)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [50, 197])
def test_autocast_cuda(n):
    """Under bf16 autocast the fp32 module's qkv Linear feeds the op bf16; output and weight gradients match the
    eager op under the same autocast within the rule (reference: the fp64 module). fp32 qkv is cast like SDPA's."""
    torch.manual_seed(0)
    modules = {"kernel": QKVAttention(128, 4).cuda(), "eager": QKVAttention(128, 4, reference.attention).cuda()}
    modules["fp64"] = QKVAttention(128, 4, reference.attention).cuda().double()
    for m in modules.values():
        m.load_state_dict(modules["kernel"].state_dict())
    x = torch.randn(4, n, 128, device="cuda")
    res = {}
    for name, m in modules.items():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=name != "fp64"):
            out = m(x.double() if name == "fp64" else x)
        assert out.dtype == (torch.float64 if name == "fp64" else torch.bfloat16)
        out.float().square().sum().backward()
        res[name] = [out.detach().float(), m.qkv.weight.grad.float(), m.qkv.bias.grad.float()]
    assert modules["kernel"].qkv.weight.grad.dtype == torch.float32
    x32 = torch.randn(2, n, 3 * 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        out = attn.attention(x32, 4)
    out.float().sum().backward()
    assert out.dtype == torch.float16 and x32.grad.dtype == torch.float32 and torch.isfinite(x32.grad).all()
    for i, what in enumerate(("out", "qkv.weight.grad", "qkv.bias.grad")):
        assert_within_eager_error(res["kernel"][i], res["fp64"][i], res["eager"][i], torch.bfloat16, what)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n", [50, 65, 197])
def test_torch_compile_inductor_cuda(n, dtype):
    """Inductor, fullgraph: the triton_op decomposes into the kernels; forward and backward match eager."""
    compiled, eager = compiled_vs_eager("inductor", n, dtype)
    atol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=atol * max(1.0, b.abs().max().item()), rtol=0)


# ---- sm_80 / sm_90 compilation of every kernel and config ----------------------------------------------------------

_PTRS = {"QKV", "Out", "DOut", "DQKV"}
_F32_PTRS = {"Stats", "Delta"}
_FLOATS = {"scale", "qk_scale"}
_CONSTEXPRS = {"HEAD_DIM", "DG", "NG", "PRECISION", "EXACT_P", "BLOCK", "TAIL", "Q_TILES"}


def kernel_spec(name: str, cfg, dt: str, head_dim: int, tail: int, q_tiles: int = 3) -> KernelSpec:
    """The spec of kernel ``name`` (a key of ``attn.CONFIGS``) in dtype ``dt`` with a ``tail``-long last tile (and
    ``q_tiles`` full ones for the one-pass backward)."""
    fn = attn._tuner_for(name, "16").fn
    kinds = [(_PTRS, f"*{dt}"), (_F32_PTRS, "*fp32"), (_FLOATS, "fp32"), (_CONSTEXPRS, "constexpr")]
    sig = {a: next((t for names, t in kinds if a in names), "i32") for a in fn.arg_names}
    block = tail if name == "bwd_fused" else attn.BLOCK_32 if dt == "fp32" else attn.BLOCK_16
    width, count = attn.column_groups(head_dim)
    consts = {
        "HEAD_DIM": head_dim,
        "DG": width,
        "NG": count,
        "PRECISION": "tf32x3" if dt == "fp32" else "tf32",
        "EXACT_P": dt == "fp32",
        "BLOCK": block,
        "TAIL": tail,
        "Q_TILES": q_tiles,
    }
    consts = {k: v for k, v in consts.items() if k in sig}
    label = f"{name}[{dt},d={head_dim},tail={tail},w{cfg.num_warps},s{cfg.num_stages}]"
    return KernelSpec(attn.__name__, fn.fn.__name__, sig, consts, cfg.num_warps, cfg.num_stages, label=label)


def all_specs() -> list[KernelSpec]:
    """Every kernel and config: bf16 at ViT-H's d=80 (5 groups of 16, its 4-warp configs) with the largest tail tile
    (the shared-memory worst case), fp16 at the decoders' d=32 with a 16-row tail (the one-pass backward there only),
    bf16 at d=128, fp32 at d=80 with its largest tail."""
    specs = []
    for name, cfgs in attn.CONFIGS.items():
        for cfg in cfgs:
            specs.append(kernel_spec(name, cfg, "fp16", 32, 16))
            if name != "bwd":
                specs.append(kernel_spec(name, cfg, "bf16", 128, attn.BLOCK_16))
    for name, cfgs in attn.CONFIGS_GROUPED.items():
        if name != "bwd":
            specs += [kernel_spec(name, cfg, "bf16", 80, attn.BLOCK_16) for cfg in cfgs]
    for name, cfgs in attn.CONFIGS_FP32.items():
        specs += [kernel_spec(name, cfg, "fp32", 80, attn.BLOCK_32) for cfg in cfgs]
    return specs


def test_every_kernel_and_config_compiles_for_sm80_and_sm90():
    specs = all_specs()
    results = assert_compiles(specs)
    assert all(r["mma"] for r in results), [r["name"] for r in results if not r["mma"]]
    # fp16/bf16 64-row tiles use Hopper's warpgroup MMA (16-row tiles and fp32's 3xTF32 use mma.sync)
    wide = {s.name() for s in specs if s.constexprs["BLOCK"] >= 64 and s.signature["QKV"] != "*fp32"}
    assert wide and all(r["wgmma"] for r in results if r["arch"] == 90 and r["name"] in wide)
