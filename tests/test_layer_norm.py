"""fastmae.kernels.layer_norm against the eager op (fastmae.reference.layer_norm): y, x_new and every gradient.

Under the interpreter (no GPU): fp32, fp16 and bf16 at ViT widths and odd ones, with and without the fused residual
add and the residual gradient, mixed dtypes as under autocast, NaN-poisoned outputs, bitwise determinism, strided
and empty inputs, bad inputs, and an sm_80/sm_90 compile of every kernel and config with no register spills. On a
GPU (``-m cuda``): bf16 at MAE's row counts, autocast, and torch.compile with Inductor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmae import reference
from fastmae.kernels import layer_norm as ln
from fastmae.kernels._common import poison_outputs
from tests.compile_harness import ARCHS, SHARED_LIMIT, KernelSpec, compile_specs
from tests.tolerance import assert_within_eager_error, atol_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# (rows, width): every ViT width with few rows (the interpreter runs one program at a time), odd widths and rows.
SHAPES = [(17, 192), (9, 384), (5, 512), (3, 768), (2, 1000), (3, 1024), (3, 1280), (7, 1), (6, 33)]


def make(m, d, x_dtype, branch_dtype=None, param_dtype=None, seed=0, lead=()):
    """x, branch (or None), weight, bias: random, with a row mean and spread like a residual stream's."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, m, d)
    x = (torch.randn(shape, generator=gen) * 2 + torch.randn(*lead, m, 1, generator=gen)).to(DEVICE, x_dtype)
    branch = None if branch_dtype is None else torch.randn(shape, generator=gen).to(DEVICE, branch_dtype)
    param_dtype = param_dtype or x_dtype
    weight = (1 + 0.3 * torch.randn(d, generator=gen)).to(DEVICE, param_dtype)
    bias = (0.3 * torch.randn(d, generator=gen)).to(DEVICE, param_dtype)
    return x, branch, weight, bias


def run(fn, x, branch, weight, bias, dy, dres, eps=1e-6, out_dtype=None, dtype=None):
    """Outputs ``(x_new or None, y)`` and gradients ``{dx, dbranch, dw, db}`` of ``fn`` on copies of the inputs
    (cast to ``dtype`` when given); ``dres`` (or None) is the gradient reaching x_new from elsewhere."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach().clone())
    leaves = {"dx": cast(x), "dw": cast(weight), "db": cast(bias)}
    if branch is not None:
        leaves["dbranch"] = cast(branch)
    for t in leaves.values():
        t.requires_grad_()
    out = fn(leaves["dx"], leaves["dw"], leaves["db"], leaves.get("dbranch"), eps, out_dtype)
    x_new, y = out if branch is not None else (None, out)
    outs, grads = [y], [dy.to(dtype or y.dtype)]
    if dres is not None:
        outs.append(x_new)
        grads.append(dres.to(dtype or x_new.dtype))
    torch.autograd.backward(outs, grads)
    return (None if x_new is None else x_new.detach(), y.detach()), {k: t.grad for k, t in leaves.items()}


def check(x, branch, weight, bias, with_dres=True, eps=1e-6, out_dtype=None, name=""):
    """The kernel (outputs NaN-poisoned) against the eager op in the inputs' dtypes and in float64."""
    gen = torch.Generator().manual_seed(x.shape[-1])
    y_dtype = out_dtype or (torch.promote_types(x.dtype, branch.dtype) if branch is not None else x.dtype)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE, y_dtype)
    dres = torch.randn(x.shape, generator=gen).to(DEVICE, x.dtype) if with_dres and branch is not None else None
    with poison_outputs():
        (x_new, y), grads = run(ln.layer_norm, x, branch, weight, bias, dy, dres, eps, out_dtype)
    (x_new_hi, y_hi), grads_hi = run(reference.layer_norm, x, branch, weight, bias, dy, dres, eps, None, torch.float64)
    (x_new_lo, y_lo), grads_lo = run(reference.layer_norm, x, branch, weight, bias, dy, dres, eps, out_dtype)
    assert y.dtype == y_lo.dtype, f"{name}: y is {y.dtype}, eager {y_lo.dtype}"
    assert_within_eager_error(y, y_hi, y_lo, y.dtype, f"{name} y", atol_for(y, y_hi))
    if branch is not None:
        assert x_new.dtype == x_new_lo.dtype
        assert_within_eager_error(x_new, x_new_hi, x_new_lo, x_new.dtype, f"{name} x_new", atol_for(x_new, x_new_hi))
    sources = {"dx": x, "dbranch": branch, "dw": weight, "db": bias}
    assert grads.keys() == grads_lo.keys()
    for key, g in grads.items():
        assert g.dtype == sources[key].dtype, f"{name} {key}: {g.dtype}, expected {sources[key].dtype}"
        assert_within_eager_error(g, grads_hi[key], grads_lo[key], g.dtype, f"{name} {key}", atol_for(g, grads_hi[key]))
    return (x_new, y), grads


