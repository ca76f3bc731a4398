"""The decoder-assembly kernel against fastmae.reference.decoder_assembly: output, dx, dmask_token, dpos."""

import pytest
import torch
import triton

from fastmae import reference
from fastmae.kernels import check_errors
from fastmae.kernels import decoder_assembly as da
from fastmae.kernels._common import poison_outputs
from fastmae.kernels.decoder_assembly import decoder_assembly, tiling
from tests.compile_harness import KernelSpec, assert_compiles
from tests.tolerance import assert_within_eager_error, atol_for

MOD = "fastmae.kernels.decoder_assembly"


def make(n, num, keep, dd, x_dtype, param_dtype=None, device="cpu", pos_grad=False):
    """Random x [N, 1+K, Dd], ids_restore [N, L] (a random permutation), mask_token, pos_embed."""
    param_dtype = param_dtype or x_dtype
    ids = torch.rand(n, num, device=device).argsort(dim=1)  # [N, L]: a random inverse shuffle
    x = torch.randn(n, 1 + keep, dd, device=device).to(x_dtype)
    tok = torch.randn(1, 1, dd, device=device).to(param_dtype)
    pos = torch.randn(1, 1 + num, dd, device=device).to(param_dtype).requires_grad_(pos_grad)
    return x, ids, tok, pos


def grads_of(fn, x, ids, tok, pos, gout, dtype=None):
    """Output and (dx, dtok, dpos-or-None) of ``fn`` on copies of the inputs cast to ``dtype`` (None: as they are)."""
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach().clone())
    xs, toks, poss = cast(x).requires_grad_(), cast(tok).requires_grad_(), cast(pos).requires_grad_(pos.requires_grad)
    out = fn(xs, ids, toks, poss)
    out.backward(gout.to(out.dtype))
    return out.detach(), (xs.grad, toks.grad, poss.grad)


def check(x, ids, tok, pos, name="", noncontig_grad=False):
    with poison_outputs():
        probe = decoder_assembly(x, ids, tok, pos)
    gout = torch.randn(probe.shape, device=x.device).to(probe.dtype)
    if noncontig_grad:
        gout = gout.transpose(1, 2).contiguous().transpose(1, 2)
        assert not gout.is_contiguous()
    with poison_outputs():
        out, grads = grads_of(decoder_assembly, x, ids, tok, pos, gout)
    hi, hi_grads = grads_of(reference.decoder_assembly, x, ids, tok, pos, gout.double(), torch.float64)
    lo, lo_grads = grads_of(reference.decoder_assembly, x, ids, tok, pos, gout)
    assert out.dtype == lo.dtype, f"{name}: output dtype {out.dtype}, reference {lo.dtype}"
    assert_within_eager_error(out, hi, lo, x.dtype, f"{name} out", atol_for(out, hi))
    for gname, g, g_hi, g_lo, src in zip(("dx", "dmask_token", "dpos"), grads, hi_grads, lo_grads, (x, tok, pos)):
        if g_lo is None:
            assert g is None, f"{name} {gname}: a gradient for an input that does not require one"
            continue
        assert g.dtype == src.dtype
        assert_within_eager_error(g, g_hi, g_lo, src.dtype, f"{name} {gname}", atol_for(g, g_hi))
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num,keep,dd", [(37, 9, 48), (16, 4, 64), (50, 12, 80), (1, 0, 8)])
def test_matches_eager(num, keep, dd, dtype):
    torch.manual_seed(num + dd)
    check(*make(3, num, keep, dd, dtype), name=f"L{num} K{keep} Dd{dd}")


@pytest.mark.parametrize("keep", [0, 1, 20, 21])
def test_extreme_keep_counts(keep):
    """K = 0 (all mask tokens), K = 1, all but one, K = L (no mask token: its gradient is zero)."""
    torch.manual_seed(keep)
    out, grads = check(*make(2, 21, keep, 40, torch.float32), name=f"K{keep}")
    if keep == 21:
        assert torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_pos_embed_gradient_when_it_requires_one():
    torch.manual_seed(1)
    check(*make(3, 33, 8, 64, torch.float32, pos_grad=True), name="dpos fp32")
    check(*make(2, 33, 8, 64, torch.float16, pos_grad=True), name="dpos fp16")


def test_bf16_x_with_fp32_parameters_as_under_autocast():
    torch.manual_seed(2)
    out, _ = check(*make(2, 19, 4, 64, torch.bfloat16, torch.float32), name="mixed")
    assert out.dtype == torch.float32


