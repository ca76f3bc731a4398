"""fastmae.kernels.gelu against the eager op (fastmae.reference.gelu): y, dx and dbias.

Under the interpreter (no GPU): fp32, fp16 and bf16 at MLP widths and odd ones, with and without the fused bias,
NaN-poisoned outputs, bitwise determinism, strided and empty inputs, bad inputs, and an sm_80/sm_90 compile of
every kernel and config with no register spills. On a GPU (``-m cuda``): bf16 at MAE's sizes and torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from fastmae import reference
from fastmae.kernels import gelu as gl
from fastmae.kernels._common import poison_outputs
from tests.compile_harness import ARCHS, SHARED_LIMIT, KernelSpec, compile_specs
from tests.test_layer_norm import registered_kernels
from tests.tolerance import assert_within_eager_error, atol_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# (rows, hidden width): ViT MLP widths (4 × 192 .. 1280) with few rows, odd widths and rows.
SHAPES = [(9, 768), (5, 1536), (3, 2048), (3, 3072), (2, 4096), (2, 5120), (4, 1000), (7, 1), (11, 37)]


def make(m, h, dtype, bias_dtype=None, seed=0, lead=()):
    """x (spread over GELU's curved range), bias (or None)."""
    gen = torch.Generator().manual_seed(seed)
    x = (2.5 * torch.randn(*lead, m, h, generator=gen)).to(DEVICE, dtype)
    bias = None if bias_dtype is None else torch.randn(h, generator=gen).to(DEVICE, bias_dtype)
    return x, bias


def run(fn, x, bias, dy, dtype=None):
    """y and (dx, dbias or None) of ``fn`` on copies of the inputs (cast to ``dtype`` when given)."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach().clone())
    xs = cast(x).requires_grad_()
    bs = None if bias is None else cast(bias).requires_grad_()
    y = fn(xs, bs)
    y.backward(dy.to(dtype or y.dtype))
    return y.detach(), (xs.grad, None if bs is None else bs.grad)


def check(x, bias, name=""):
    """The kernel (outputs NaN-poisoned) against the eager op in the inputs' dtypes and in float64."""
    gen = torch.Generator().manual_seed(x.shape[-1])
    dy = torch.randn(x.shape, generator=gen).to(DEVICE, x.dtype)
    with poison_outputs():
        y, grads = run(gl.gelu, x, bias, dy)
    y_hi, grads_hi = run(reference.gelu, x, bias, dy, torch.float64)
    y_lo, grads_lo = run(reference.gelu, x, bias, dy)
    assert y.dtype == x.dtype  # eager's y promotes to the bias's dtype; the next Linear would cast it to x's
    assert_within_eager_error(y, y_hi, y_lo.to(x.dtype), x.dtype, f"{name} y", atol_for(y, y_hi))
    for key, g, g_hi, g_lo, src in zip(("dx", "dbias"), grads, grads_hi, grads_lo, (x, bias)):
        if src is None:
            assert g is None
            continue
        assert g.dtype == src.dtype, f"{name} {key}: {g.dtype}, expected {src.dtype}"
        assert_within_eager_error(g, g_hi, g_lo.to(src.dtype), src.dtype, f"{name} {key}", atol_for(g, g_hi))
    return y, grads


# ---- against the eager op under the interpreter (and on the GPU) ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m,h", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_matches_eager(m, h, dtype, with_bias):
    check(*make(m, h, dtype, dtype if with_bias else None, seed=m + h), name=f"M={m} H={h} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_activations_with_fp32_bias(dtype):
    """As under autocast: fc1's half output plus its fp32 bias; y and dx in the half dtype, dbias in fp32 (the
    eager op promotes y to fp32: it is compared rounded to the half dtype, as the next Linear would read it)."""
    x, bias = make(6, 384, dtype, torch.float32, seed=3)
    y, (dx, dbias) = check(x, bias)
    assert y.dtype == dx.dtype == dtype and dbias.dtype == torch.float32


def test_extreme_values():
    """Far tails (Φ saturates, φ underflows) and zero."""
    x = torch.tensor([[-30.0, -8.0, -1e-3, 0.0, 1e-3, 8.0, 30.0, 3.0]], device=DEVICE)
    check(x, None)
    check(x.half(), torch.linspace(-1, 1, 8, device=DEVICE).half())


def test_many_tiles_per_backward_program(monkeypatch):
    """Fewer backward programs than row tiles: the dbias partials of three programs over several tiles each."""
    monkeypatch.setattr(gl, "BWD_PROGRAMS", 3)
    monkeypatch.setattr(gl, "TILE", 256)
    check(*make(23, 160, torch.float32, torch.float32, seed=8), name="P=3")
    check(*make(19, 96, torch.float16, torch.float16, seed=9), name="P=3 fp16")


def test_leading_dims_and_strided_rows():
    x, bias = make(5, 96, torch.float32, torch.float32, lead=(3,), seed=4)
    wide = torch.randn(3, 5, 128, device=DEVICE)
    wide[..., 16:112] = x
    strided = wide[..., 16:112]
    assert not strided.is_contiguous() and strided.stride(-1) == 1
    y, grads = check(strided, bias)
    y_c, grads_c = check(x, bias)
    assert y.shape == (3, 5, 96) and torch.equal(y, y_c) and all(torch.equal(a, b) for a, b in zip(grads, grads_c))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_bitwise_deterministic(dtype, monkeypatch):
    monkeypatch.setattr(gl, "BWD_PROGRAMS", 4)
    x, bias = make(37, 768, dtype, torch.float32, seed=1)
    dy = torch.randn_like(x)
    y_a, grads_a = run(gl.gelu, x, bias, dy)
    y_b, grads_b = run(gl.gelu, x, bias, dy)
    assert torch.equal(y_a, y_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_empty_rows_and_frozen_bias():
    x, bias = make(0, 64, torch.float32, torch.float32)
    xs, bs = x.clone().requires_grad_(), bias.clone().requires_grad_()
    gl.gelu(xs, bs).sum().backward()
    assert xs.grad.shape == (0, 64) and torch.equal(bs.grad, torch.zeros(64, device=DEVICE))
    x, bias = make(3, 64, torch.float32, torch.float32)
    xs = x.clone().requires_grad_()
    gl.gelu(xs, bias).sum().backward()
    assert xs.grad is not None and bias.grad is None


@pytest.mark.parametrize(
    "x,bias,exc,match",
    [
        ([[1.0]], None, TypeError, "x must be a torch.Tensor"),
        (torch.ones(2, 8, dtype=torch.int64), None, TypeError, "x must be float32, float16 or bfloat16"),
        (torch.ones(2, 8, dtype=torch.float64), None, TypeError, "x must be float32"),
        (torch.ones(()), None, ValueError, "last dim H >= 1"),
        (torch.ones(3, 0), None, ValueError, "last dim H >= 1"),
        (torch.ones(2, 8), torch.ones(7), ValueError, r"bias must be \[H\] = \[8\]"),
        (torch.ones(2, 8), torch.ones(2, 8), ValueError, r"bias must be \[H\] = \[8\]"),
        (torch.ones(2, 8), torch.ones(8, dtype=torch.float64), TypeError, "bias must be float32"),
        (torch.ones(2, 8), 1.0, TypeError, "bias must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, bias, exc, match):
    x = x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    bias = bias.to(DEVICE) if isinstance(bias, torch.Tensor) else bias
    with pytest.raises(exc, match=match):
        gl.gelu(x, bias)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(gl, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        gl.gelu(torch.randn(2, 8))


def test_compiled_build_registers_triton_ops_with_their_kernels():
    found = registered_kernels(("fastmae::gelu_fwd", "fastmae::gelu_bwd"))
    assert found == [["_fwd_kernel"], ["_bwd_dbias_kernel", "_bwd_kernel"]]


# ---- GPU only -------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("m,h", [(256 * 50, 3072), (256 * 197 + 3, 2048), (64 * 65, 5120), (999, 1000)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_mae_sizes_cuda(m, h, with_bias):
    """ViT-B encoder / decoder MLPs at batch 256 and ViT-H's: bf16 with an fp32 bias as under autocast, twice."""
    x, bias = make(m, h, torch.bfloat16, torch.float32 if with_bias else None, seed=h)
    y_a, grads_a = check(x, bias)
    y_b, grads_b = check(x, bias)
    assert torch.equal(y_a, y_b) and all(a is b or torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.cuda
def test_torch_compile_inductor_cuda():
    x, bias = make(50, 3072, torch.bfloat16, torch.float32)
    torch._dynamo.reset()
    fn = torch.compile(gl.gelu, fullgraph=True)
    assert torch.equal(fn(x, bias), gl.gelu(x, bias))


# ---- sm_80 / sm_90 compilation of every kernel and config ----------------------------------------------------------

MOD = gl.__name__
NO_SPILLS = "--warn-on-spills --warning-as-error"  # ptxas: a config that spills registers fails to compile
LIMIT = min(SHARED_LIMIT.values())


def gelu_specs() -> list[KernelSpec]:
    """Both kernels at each tile config (H = 3072 and 2048: 1024-wide column blocks; 384: 512; 200: 256), bf16 with
    an fp32 bias as MAE runs, plus fp16 and fp32 at 3072; and the dbias reduction."""
    aligned = ("X", "Bias", "Y", "DY", "DX", "DBiasPart", "N", "stride_x", "stride_y", "stride_dy", "stride_dx")
    cases = [(h, "bf16") for h in (3072, 2048, 384, 200)] + [(3072, "fp16"), (3072, "fp32")]
    specs = []
    for h, dt in cases:
        block_m, block_n = gl.tiling(h)
        consts = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        for has_bias in (True, False):
            sig = {"X": f"*{dt}", "Bias": "*fp32", "Y": f"*{dt}", "M": "i32", "N": "i32"}
            sig.update({"stride_x": "i32", "stride_y": "i32"})
            sig.update(dict.fromkeys(("HAS_BIAS", "BLOCK_M", "BLOCK_N"), "constexpr"))
            align = tuple(a for a in aligned if a in sig and (a != "N" or h % 16 == 0))
            label = f"fwd[H={h},{dt},bias={has_bias}]"
            specs.append(KernelSpec(MOD, "_fwd_kernel", sig, {**consts, "HAS_BIAS": has_bias}, 4, 1, label, align))
            sig = {"X": f"*{dt}", "Bias": "*fp32", "DY": f"*{dt}", "DX": f"*{dt}", "DBiasPart": "*fp32", "M": "i32"}
            sig.update({"N": "i32", "stride_x": "i32", "stride_dy": "i32", "stride_dx": "i32"})
            sig.update(dict.fromkeys(("HAS_BIAS", "BLOCK_M", "BLOCK_N"), "constexpr"))
            align = tuple(a for a in aligned if a in sig and (a != "N" or h % 16 == 0))
            label = f"bwd[H={h},{dt},bias={has_bias}]"
            specs.append(KernelSpec(MOD, "_bwd_kernel", sig, {**consts, "HAS_BIAS": has_bias}, 4, 1, label, align))
    sig = {
        "DBiasPart": "*fp32",
        "DBias": "*fp32",
        "P": "i32",
        "N": "i32",
        "BLOCK_P": "constexpr",
        "BLOCK_N": "constexpr",
    }
    consts = {"BLOCK_P": gl.DBIAS_BLOCK_P, "BLOCK_N": gl.DBIAS_BLOCK_N}
    specs.append(KernelSpec(MOD, "_bwd_dbias_kernel", sig, consts, 4, 1, "bwd_dbias", ("DBiasPart", "DBias", "N")))
    return specs


def test_every_kernel_and_config_compiles_for_sm80_and_sm90_without_spills(monkeypatch):
    """ptxas's spill warning as an error (that it takes effect is checked in test_layer_norm.py's compile test)."""
    monkeypatch.setenv("PTXAS_OPTIONS", NO_SPILLS)
    specs = gelu_specs()
    results = compile_specs(specs, archs=ARCHS)
    bad = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in results if not r["ok"]]
    bad += [f"{r['name']} sm_{r['arch']}: {r['shared']} B shared" for r in results if r["ok"] and r["shared"] > LIMIT]
    assert not bad, "kernels that spill or fail to compile:\n" + "\n".join(bad)
    assert len(results) == len(ARCHS) * len(specs)