# ---- against the eager op under the interpreter (and on the GPU) ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m,d", SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_matches_eager(m, d, dtype, residual):
    """y (and x_new), dx (and dbranch), dw and db within the rule, every width, dtype, with and without the add."""
    inputs = make(m, d, dtype, dtype if residual else None, seed=m + d)
    check(*inputs, name=f"M={m} D={d} {dtype}")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [384, 768])
def test_autocast_dtypes(d, out_dtype):
    """As under autocast: fp32 residual stream plus a half-precision branch into an fp32 x_new, the normalized rows
    written in the half dtype the next GEMM reads, fp32 weights; dbranch in the branch's dtype."""
    (x_new, y), grads = check(*make(5, d, torch.float32, out_dtype, torch.float32, seed=d), out_dtype=out_dtype)
    assert x_new.dtype == torch.float32 and y.dtype == out_dtype and grads["dbranch"].dtype == out_dtype
    check(*make(4, d, torch.float32, None, torch.float32, seed=d + 1), out_dtype=out_dtype)


def test_half_stream_with_fp32_branch_and_params():
    """x_new takes the promoted dtype (fp32) of a half x and an fp32 branch; dx comes back in x's dtype."""
    (x_new, _), grads = check(*make(3, 256, torch.float16, torch.float32, torch.float32, seed=4))
    assert x_new.dtype == torch.float32 and grads["dx"].dtype == torch.float16


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # eps = 0: the interpreter's numpy on padded (masked) rows
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_eps(eps):
    check(*make(3, 96, torch.float32, torch.float32, seed=7), eps=eps, name=f"eps={eps}")


def test_branch_without_residual_gradient():
    """x_new unused downstream (a model's final norm): dx is the norm's gradient alone."""
    check(*make(5, 128, torch.float32, torch.float32, seed=2), with_dres=False)


def test_many_tiles_per_backward_program(monkeypatch):
    """Fewer backward programs than row tiles: each walks several tiles and the dw/db partials of three programs
    are summed (at MAE's sizes 512 programs each walk ~12 tiles)."""
    monkeypatch.setattr(ln, "BWD_PROGRAMS", 3)
    check(*make(61, 96, torch.float32, torch.float32, seed=3), name="P=3")
    check(*make(37, 200, torch.float16, torch.float16, seed=5), name="P=3 fp16")


def test_leading_dims_and_strided_rows():
    """[B, N, D] inputs; x a column slice of a wider buffer (strided rows); results as for contiguous copies."""
    x, branch, weight, bias = make(5, 64, torch.float32, torch.float32, lead=(3,), seed=9)
    wide = torch.randn(3, 5, 80, device=DEVICE)
    wide[..., 8:72] = x
    strided = wide[..., 8:72]
    assert not strided.is_contiguous() and strided.stride(-1) == 1
    (x_new, y), grads = check(strided, branch, weight, bias, name="strided")
    (x_new_c, y_c), grads_c = check(x, branch, weight, bias, name="contiguous")
    assert x_new.shape == (3, 5, 64) and torch.equal(y, y_c) and torch.equal(x_new, x_new_c)
    assert all(torch.equal(grads[k], grads_c[k]) for k in grads)