def test_strided_inputs_and_gradient():
    torch.manual_seed(3)
    x, ids, tok, pos = make(2, 30, 7, 48, torch.float32)
    x = torch.randn(2, 48, 8).transpose(1, 2)  # [N, 1+K, Dd], column-major
    ids = torch.stack([ids, ids], dim=2)[..., 0]  # [N, L] with stride 2
    pos = torch.randn(1, 48, 31).transpose(1, 2)  # [1, 1+L, Dd]
    assert not (x.is_contiguous() or ids.is_contiguous() or pos.is_contiguous())
    check(x, ids, tok, pos, name="strided", noncontig_grad=True)


def test_deterministic():
    torch.manual_seed(4)
    x, ids, tok, pos = make(4, 45, 11, 64, torch.float16, pos_grad=True)
    gout = torch.randn(4, 46, 64).half()
    with poison_outputs():
        a = grads_of(decoder_assembly, x, ids, tok, pos, gout)
        b = grads_of(decoder_assembly, x, ids, tok, pos, gout)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


def test_mask_token_gradient_of_a_large_batch_sums_in_two_stages(monkeypatch):
    """N > SUM_CHUNK at a narrow Dd: the batch sum of dmask_token runs over chunks of SUM_CHUNK samples (the last one
    short), then over the chunk sums; held to the rule against the reference, and bitwise repeatable."""
    torch.manual_seed(7)
    n, dd = 2 * da.SUM_CHUNK + 5, 24
    spans = []
    sum_rows = da._sum_rows
    monkeypatch.setattr(da, "_sum_rows", lambda src, out, span: spans.append(span) or sum_rows(src, out, span))
    x, ids, tok, pos = make(n, 6, 2, dd, torch.float16)
    check(x, ids, tok, pos, name="two stages")
    assert spans[-2:] == [da.SUM_CHUNK, triton.cdiv(triton.cdiv(n, da.SUM_CHUNK), da.SUM_BLOCK_N) * da.SUM_BLOCK_N]
    gout = torch.randn(n, 7, dd).half()
    a = grads_of(decoder_assembly, x, ids, tok, pos, gout)
    b = grads_of(decoder_assembly, x, ids, tok, pos, gout)
    assert torch.equal(a[1][1], b[1][1])


def test_only_mask_token_requires_grad():
    torch.manual_seed(5)
    x, ids, tok, pos = make(2, 9, 2, 16, torch.float32)
    tok.requires_grad_()
    decoder_assembly(x, ids, tok, pos).sum().backward()
    expect = torch.full((1, 1, 16), float(2 * (9 - 2)))
    assert torch.equal(tok.grad, expect)


def bad_cases():
    x, ids, tok, pos = make(2, 6, 2, 8, torch.float32)
    return [
        ((x.double(), ids, tok, pos), TypeError, "x must be float32"),
        ((x, ids.int(), tok, pos), TypeError, "ids_restore must be an int64"),
        ((x, ids.tolist(), tok, pos), TypeError, "ids_restore must be an int64"),
        ((x, ids, tok.half().long(), pos), TypeError, "mask_token must be float32"),
        ((x[0], ids, tok, pos), ValueError, r"x must be \[N, 1\+K, Dd\]"),
        ((x[:, :0], ids, tok, pos), ValueError, r"x must be \[N, 1\+K, Dd\]"),
        ((x, ids[:1], tok, pos), ValueError, r"ids_restore must be \[N, L\] = \[2, L\]"),
        ((torch.randn(2, 8, 8), ids, tok, pos), ValueError, "x holds 7 kept tokens but ids_restore only 6"),
        ((x, ids, tok[0], pos), ValueError, r"mask_token must be \[1, 1, 8\]"),
        ((x, ids, tok, pos[:, 1:]), ValueError, r"pos_embed must be \[1, 1\+L, Dd\] = \[1, 7, 8\]"),
        ((x, ids.clamp(max=4), tok, pos), ValueError, "permutation of 0..5"),
        ((x, ids + 1, tok, pos), ValueError, "permutation of 0..5"),
    ]


@pytest.mark.parametrize("args,exc,match", bad_cases())
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        decoder_assembly(*args)


def test_bad_ids_on_the_device_path_give_nan_rows_and_a_flag(monkeypatch):
    """Without the host check (as on CUDA): entries outside [0, L) address nothing, their rows come out NaN, the
    others exact, and the kernel's flag makes check_errors() raise once naming the op; FASTMAE_CHECK=1 raises at
    the call."""
    monkeypatch.setattr(da, "host_checks", lambda *tensors: False)
    check_errors()
    x, ids, tok, pos = make(2, 6, 2, 8, torch.float32)
    good, ids_ok = reference.decoder_assembly(x, ids, tok, pos), ids.clone()
    ids[0, 3], ids[1, 0] = 99, -1
    with poison_outputs():
        out = decoder_assembly(x, ids, tok, pos)
    bad = torch.zeros(2, 7, dtype=torch.bool)
    bad[0, 4] = bad[1, 1] = True
    assert torch.isnan(out[bad]).all() and torch.equal(out[~bad], good[~bad])
    with pytest.raises(ValueError, match=r"decoder_assembly on cpu: ids_restore holds an index outside \[0, L\)"):
        check_errors()
    check_errors()  # reported once
    monkeypatch.setenv("FASTMAE_CHECK", "1")
    with pytest.raises(ValueError, match="decoder_assembly on cpu"):
        decoder_assembly(x, ids, tok, pos)
    assert torch.equal(decoder_assembly(x, ids_ok, tok, pos), good)  # valid: no error


