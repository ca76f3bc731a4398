"""The fused patchify + visible-patch gather + patch-embedding kernel against the eager op, forward and backward."""

import inspect
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastmae
from fastmae import ops, reference
from fastmae.kernels import check_errors
from fastmae.kernels import patch_embed as pe
from fastmae.kernels._common import poison_outputs
from tests.compile_harness import KernelSpec, assert_compiles
from tests.tolerance import assert_within_eager_error

GRAD_NAMES = ("imgs", "weight", "bias", "cls_token")


def make_inputs(n, c, h, w, p, d, k, dtype, *, dup=False, pos_dtype=None, seed=0, device="cpu"):
    """Fresh random inputs of the op (plus an upstream gradient); ids_keep is a per-sample random choice."""
    g = torch.Generator().manual_seed(seed)
    num_patches = (h // p) * (w // p)
    if dup:
        ids = torch.randint(0, num_patches, (n, k), generator=g)
    else:
        ids = torch.stack([torch.randperm(num_patches, generator=g)[:k] for _ in range(n)])  # [N, K]
    pos_dtype = pos_dtype or dtype
    inputs = dict(
        imgs=torch.randn(n, c, h, w, generator=g).to(dtype),
        ids_keep=ids,
        weight=(torch.randn(d, c, p, p, generator=g) * (c * p * p) ** -0.5).to(dtype),
        bias=torch.randn(d, generator=g).to(dtype),
        pos_embed=torch.randn(1, 1 + num_patches, d, generator=g).to(pos_dtype),
        cls_token=torch.randn(1, 1, d, generator=g).to(dtype),
    )
    dout = torch.randn(n, 1 + k, d, generator=g)
    return {key: v.to(device) for key, v in inputs.items()}, dout.to(device)


def run(fn, inputs, dout, cast=None, grads=GRAD_NAMES):
    """fn's output and the gradients of ``grads`` for upstream gradient dout (inputs optionally cast first)."""
    args = {}
    for key, v in inputs.items():
        v = v.detach()
        if cast is not None and v.is_floating_point():
            v = v.to(cast)
        args[key] = v.requires_grad_(key in grads)
    out = fn(**args)
    got = torch.autograd.grad(out, [args[key] for key in grads], dout.to(out.dtype))
    return out, dict(zip(grads, got))


def check_against_eager(inputs, dout, dtype, grads=GRAD_NAMES):
    with poison_outputs():
        out, got = run(pe.patch_embed, inputs, dout, grads=grads)
    ref_hi, want_hi = run(reference.patch_embed, inputs, dout, cast=torch.float64, grads=grads)
    ref_lo, want_lo = run(reference.patch_embed, inputs, dout, grads=grads)
    assert out.dtype == ref_lo.dtype
    assert_within_eager_error(out, ref_hi, ref_lo, dtype, "out")
    for key in grads:
        assert got[key].dtype == inputs[key].dtype, key
        assert_within_eager_error(got[key], want_hi[key], want_lo[key], dtype, f"d{key}")
    return out, got


@pytest.fixture
def tiny_tiles(monkeypatch):
    """16-wide tiles and at most one row tile per dW split, so small shapes span many tiles and splits."""
    monkeypatch.setitem(pe.CONFIGS, "small", (16, 16, 16, 1, 1))
    monkeypatch.setattr(pe, "DW_MIN_TILES_PER_SPLIT", 1)


CASES = {
    # name: (N, C, H, W, p, D, K, dtype, dup)
    "fp32-rect-grid": (2, 3, 32, 24, 8, 40, 5, torch.float32, False),
    "fp16-rect-grid": (2, 3, 32, 24, 8, 40, 5, torch.float16, False),
    "fp32-p14-C1-N1-K1": (1, 1, 28, 28, 14, 24, 1, torch.float32, False),
    "fp16-p14-C3-K=L": (2, 3, 28, 42, 14, 24, 6, torch.float16, False),
    "fp32-p16-K=L": (3, 3, 32, 32, 16, 40, 4, torch.float32, False),
    "fp32-duplicate-ids": (2, 1, 16, 16, 8, 24, 6, torch.float32, True),
    "fp32-K0-cls-only": (2, 3, 16, 16, 8, 24, 0, torch.float32, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_forward_and_gradients(case):
    n, c, h, w, p, d, k, dtype, dup = CASES[case]
    inputs, dout = make_inputs(n, c, h, w, p, d, k, dtype, dup=dup)
    check_against_eager(inputs, dout, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_tiles_and_splits_deterministic(tiny_tiles, monkeypatch, dtype):
    """Partial tiles on every axis, a 3-way split dW reduction, and bitwise-identical repeats."""
    splits = []
    real_split = pe._dw_split
    monkeypatch.setattr(pe, "_dw_split", lambda *a: splits.append(real_split(*a)) or splits[-1])
    inputs, dout = make_inputs(4, 3, 32, 32, 8, 40, 12, dtype, seed=1)
    out, got = check_against_eager(inputs, dout, dtype)
    assert splits[0] == (3, 16), splits  # 48 kept rows in 3 splits of one 16-row tile each
    with poison_outputs():
        out_b, got_b = run(pe.patch_embed, inputs, dout)
    assert torch.equal(out, out_b)
    for key in GRAD_NAMES:
        assert torch.equal(got[key], got_b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_partials_share_dbias_and_dcls_across_r_tiles(tiny_tiles, monkeypatch, dtype):
    """Splits of several row tiles and several r-tiles: each row tile's dbias and each cls row's dcls is summed by
    one r-tile program (round robin) and the reduce kernel adds the partials; against eager, bitwise repeatable."""
    monkeypatch.setattr(pe, "DW_TARGET_PROGRAMS", 2 * 3 * 4)  # 3 D tiles x 4 r-tiles (C=1, P=8): 2 splits
    splits = []
    real_split = pe._dw_split
    monkeypatch.setattr(pe, "_dw_split", lambda *a: splits.append(real_split(*a)) or splits[-1])
    inputs, dout = make_inputs(7, 1, 32, 40, 8, 40, 14, dtype, seed=13)
    out, got = check_against_eager(inputs, dout, dtype)
    assert splits[0] == (2, 64), splits  # 98 kept rows: 4 row tiles, then 3 (+ a partial one)
    with poison_outputs():
        _, again = run(pe.patch_embed, inputs, dout)
    for key in GRAD_NAMES:
        assert torch.equal(got[key], again[key]), key


@pytest.mark.parametrize(
    "p, c, dtype, ct, block, copy",
    [
        (16, 3, torch.float16, torch.float16, 64, False),  # already [D, R] in the compute dtype: the weight itself
        (16, 3, torch.float32, torch.float16, 64, True),  # autocast: cast once
        (14, 3, torch.float16, torch.float16, 64, True),  # R = 588 padded to 640
        (14, 1, torch.float32, torch.float32, 32, True),  # R = 196 padded to 224
    ],
)
def test_weight_matrix_is_the_weight_cast_and_padded(p, c, dtype, ct, block, copy):
    weight = torch.randn(24, c, p, p).to(dtype)
    for w in (weight, weight.contiguous(memory_format=torch.channels_last)):
        with poison_outputs():
            wm = pe._weight_matrix(w, ct, block)
        r = c * p * p
        want = torch.nn.functional.pad(weight.reshape(24, r).to(ct), (0, -r % block))  # [D, RP]
        assert wm.dtype == ct and wm.is_contiguous() and torch.equal(wm, want)
        copied = wm.data_ptr() != w.data_ptr()
        assert copied == (copy or not w.is_contiguous())


def test_offset_alignment_divides_every_patch_offset():
    """The alignment the dW kernel asserts of the image offsets the forward stores (tl.multiple_of)."""
    imgs = torch.empty(2, 3, 224, 224)
    cases = {
        "p16": (imgs, 16, 16),
        "p14": (imgs, 14, 2),
        "p14-channels_last": (imgs.contiguous(memory_format=torch.channels_last), 14, 2),
        "p16-strided": (torch.empty(2, 5, 224, 448)[:, 1:4, :, ::2], 16, 16),
        "p7": (torch.empty(2, 1, 21, 21), 7, 1),
    }
    for name, (x, p, want) in cases.items():
        got = pe._offset_align(x, p)
        assert got == want, name
        s_n, _, s_h, s_w = x.stride()
        for n in range(x.shape[0]):
            for gy in range(x.shape[2] // p):
                for gx in range(x.shape[3] // p):
                    assert (n * s_n + gy * p * s_h + gx * p * s_w) % got == 0, name


def test_gradients_only_for_what_requires_grad():
    inputs, dout = make_inputs(2, 3, 16, 16, 8, 24, 3, torch.float32, seed=2)
    check_against_eager(inputs, dout, torch.float32, grads=("weight",))
    check_against_eager(inputs, dout, torch.float32, grads=("imgs",))
    check_against_eager(inputs, dout, torch.float32, grads=("bias", "cls_token"))


def test_strided_and_channels_last_inputs():
    inputs, dout = make_inputs(2, 3, 32, 24, 8, 24, 5, torch.float32, seed=4)
    big = torch.randn(2, 5, 40, 50)
    strided = big[:, 1:4, 3:35, 1:49:2]  # [2, 3, 32, 24], no dimension contiguous but C's
    strided.copy_(inputs["imgs"])
    ids_t = inputs["ids_keep"].t().contiguous().t()  # [N, K] column-major
    variants = {
        "channels_last": dict(imgs=inputs["imgs"].contiguous(memory_format=torch.channels_last)),
        "strided": dict(imgs=strided),
        "ids_and_weight": dict(ids_keep=ids_t, weight=inputs["weight"].contiguous(memory_format=torch.channels_last)),
    }
    _, base = check_against_eager(inputs, dout, torch.float32)
    for name, change in variants.items():
        case = {**inputs, **change}
        assert not all(v.is_contiguous() for v in change.values()), name
        _, got = check_against_eager(case, dout.transpose(0, 1).contiguous().transpose(0, 1), torch.float32)
        for key in GRAD_NAMES:
            torch.testing.assert_close(got[key], base[key], rtol=1e-5, atol=1e-6, msg=f"{name} d{key}")
    check_against_eager(inputs, torch.randn(1, 1, 24).expand_as(dout), torch.float32)  # stride-0 upstream grad
    inputs_cl = {**inputs, "imgs": variants["channels_last"]["imgs"]}
    with poison_outputs():
        _, got = run(pe.patch_embed, inputs_cl, dout)
    assert got["imgs"].is_contiguous(memory_format=torch.channels_last)


def test_half_params_with_fp32_positions_promote_like_eager():
    inputs, dout = make_inputs(2, 3, 16, 24, 8, 24, 4, torch.float16, pos_dtype=torch.float32, seed=5)
    inputs["cls_token"] = inputs["cls_token"].float()
    out, _ = check_against_eager(inputs, dout, torch.float16)
    assert out.dtype == torch.float32


def test_autocast_follows_the_eager_op():
    """Under autocast the GEMM runs in the autocast dtype and the output takes the eager op's dtype."""
    inputs, dout = make_inputs(2, 3, 16, 16, 8, 24, 3, torch.float32, seed=6)
    with torch.autocast("cpu", dtype=torch.float16):
        with poison_outputs():
            out, got = run(pe.patch_embed, inputs, dout)
        ref_lo, want_lo = run(reference.patch_embed, inputs, dout)
    ref_hi, want_hi = run(reference.patch_embed, inputs, dout, cast=torch.float64)
    assert out.dtype == ref_lo.dtype == torch.float32
    assert_within_eager_error(out, ref_hi, ref_lo, torch.float16, "out")
    plain = pe.patch_embed(**inputs)
    assert (out - plain).abs().max() > 0, "the GEMM did not run in float16 under autocast"
    for key in GRAD_NAMES:
        assert got[key].dtype == torch.float32
        assert_within_eager_error(got[key], want_hi[key], want_lo[key], torch.float16, f"d{key}")


def test_pos_embed_gradient_is_refused_but_no_grad_works():
    inputs, _ = make_inputs(1, 3, 16, 16, 8, 24, 2, torch.float32, seed=7)
    pos = inputs["pos_embed"].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="pos_embed requires grad"):
        pe.patch_embed(**{**inputs, "pos_embed": pos})
    with torch.no_grad():
        out = pe.patch_embed(**{**inputs, "pos_embed": pos})
    torch.testing.assert_close(out, reference.patch_embed(**inputs))


def test_bad_ids_on_the_device_path_give_nan_rows_and_a_flag(monkeypatch):
    """Without the host check (as on CUDA): kept indices outside [0, L) read nothing out of bounds, their rows come
    out NaN and the others exact, gradients stay finite (the bad rows add nothing to dW), and check_errors() raises
    once naming the op."""
    monkeypatch.setattr(pe, "host_checks", lambda *tensors: False)
    check_errors()
    inputs, dout = make_inputs(2, 3, 16, 16, 8, 24, 3, torch.float32, seed=9)
    good = pe.patch_embed(**inputs)
    ids = inputs["ids_keep"].clone()
    ids[0, 1], ids[1, 2] = 4, -1
    with poison_outputs():
        out, got = run(pe.patch_embed, {**inputs, "ids_keep": ids}, dout)
    bad = torch.zeros(2, 4, dtype=torch.bool)
    bad[0, 2] = bad[1, 3] = True
    assert torch.isnan(out[bad]).all() and torch.equal(out[~bad], good[~bad])
    assert all(torch.isfinite(g).all() for g in got.values())
    with pytest.raises(ValueError, match=r"patch_embed on cpu: ids_keep holds a patch index outside \[0, L\)$"):
        check_errors()
    check_errors()  # reported once


def test_torch_compile_captures_one_graph():
    """The registered ops (opaque custom ops under the interpreter): torch.compile(fullgraph=True) traces the op,
    its checks and error flag included, in one graph; output and gradients equal the uncompiled op's."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    inputs, dout = make_inputs(2, 3, 16, 16, 8, 24, 3, torch.float32, seed=12)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    out, got = run(torch.compile(pe.patch_embed, backend=counter, fullgraph=True), inputs, dout)
    ref, want = run(pe.patch_embed, inputs, dout)
    assert counter.frame_count == 1
    assert torch.equal(out, ref) and all(torch.equal(got[k], want[k]) for k in GRAD_NAMES)


def _bad_inputs():
    inputs, _ = make_inputs(2, 3, 16, 16, 8, 24, 3, torch.float32, seed=8)
    cases = {
        "imgs not a tensor": ({"imgs": inputs["imgs"].tolist()}, TypeError, "imgs must be a torch.Tensor"),
        "imgs int": ({"imgs": inputs["imgs"].long()}, TypeError, "imgs must be float32"),
        "imgs 3-D": ({"imgs": inputs["imgs"][0]}, ValueError, "imgs must be 4-D"),
        "ids float": ({"ids_keep": inputs["ids_keep"].float()}, TypeError, "ids_keep must be int64"),
        "ids int32": ({"ids_keep": inputs["ids_keep"].int()}, TypeError, "ids_keep must be int64"),
        "ids 1-D": ({"ids_keep": inputs["ids_keep"][0]}, ValueError, "ids_keep must be"),
        "ids batch": ({"ids_keep": inputs["ids_keep"][:1]}, ValueError, "ids_keep must be"),
        "ids too big": ({"ids_keep": inputs["ids_keep"].clone().fill_(4)}, ValueError, r"\[0, L=4\)"),
        "ids negative": ({"ids_keep": inputs["ids_keep"] - 1}, ValueError, r"\[0, L=4\)"),
        "weight not square": ({"weight": inputs["weight"][..., :4]}, ValueError, "weight must be"),
        "weight channels": ({"weight": inputs["weight"][:, :2]}, ValueError, "input channels"),
        "image size": ({"imgs": inputs["imgs"][..., :12]}, ValueError, "multiples of the patch size"),
        "bias shape": ({"bias": inputs["bias"][:5]}, ValueError, "bias must be"),
        "pos shape": ({"pos_embed": inputs["pos_embed"][:, 1:]}, ValueError, "pos_embed must be"),
        "cls shape": ({"cls_token": inputs["cls_token"][0]}, ValueError, "cls_token must be"),
        "weight dtype": ({"weight": inputs["weight"].half()}, TypeError, "share one dtype"),
        "bias dtype": ({"bias": inputs["bias"].double()}, TypeError, "bias must be float32"),
        "device": ({"ids_keep": inputs["ids_keep"].to("meta")}, ValueError, "one device"),
    }
    return inputs, cases


BAD_INPUTS, BAD_CASES = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_raise_clear_errors(case):
    change, exc, match = BAD_CASES[case]
    with pytest.raises(exc, match=match):
        pe.patch_embed(**{**BAD_INPUTS, **change})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_mae_triton_matches_eager(monkeypatch, device):
    """MAE(impl="triton") with only this kernel enabled, against the eager model with the same weights and noise."""
    calls = []

    def kernel(*args):
        calls.append(1)
        return pe.patch_embed(*args)

    monkeypatch.setattr(ops, "triton_kernel", lambda op: kernel if op == "patch_embed" else None)
    torch.manual_seed(0)
    model = fastmae.mae_vit_nano_patch8(impl="triton").to(device)
    imgs, noise = torch.randn(2, 3, 64, 64, device=device), torch.rand(2, 64, device=device)
    results = {}
    for name, impl, dtype in (("triton", "triton", torch.float32), ("lo", "eager", torch.float32)) + (
        ("hi", "eager", torch.float64),
    ):
        model.impl = impl
        model.to(dtype).zero_grad(set_to_none=True)
        loss, _, mask = model(imgs.to(dtype), noise=noise)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results[name] = (loss.detach(), mask, grads)
    assert len(calls) == 1
    (loss, mask, grads), (loss_lo, mask_lo, grads_lo), (loss_hi, _, grads_hi) = (
        results["triton"],
        results["lo"],
        results["hi"],
    )
    assert torch.equal(mask, mask_lo)
    assert_within_eager_error(loss, loss_hi, loss_lo, torch.float32, "loss")
    assert grads.keys() == grads_lo.keys() and "patch_embed.proj.weight" in grads
    for key in grads:
        assert_within_eager_error(grads[key], grads_hi[key], grads_lo[key], torch.float32, key)


def _signature(kernel: str, pointers: dict) -> dict:
    """The harness signature of ``kernel``: ``pointers`` gives the pointer types, constexprs as such, ints i32."""
    fn = getattr(pe, kernel)
    while not inspect.isfunction(fn):
        fn = fn.fn
    sig = {}
    for name, param in inspect.signature(fn).parameters.items():
        if "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name, "i32")
    return sig


def _spec(kernel: str, pointers: dict, constexprs: dict, config: str | tuple | None, label: str) -> KernelSpec:
    """``config``: a name in pe.CONFIGS, a config tuple, or None (4 warps, 3 stages)."""
    warps, stages = (pe.CONFIGS.get(config, config) if config else (0, 0, 0, 4, 3))[3:]
    return KernelSpec(
        "fastmae.kernels.patch_embed",
        kernel,
        _signature(kernel, pointers),
        constexprs,
        num_warps=warps,
        num_stages=stages,
        label=f"{kernel}[{label}]",
    )


def _specs():
    """Every kernel at every tile config it runs with: fp16 and bf16, the autocast forms (fp32 images and
    gradients, bf16 GEMM, the weight matrix cast to bf16) and plain fp32 with TF32."""
    specs = []
    fwd_variants = [  # (config, image dtype, compute dtype, compute dtype code, patch size)
        ("small", "fp16", "fp16", 1, 8),
        ("small", "bf16", "bf16", 2, 14),
        ("large16", "fp16", "fp16", 1, 16),
        ("large16", "bf16", "bf16", 2, 16),
        ("large16_short", "bf16", "bf16", 2, 14),
        ("large16", "fp32", "bf16", 2, 16),
        ("large16_short", "fp32", "bf16", 2, 14),
        ("large32", "fp32", "fp32", 0, 14),
        (pe._SHORT_CONFIGS[32], "bf16", "bf16", 2, 14),  # the P = 14 alternative ($FASTMAE_PATCH_EMBED_SHORT_K=32)
    ]
    for cfg, img, ct_ty, ct, p in fwd_variants:
        bm, bn, bk = pe.CONFIGS.get(cfg, cfg)[:3]
        t, w = "*" + img, "*" + ct_ty
        ptrs = {"IMG": t, "IDS": "*i64", "W": w, "B": t, "POS": t, "CLS": t, "OUT": t, "ROWS": "*i64", "ERR": "*i32"}
        consts = dict(P=p, GW=224 // p, ALIGN=2 if p == 14 else 16, CT=ct, ALLOW_TF32=True, WRITE_ROWS=True)
        consts.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        specs.append(_spec("_fwd_kernel", ptrs, consts, cfg, f"{cfg},{img},CT={ct},P={p}"))
    bwd_variants = [  # (config, storage dtype of images and gradients, compute dtype, its code, patch size)
        ("small", "fp16", "fp16", 1, 8),
        ("small", "bf16", "bf16", 2, 14),
        ("large16", "fp16", "fp16", 1, 16),
        ("large16", "bf16", "bf16", 2, 14),
        ("large32", "fp32", "bf16", 2, 16),
        ("large32", "fp32", "fp32", 0, 14),
    ]
    for cfg, ty, ct_ty, ct, p in bwd_variants:
        b_rows, b_cols, b_red = pe.CONFIGS[cfg][:3]
        t = "*" + ty
        dw = {"IMG": t, "ROWS": "*i64", "G": t, "WS": "*fp32"}
        consts = dict(P=p, ALIGN=2 if p == 14 else 16, CT=ct, ALLOW_TF32=True)
        consts.update(BLOCK_D=b_rows, BLOCK_R=b_cols, BLOCK_M=b_red)
        specs.append(_spec("_bwd_dw_kernel", dw, consts, cfg, f"{cfg},{ty},CT={ct},P={p}"))
        dimg = {"G": t, "W": "*" + ct_ty, "START": "*i64", "CNT": "*i64", "PERM": "*i64", "DIMG": t}
        consts = dict(P=p, CT=ct, ALLOW_TF32=True, BLOCK_M=b_rows, BLOCK_R=b_cols, BLOCK_D=b_red)
        specs.append(_spec("_bwd_dimg_kernel", dimg, consts, cfg, f"{cfg},{ty},CT={ct},P={p}"))
    for ty in ("fp16", "bf16", "fp32"):
        t = "*" + ty
        ptrs = {"WS": "*fp32", "DW": t, "DB": t, "DCLS": t}
        consts = {"BLOCK": pe.REDUCE_BLOCK, "NUM_R_P2": 8}
        specs.append(_spec("_bwd_reduce_kernel", ptrs, consts, None, ty))
    for src, dst, p in (("fp32", "bf16", 14), ("fp32", "fp16", 16), ("bf16", "bf16", 14)):
        consts = dict(P=p, BLOCK_D=pe.WEIGHT_BLOCK, BLOCK_R=pe.WEIGHT_BLOCK)
        ptrs = {"W": "*" + src, "WM": "*" + dst}
        specs.append(_spec("_fwd_weight_kernel", ptrs, consts, None, f"{src}->{dst},P={p}"))
    return specs


@pytest.mark.parametrize(
    "value, want",
    [(None, 264), ("", 264), (" 132 ", 132), ("100", "got '100'"), ("x", "got 'x'")],
)
def test_gpu_choice_from_the_environment(monkeypatch, value, want):
    """A choice a GPU report compares (BENCHMARKS.md) comes from its variable; a bad value names the variable."""
    if value is None:
        monkeypatch.delenv(pe.DW_PROGRAMS_ENV, raising=False)
    else:
        monkeypatch.setenv(pe.DW_PROGRAMS_ENV, value)
    if isinstance(want, int):
        assert pe._env_choice(pe.DW_PROGRAMS_ENV, 264, (264, 132)) == want
    else:
        with pytest.raises(ValueError, match=rf"^\${pe.DW_PROGRAMS_ENV} must be one of 264, 132, {want}"):
            pe._env_choice(pe.DW_PROGRAMS_ENV, 264, (264, 132))


def test_gpu_choices_are_read_at_import():
    code = "import fastmae.kernels.patch_embed as pe; print(pe.DW_TARGET_PROGRAMS, pe.CONFIGS['large16_short'])"
    env = {**os.environ, pe.DW_PROGRAMS_ENV: "132", pe.SHORT_K_ENV: "32"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split("\n")[-2] == "132 (128, 128, 32, 8, 4)"
    assert (pe.DW_TARGET_PROGRAMS, pe.CONFIGS["large16_short"]) == (264, (128, 128, 64, 8, 3))  # this process: unset


def test_every_kernel_and_config_compiles_for_sm80_and_sm90():
    specs = _specs()
    with ThreadPoolExecutor(2) as pool:  # two compiler processes
        halves = pool.map(assert_compiles, [specs[::2], specs[1::2]])
    results = [r for half in halves for r in half]
    assert len(results) == 2 * len(specs)
    gemms = [r for r in results if "reduce" not in r["name"] and "weight" not in r["name"]]
    assert all(r["mma"] for r in gemms), [r["name"] for r in gemms if not r["mma"]]


# ---- GPU-only: real ViT shapes, bf16 dots, races, autocast and torch.compile ----

VIT_SHAPES = {
    # name: (C, img, p, D, K at mask 0.75)
    "vit-b": (3, 224, 16, 768, 49),
    "vit-l": (3, 224, 16, 1024, 49),
    "vit-h": (3, 224, 14, 1280, 64),
}
ODD_SHAPES = {
    "p8-C1-odd-D": (1, 64, 8, 392, 17),
    "p14-K=L": (3, 112, 14, 520, 64),
    "p16-K1": (3, 48, 16, 384, 1),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", list(VIT_SHAPES) + list(ODD_SHAPES))
def test_cuda_shapes_match_eager_and_repeat_bitwise(shape, dtype):
    c, img, p, d, k = {**VIT_SHAPES, **ODD_SHAPES}[shape]
    n = 24 if shape in VIT_SHAPES else 8  # 24·49+ kept patches select the large tiles at the ViT shapes
    inputs, dout = make_inputs(n, c, img, img, p, d, k, dtype, seed=10, device="cuda")
    config = pe._config_name(d, n * k, dtype)
    assert (config == "small") == (shape in ODD_SHAPES), config
    out, got = check_against_eager(inputs, dout, dtype)
    with poison_outputs():
        out_b, got_b = run(pe.patch_embed, inputs, dout)
    assert torch.equal(out, out_b)
    for key in GRAD_NAMES:
        assert torch.equal(got[key], got_b[key]), key


@pytest.mark.cuda
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_dtype_and_values(amp_dtype):
    inputs, dout = make_inputs(24, 3, 224, 224, 16, 1024, 49, torch.float32, seed=11, device="cuda")
    # the forward runs the 16-bit config on the weight cast once; dW reads fp32 images and gradients
    assert pe._config_name(1024, 24 * 49, amp_dtype) == "large16"
    assert pe._config_name(1024, 24 * 49, torch.float32, torch.float32) == "large32"
    with torch.autocast("cuda", dtype=amp_dtype):
        with poison_outputs():
            out, got = run(pe.patch_embed, inputs, dout)
        ref_lo, want_lo = run(reference.patch_embed, inputs, dout)
    ref_hi, want_hi = run(reference.patch_embed, inputs, dout, cast=torch.float64)
    assert out.dtype == ref_lo.dtype
    assert_within_eager_error(out, ref_hi, ref_lo, amp_dtype, "out")
    for key in GRAD_NAMES:
        assert got[key].dtype == torch.float32
        assert_within_eager_error(got[key], want_hi[key], want_lo[key], amp_dtype, f"d{key}")


@pytest.mark.cuda
@pytest.mark.parametrize("img_grad", [False, True])
def test_cuda_forward_and_backward_never_wait_for_the_gpu(img_grad):
    """No host sync on the CUDA path (ids_keep is not range-checked on the host; bad indices are flagged on the
    device): torch's sync debug mode raises on any synchronizing call during the forward and the backward."""
    inputs, dout = make_inputs(8, 3, 224, 224, 14, 1280, 64, torch.bfloat16, seed=14, device="cuda")
    grads = GRAD_NAMES if img_grad else GRAD_NAMES[1:]
    run(pe.patch_embed, inputs, dout, grads=grads)  # first call: allocates the error flags
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(pe.patch_embed, inputs, dout, grads=grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_errors()


@pytest.mark.cuda
def test_cuda_torch_compile_around_the_op():
    inputs, dout = make_inputs(8, 3, 224, 224, 16, 768, 49, torch.bfloat16, seed=12, device="cuda")

    def f(**kw):
        return pe.patch_embed(**kw) * 2

    out, got = run(torch.compile(f), inputs, dout)
    ref, want = run(f, inputs, dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for key in GRAD_NAMES:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