@pytest.mark.parametrize("m,d,dtype", [(29, 768, torch.float16), (41, 192, torch.float32)])
def test_bitwise_deterministic(m, d, dtype, monkeypatch):
    monkeypatch.setattr(ln, "BWD_PROGRAMS", 4)
    x, branch, weight, bias = make(m, d, dtype, dtype, seed=1)
    dy, dres = torch.randn_like(x), torch.randn_like(x)
    a = run(ln.layer_norm, x, branch, weight, bias, dy, dres)
    b = run(ln.layer_norm, x, branch, weight, bias, dy, dres)
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0]))
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_empty_rows():
    x, branch, weight, bias = make(0, 48, torch.float32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, branch, weight, bias)]
    x_new, y = ln.layer_norm(leaves[0], leaves[2], leaves[3], leaves[1])
    (x_new.sum() + y.sum()).backward()
    assert y.shape == x_new.shape == (0, 48) and leaves[0].grad.shape == (0, 48)
    assert torch.equal(leaves[2].grad, torch.zeros(48, device=DEVICE))


def test_gradients_only_where_needed():
    """Frozen affine parameters get no gradient; y unused passes x_new's gradient straight to x and branch."""
    x, branch, weight, bias = make(3, 64, torch.float32, torch.float16, torch.float32)
    xs, bs = x.clone().requires_grad_(), branch.clone().requires_grad_()
    x_new, y = ln.layer_norm(xs, weight, bias, bs)
    g = torch.randn_like(x_new)
    x_new.backward(g)
    assert torch.equal(xs.grad, g) and torch.equal(bs.grad, g.half())
    xs.grad = None
    ln.layer_norm(xs, weight, bias).sum().backward()
    assert xs.grad is not None and weight.grad is None and bias.grad is None


def _bad(**kw):
    x, branch, weight, bias = make(2, 8, torch.float32, torch.float32)
    args = {"x": x, "weight": weight, "bias": bias, "branch": None, "eps": 1e-6, "out_dtype": None}
    return {**args, **kw}


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (_bad(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
        (_bad(x=torch.ones(2, 8, dtype=torch.int32)), TypeError, "x must be float32, float16 or bfloat16"),
        (_bad(x=torch.ones(2, 8, dtype=torch.float64)), TypeError, "x must be float32"),
        (_bad(weight=torch.ones(8, dtype=torch.float64)), TypeError, "weight must be float32"),
        (_bad(bias=None), TypeError, "bias must be a torch.Tensor"),
        (_bad(x=torch.ones(())), ValueError, "last dim D >= 1"),
        (_bad(x=torch.ones(2, 0)), ValueError, "last dim D >= 1"),
        (_bad(x=torch.ones(1, 8193)), ValueError, "exceeds the kernel's maximum 8192"),
        (_bad(weight=torch.ones(7)), ValueError, r"weight must be \[D\] = \[8\]"),
        (_bad(bias=torch.ones(1, 8)), ValueError, r"bias must be \[D\] = \[8\]"),
        (_bad(branch=torch.ones(1, 8)), ValueError, "branch must have x's shape"),
        (_bad(branch=torch.ones(2, 8, dtype=torch.int64)), TypeError, "branch must be float32"),
        (_bad(eps="1e-6"), TypeError, "eps must be a float"),
        (_bad(eps=-1.0), ValueError, "eps must be finite and >= 0"),
        (_bad(eps=float("inf")), ValueError, "eps must be finite and >= 0"),
        (_bad(out_dtype=torch.float64), TypeError, "out_dtype must be None"),
        (_bad(out_dtype="bf16"), TypeError, "out_dtype must be None"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        ln.layer_norm(**kwargs)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(ln, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ln.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8))


def registered_kernels(ops: tuple[str, ...]) -> list[list[str]]:
    """The kernel names torch.library finds in each triton_op's body (torch.compile's cache keys hash their
    sources), from a process without the interpreter, where the ops are triton_ops."""
    code = "import json, torch._library.triton as t, fastmae.kernels.layer_norm, fastmae.kernels.gelu\n"
    code += (
        f"for op in {ops!r}:\n    print(json.dumps(sorted(k.fn.__name__ for k in t.get_triton_kernels_for_op(op))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()[-len(ops) :]]


def test_compiled_build_registers_triton_ops_with_their_kernels():
    found = registered_kernels(("fastmae::layer_norm_fwd", "fastmae::layer_norm_bwd"))
    assert found == [["_fwd_kernel"], ["_bwd_dwdb_kernel", "_bwd_kernel"]]


# ---- GPU only -------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("m,d", [(256 * 50, 768), (256 * 197 + 3, 512), (64 * 65, 1280), (999, 1000)])
def test_mae_rows_cuda(m, d):
    """MAE's row counts (ViT-B encoder and decoder at batch 256, ViT-H): bf16 and the autocast mix, twice, equal."""
    check(*make(m, d, torch.bfloat16, torch.bfloat16, seed=d), name="bf16")
    inputs = make(m, d, torch.float32, torch.bfloat16, torch.float32, seed=d)
    a = check(*inputs, out_dtype=torch.bfloat16, name="autocast mix")
    b = check(*inputs, out_dtype=torch.bfloat16, name="autocast mix")
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0])) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.cuda
def test_autocast_output_dtype_cuda():
    """Under CUDA autocast y comes in the autocast dtype, x_new and the parameters' gradients in theirs."""
    x, branch, weight, bias = make(7, 256, torch.float32, torch.bfloat16, torch.float32)
    weight.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x_new, y = ln.layer_norm(x, weight, bias, branch)
        y_eager = reference.layer_norm(x, weight, bias, branch)[1]
    assert y.dtype == torch.bfloat16 and x_new.dtype == torch.float32 and y_eager.dtype == torch.float32
    y_hi = reference.layer_norm(*(t.double() for t in (x, weight, bias, branch)))[1]
    assert_within_eager_error(y, y_hi, y_eager.to(torch.bfloat16), torch.bfloat16, "y")
    y.float().sum().backward()
    assert weight.grad.dtype == torch.float32