def test_torch_compile_captures_one_graph():
    """The registered ops (opaque custom ops under the interpreter): torch.compile(fullgraph=True) traces the op,
    its checks and error flag included, in one graph; output and gradients equal the uncompiled op's."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    torch.manual_seed(6)
    x, ids, tok, pos = make(2, 9, 3, 16, torch.float32, pos_grad=True)
    gout = torch.randn(2, 10, 16)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    got = grads_of(torch.compile(decoder_assembly, backend=counter, fullgraph=True), x, ids, tok, pos, gout)
    want = grads_of(decoder_assembly, x, ids, tok, pos, gout)
    assert counter.frame_count == 1
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


def compile_specs():
    """Every tile config for MAE's decoder widths (64 .. 512), in fp32/fp16/bf16 and autocast's mixed form."""
    fwd_ints = ["K", "L", "Dd", "s_xn", "s_xt", "s_xd", "s_rn", "s_rl", "s_kd", "s_pt", "s_pd"]
    bwd_ints = ["K", "L", "Dd", "s_gn", "s_gt", "s_gd", "s_rn", "s_rl"]
    configs = sorted({tiling(dd) for dd in (64, 128, 256, 512)})
    specs = []
    for block_t, block_d, warps in configs:
        cx = {"BLOCK_T": block_t, "BLOCK_D": block_d}
        for x_t, p_t in [("*fp32", "*fp32"), ("*bf16", "*fp32"), ("*fp16", "*fp16"), ("*bf16", "*bf16")]:
            out_t = p_t
            sig = {"X": x_t, "IDS": "*i64", "TOK": p_t, "POS": p_t, "OUT": out_t, "ERR": "*i32"}
            sig.update(dict.fromkeys(fwd_ints, "i32"))
            specs.append(KernelSpec(MOD, "_fwd_kernel", {**sig, **dict.fromkeys(cx, "constexpr")}, cx, warps))
            sig = {"G": out_t, "IDS": "*i64", "DX": x_t, "PART": "*fp32", **dict.fromkeys(bwd_ints, "i32")}
            specs.append(KernelSpec(MOD, "_bwd_kernel", {**sig, **dict.fromkeys(cx, "constexpr")}, cx, warps))
    for out_t in ("*fp32", "*fp16", "*bf16"):
        sig = {"SRC": "*fp32", "OUT": out_t, "N": "i32", "M": "i32", "s_n": "i32", "span": "i32"}
        cx = {"BLOCK_N": 8, "BLOCK_M": 256}
        specs.append(KernelSpec(MOD, "_bwd_sum_kernel", {**sig, **dict.fromkeys(cx, "constexpr")}, cx, 4))
    sig = {"SRC": "*bf16", "OUT": "*bf16", "N": "i32", "M": "i32", "s_n": "i32", "span": "i32"}  # a bf16 dpos
    specs.append(KernelSpec(MOD, "_bwd_sum_kernel", {**sig, **dict.fromkeys(cx, "constexpr")}, cx, 4))
    return specs


def test_tile_configs():
    assert tiling(64) == (32, 64, 4) and tiling(512) == (32, 128, 4) and tiling(48) == (32, 64, 4)


def test_compiles_for_sm80_sm90():
    assert_compiles(compile_specs())


VIT_SHAPES = {"vit_b": (196, 49), "vit_l": (196, 49), "vit_h": (256, 64)}


@pytest.mark.cuda
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", list(VIT_SHAPES))
def test_cuda_vit_shapes_bf16_twice(model, param_dtype):
    num, keep = VIT_SHAPES[model]
    torch.manual_seed(0)
    inputs = make(8, num, keep, 512, torch.bfloat16, param_dtype, "cuda", pos_grad=True)
    a = check(*inputs, name=model)
    b = check(*inputs, name=model)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


@pytest.mark.cuda
def test_cuda_out_of_range_ids_give_nan_rows_not_faults():
    check_errors()
    x, ids, tok, pos = make(2, 6, 2, 8, torch.float32, device="cuda")
    ids[0, 3] = 99
    out = decoder_assembly(x, ids, tok, pos)
    torch.cuda.synchronize()
    assert torch.isnan(out[0, 4]).all() and torch.isfinite(out[0, :4]).all() and torch.isfinite(out[1]).all()
    with pytest.raises(ValueError, match="decoder_assembly on cuda"):
        check_errors()