@pytest.mark.cuda
def test_torch_compile_inductor_cuda():
    """Inductor, fullgraph: the triton_ops decompose into the kernels; results equal the uncompiled op's."""
    x, branch, weight, bias = make(50, 768, torch.float32, torch.bfloat16, torch.float32)

    def fn(x, branch):
        x_new, y = ln.layer_norm(x, weight, bias, branch, out_dtype=torch.bfloat16)
        return x_new, y

    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(x, branch)
    want = fn(x, branch)
    assert torch.equal(got[0], want[0])  # the add: elementwise, bitwise
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2**-7, atol=1e-2)  # row sums may reorder


# ---- sm_80 / sm_90 compilation of every kernel and config ----------------------------------------------------------

MOD = ln.__name__
LIMIT = min(SHARED_LIMIT.values())
# Widths that give every tile config (D_PAD 256, 512, 1024, 2048, and the largest, 8192) and a non-power of two.
COMPILE_WIDTHS = (192, 512, 768, 1000, 1280, 8192)
# (x, branch, x_new, y) dtypes: the autocast mix MAE runs (every width), plain fp16 / fp32 (smallest and widest).
FWD_DTYPES = [("fp32", "bf16", "fp32", "bf16"), ("fp16", "fp16", "fp16", "fp16"), ("fp32", "fp32", "fp32", "fp32")]


def _aligned(sig: dict) -> tuple[str, ...]:
    """Pointers and row strides: 16-divisible at ViT widths, as the launcher specializes them."""
    return tuple(k for k, t in sig.items() if t.startswith("*") or k.startswith("stride"))


def layer_norm_specs() -> list[KernelSpec]:
    specs = []
    for d in COMPILE_WIDTHS:
        d_pad, block_m, warps = ln.tiling(d)
        shape = {"D": d, "D_PAD": d_pad, "BLOCK_M": block_m}
        for xt, bt, nt, yt in FWD_DTYPES if d in (192, 1280) else FWD_DTYPES[:1]:
            for has_branch in (True, False):
                sig = {"X": f"*{xt}", "Branch": f"*{bt}", "XNew": f"*{nt}", "Y": f"*{yt}", "W": "*fp32", "B": "*fp32"}
                sig.update({"Mean": "*fp32", "Rstd": "*fp32", "M": "i32", "stride_x": "i32", "stride_branch": "i32"})
                sig.update({"stride_xnew": "i32", "stride_y": "i32", "eps": "fp32"})
                sig.update(dict.fromkeys(("D", "D_PAD", "BLOCK_M", "HAS_BRANCH"), "constexpr"))
                label = f"fwd[D={d},{xt}+{bt}->{yt},branch={has_branch},w{warps}]"
                consts = {**shape, "HAS_BRANCH": has_branch}
                specs.append(KernelSpec(MOD, "_fwd_kernel", sig, consts, warps, 1, label, _aligned(sig)))
            # backward: dy in y's dtype, dres and x_new in x_new's, dx in x's, dbranch in branch's
            sig = {"DY": f"*{yt}", "DRes": f"*{nt}", "XNew": f"*{nt}", "W": "*fp32", "Mean": "*fp32", "Rstd": "*fp32"}
            sig.update({"DX": f"*{xt}", "DBranch": f"*{bt}", "DWPart": "*fp32", "DBPart": "*fp32", "M": "i32"})
            sig.update(dict.fromkeys(("stride_dy", "stride_dres", "stride_xnew", "stride_dx", "stride_dbranch"), "i32"))
            sig.update(dict.fromkeys(("D", "D_PAD", "BLOCK_M", "HAS_DRES", "HAS_DBRANCH"), "constexpr"))
            for has_dres, has_dbranch in ((True, bt != xt), (False, False)):
                label = f"bwd[D={d},{yt}->{xt}/{bt},dres={has_dres},dbranch={has_dbranch},w{warps}]"
                consts = {**shape, "HAS_DRES": has_dres, "HAS_DBRANCH": has_dbranch}
                specs.append(KernelSpec(MOD, "_bwd_kernel", sig, consts, warps, 1, label, _aligned(sig)))
    sig = {"DWPart": "*fp32", "DBPart": "*fp32", "DW": "*fp32", "DB": "*fp32", "P": "i32"}
    sig.update(dict.fromkeys(("D", "BLOCK_P", "BLOCK_N"), "constexpr"))
    for d in (768, 1000):
        consts = {"D": d, "BLOCK_P": ln.DWDB_BLOCK_P, "BLOCK_N": ln.DWDB_BLOCK_N}
        specs.append(KernelSpec(MOD, "_bwd_dwdb_kernel", sig, consts, 4, 1, f"bwd_dwdb[D={d}]", _aligned(sig)))
    return specs


# ptxas turns its spill warning into an error: a config that spills registers fails to compile.
NO_SPILLS = "--warn-on-spills --warning-as-error"


def spilling_spec() -> KernelSpec:
    """The backward at D = 8192 on 2 warps (256 fp32 values per thread per tensor): it must spill."""
    spec = next(s for s in layer_norm_specs() if s.kernel == "_bwd_kernel")
    consts = {**spec.constexprs, "D": 8192, "D_PAD": 8192, "BLOCK_M": 1}
    return dataclasses.replace(spec, constexprs=consts, num_warps=2, label="bwd[D=8192,w2]")


def test_every_kernel_and_config_compiles_for_sm80_and_sm90_without_spills(monkeypatch):
    monkeypatch.setenv("PTXAS_OPTIONS", NO_SPILLS)  # triton's knob, read by the compile worker
    specs = layer_norm_specs()
    results = compile_specs([*specs, spilling_spec()], archs=ARCHS)
    control = [r for r in results if r["name"] == "bwd[D=8192,w2]"]
    assert control and not any(r["ok"] for r in control), "the spill check is not in effect"
    assert all("spilled" in r["error"] for r in control), control
    results = [r for r in results if r not in control]
    bad = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in results if not r["ok"]]
    bad += [f"{r['name']} sm_{r['arch']}: {r['shared']} B shared" for r in results if r["ok"] and r["shared"] > LIMIT]
    assert not bad, "kernels that spill or fail to compile:\n" + "\n".join(bad)
    assert len(results) == len(ARCHS) * len(specs)
