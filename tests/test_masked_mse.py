"""The masked-only MSE kernel against fastmae.reference.masked_mse: loss, dpred, edge cases, compilation."""

import pytest
import torch

from fastmae import reference
from fastmae.kernels import check_errors
from fastmae.kernels import masked_mse as mm
from fastmae.kernels._common import poison_outputs
from fastmae.kernels.masked_mse import masked_mse, row_tiling, tiling
from fastmae.masking import random_masking
from tests.compile_harness import KernelSpec, assert_compiles
from tests.tolerance import assert_within_eager_error, atol_for

MOD = "fastmae.kernels.masked_mse"
PC = [(8, 1), (8, 3), (14, 1), (14, 3), (16, 1), (16, 3)]


def make(n, c, gh, gw, p, dtype, device="cpu", img_dtype=None):
    """Random imgs [N, C, gh·p, gw·p] and pred [N, gh·gw, p²C] (not zeros), in the given dtypes."""
    imgs = (torch.rand(n, c, gh * p, gw * p, device=device) * 2 - 0.5).to(img_dtype or dtype)
    pred = torch.randn(n, gh * gw, p * p * c, device=device).to(dtype)
    return pred, imgs


def kernel_run(fn, pred, imgs, mask, p, norm, gscale):
    """Loss and dpred from the kernel with NaN-poisoned outputs, upstream gradient ``gscale``."""
    pred = pred.detach().clone().requires_grad_()
    with poison_outputs():
        loss = fn(pred, imgs, mask, p, norm)
        loss.backward(torch.tensor(gscale, device=pred.device))
    return loss.detach(), pred.grad


def eager_run(pred, imgs, mask, p, norm, gscale, dtype):
    """The reference's loss and dpred, on pred/imgs cast to ``dtype`` (float64 for the precise oracle)."""
    pred = pred.detach().to(dtype).requires_grad_()
    imgs = imgs.to(torch.float64 if dtype == torch.float64 else imgs.dtype)
    loss = reference.masked_mse(pred, imgs, mask, p, norm)
    loss.backward(torch.tensor(gscale, dtype=loss.dtype, device=pred.device))
    return loss.detach(), pred.grad


def check_against_eager(pred, imgs, mask, p, norm, fn=masked_mse, name=""):
    """Kernel vs eager-in-pred's-dtype vs eager-in-fp64: the tolerance rule on loss and dpred."""
    d = pred.shape[-1]
    wsum = float(mask.sum()) if mask is not None else pred.shape[0] * pred.shape[1]
    gscale = d * wsum / 2  # makes dpred = (pred - target) · mask: O(1) values
    loss, grad = kernel_run(fn, pred, imgs, mask, p, norm, gscale)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    lo_mask = mask.to(torch.float32) if mask is not None and mask.dtype == torch.bool else mask
    hi_mask = mask.to(torch.float64) if mask is not None else None
    ref_lo = eager_run(pred, imgs, lo_mask, p, norm, gscale, pred.dtype)
    ref_hi = eager_run(pred, imgs, hi_mask, p, norm, gscale, torch.float64)
    assert_within_eager_error(loss, ref_hi[0], ref_lo[0].float(), pred.dtype, f"{name} loss")
    assert_within_eager_error(grad, ref_hi[1], ref_lo[1], pred.dtype, f"{name} dpred", atol_for(grad, ref_hi[1]))
    if mask is not None:
        assert (grad[mask == 0] == 0).all(), "rows with mask 0 must get an exact zero gradient"
    return loss, grad


def random_mask(n, num, ratio=0.75):
    return random_masking(n, num, ratio).mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("p,c", PC)
def test_matches_eager(p, c, norm, dtype):
    torch.manual_seed(p * 10 + c)
    pred, imgs = make(2, c, 3, 5, p, dtype)  # L = 15: not a multiple of any BLOCK_R
    check_against_eager(pred, imgs, random_mask(2, 15), p, norm, name=f"p{p} C{c} norm={norm}")


@pytest.mark.parametrize("norm", [False, True])
def test_bf16_pred_fp32_imgs_as_under_autocast(norm):
    torch.manual_seed(1)
    pred, imgs = make(3, 3, 2, 3, 16, torch.bfloat16, img_dtype=torch.float32)
    check_against_eager(pred, imgs, random_mask(3, 6), 16, norm)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("case", ["one", "all_but_one", "none", "fractional", "bool", "single_row"])
def test_mask_cases(case, norm):
    torch.manual_seed(3)
    n, gh, gw = (1, 1, 1) if case == "single_row" else (2, 3, 4)
    pred, imgs = make(n, 3, gh, gw, 8, torch.float32)
    num = gh * gw
    if case == "one":
        mask = torch.zeros(n, num)
        mask[1, 7] = 1
    elif case == "all_but_one":
        mask = torch.ones(n, num)
        mask[0, 5] = 0
    elif case == "none":
        mask = None
    elif case == "fractional":
        mask = torch.rand(n, num) * (torch.rand(n, num) > 0.3)
    elif case == "bool":
        mask = random_mask(n, num).bool()
    else:
        mask = torch.ones(n, num)
    check_against_eager(pred, imgs, mask, 8, norm, name=case)


def test_constant_patches_stay_finite_with_norm_pix():
    torch.manual_seed(4)
    p, c = 8, 3
    pred, imgs = make(2, c, 2, 3, p, torch.float32)
    imgs[0, :, :p, :p] = 0.5  # patch 0 of sample 0: variance 0
    imgs[1, :, p:, 2 * p :] = -2.0  # patch 5 of sample 1
    mask = torch.ones(2, 6)
    loss, grad = check_against_eager(pred, imgs, mask, p, True, name="constant")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_non_contiguous_inputs():
    torch.manual_seed(5)
    p, c = 14, 3
    full = torch.randn(2, 1 + 6, p * p * c)  # [N, 1+L, D], as the decoder's output before dropping cls
    pred = full[:, 1:, :]
    imgs = make(2, c, 2, 3, p, torch.float32)[1].contiguous(memory_format=torch.channels_last)
    assert not pred.is_contiguous() and not imgs.is_contiguous()
    check_against_eager(pred, imgs, random_mask(2, 6), p, True, name="strided")


def test_unscored_rows_are_never_read():
    torch.manual_seed(6)
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0]])
    clean = masked_mse(pred, imgs, mask, 8, True)
    pred[mask == 0] = float("nan")
    imgs[0, :, :8, 8:] = float("nan")  # patch 1 of sample 0, unscored
    assert torch.equal(masked_mse(pred, imgs, mask, 8, True), clean)


def test_loss_can_be_scaled_in_place_like_the_original_training_loop():
    torch.manual_seed(9)
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    pred_k, pred_r = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    loss = masked_mse(pred_k, imgs, mask, 8, True)
    ref = reference.masked_mse(pred_r, imgs, mask, 8, True)
    loss /= 4  # the original divides by accum_iter in place
    ref /= 4
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(pred_k.grad, pred_r.grad)


@pytest.mark.parametrize("norm", [False, True])
def test_unit_upstream_gradient_hands_out_the_forward_gradient(norm):
    """loss.backward() (g = 1, the scale pass skipped on the device): the rule against the reference, and the
    gradient of g = 1 times g bitwise equals the gradient of a power-of-two g."""
    torch.manual_seed(11)
    pred, imgs = make(2, 3, 3, 5, 8, torch.float16)
    mask = random_mask(2, 15)
    loss, grad = kernel_run(masked_mse, pred, imgs, mask, 8, norm, 1.0)
    ref_lo = eager_run(pred, imgs, mask, 8, norm, 1.0, torch.float16)
    ref_hi = eager_run(pred, imgs, mask.double(), 8, norm, 1.0, torch.float64)
    assert_within_eager_error(loss, ref_hi[0], ref_lo[0].float(), torch.float16, "loss")
    assert_within_eager_error(grad, ref_hi[1], ref_lo[1], torch.float16, "dpred", atol_for(grad, ref_hi[1]))
    assert (grad[mask == 0] == 0).all()
    assert torch.equal(kernel_run(masked_mse, pred, imgs, mask, 8, norm, 0.25)[1], grad * 0.25)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on the inf·0 it computes
@pytest.mark.parametrize("g", [float("inf"), float("nan")])
def test_non_finite_upstream_gradient_reaches_the_unscored_rows_as_in_the_reference(g):
    torch.manual_seed(12)
    pred, imgs = make(2, 3, 2, 3, 8, torch.float32)
    mask = random_mask(2, 6)
    grad = kernel_run(masked_mse, pred, imgs, mask, 8, True, g)[1]
    ref = eager_run(pred, imgs, mask, 8, True, g, torch.float32)[1]
    assert torch.equal(torch.isnan(grad), torch.isnan(ref)) and torch.equal(torch.isinf(grad), torch.isinf(ref))
    assert torch.isnan(grad[mask == 0]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on the inf·0 it computes
@pytest.mark.parametrize("g", [1.0, 0.25, 3.0, float("inf")])
@pytest.mark.parametrize("case", ["mask", "rows", "plain"])
def test_recomputed_gradient_equals_the_formed_one(monkeypatch, case, g):
    """The backward of a compiled loss (form_gradient() False: pred and the image saved, the gradient recomputed)
    gives bitwise the gradient the eager forward forms and the backward scales."""
    torch.manual_seed(14)
    pred, imgs = make(2, 3, 3, 5, 8, torch.float16)
    mask = random_mask(2, 15)
    if case == "rows":
        ids = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :11]  # [N, M]
        pred, fn = pred[:, :11], lambda pr, im, m, pp, nn: masked_mse(pr, im, None, pp, nn, ids=ids)
    else:
        fn = masked_mse
    mask = mask if case == "mask" else None
    formed = kernel_run(fn, pred, imgs, mask, 8, True, g)
    monkeypatch.setattr(mm, "form_gradient", lambda: False)
    calls, bwd = [], mm.masked_mse_bwd
    monkeypatch.setattr(mm, "masked_mse_bwd", lambda *args: calls.append(1) or bwd(*args))
    recomputed = kernel_run(fn, pred, imgs, mask, 8, True, g)
    assert calls == [1]
    assert torch.equal(formed[0], recomputed[0])
    assert torch.equal(formed[1].isnan(), recomputed[1].isnan())
    assert torch.equal(formed[1].nan_to_num(), recomputed[1].nan_to_num())


def test_backward_runs_once_per_forward():
    """The first backward scales the forward's gradient in place and hands it out: a second one raises."""
    pred, imgs = make(1, 3, 2, 2, 8, torch.float32)
    pred.requires_grad_()
    loss = masked_mse(pred, imgs, torch.ones(1, 4), 8, True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


def test_no_gradient_is_formed_without_grad(monkeypatch):
    """The forward writes d0 only when pred needs a gradient (not under no_grad, nor for a pred without grad)."""
    calls = []
    fwd = mm.masked_mse_fwd
    monkeypatch.setattr(mm, "masked_mse_fwd", lambda *args: calls.append(args[-1]) or fwd(*args))
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0]])
    plain = masked_mse(pred, imgs, mask, 8, True)
    with torch.no_grad():
        quiet = masked_mse(pred.requires_grad_(), imgs, mask, 8, True)
    graded = masked_mse(pred, imgs, mask, 8, True)
    assert calls == [False, False, True]
    assert torch.equal(plain, quiet) and torch.equal(plain, graded.detach())
    err = torch.zeros(2, dtype=torch.int32)
    loss, d0 = mm._launch_fwd(pred.detach(), imgs, mask, None, err, 8, 3, 2, True, False)
    assert d0.numel() == 0 and torch.equal(loss.view(()), plain)


@pytest.mark.parametrize("max_parts", [1024, 4])
def test_mask_sum_over_many_partials(monkeypatch, max_parts):
    """Σ w from several block sums (and, capped at 4 partials, from spans of several blocks each): fractional
    weights held to the rule, bitwise repeatable."""
    monkeypatch.setattr(mm, "WSUM_BLOCK", 4)
    monkeypatch.setattr(mm, "MAX_WPARTS", max_parts)
    span, parts = mm.wsum_blocks(2 * 15)
    assert (span, parts) == ((4, 16) if max_parts == 1024 else (8, 16))
    torch.manual_seed(13)
    pred, imgs = make(2, 3, 3, 5, 8, torch.float32)
    mask = torch.rand(2, 15) * (torch.rand(2, 15) > 0.3)
    first = check_against_eager(pred, imgs, mask, 8, True, name=f"max_parts={max_parts}")
    second = check_against_eager(pred, imgs, mask, 8, True, name=f"max_parts={max_parts}")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the 0/0 it computes
def test_all_zero_mask_raises():
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="mask sums to zero"):
        masked_mse(pred, imgs, torch.zeros(2, 4), 8, False)
    with pytest.raises(ValueError, match="mask sums to zero"):
        masked_mse(pred, imgs, torch.tensor([[1.0, -1, 0, 0], [0, 0, 0, 0]]), 8, False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the 0/0 it computes
def test_bad_ids_and_zero_mask_on_the_device_path_are_flagged(monkeypatch):
    """Without the host checks (as on CUDA): an all-zero mask gives a NaN loss, an id outside [0, L) a NaN loss and
    NaN gradient row and no read out of bounds; each sets its flag, which check_errors() reports once, naming the op
    and the error. FASTMAE_CHECK=1 raises at the call."""
    monkeypatch.setattr(mm, "host_checks", lambda *tensors: False)
    check_errors()
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32)
    assert torch.isnan(masked_mse(pred, imgs, torch.zeros(2, 4), 8, True))
    with pytest.raises(ValueError, match=r"masked_mse on cpu: the mask sums to zero \(no patch is scored\)$"):
        check_errors()
    rows = pred[:, :3].clone().requires_grad_()
    ids = torch.tensor([[0, 1, 4], [0, -7, 2]])
    with poison_outputs():
        loss = masked_mse(rows, imgs, None, 8, True, ids=ids)
        loss.backward()
    assert torch.isnan(loss) and torch.isnan(rows.grad[0, 2]).all() and torch.isnan(rows.grad[1, 1]).all()
    with pytest.raises(ValueError, match=r"masked_mse on cpu: ids holds a patch index outside \[0, L\)$"):
        check_errors()
    check_errors()  # reported once
    monkeypatch.setenv("FASTMAE_CHECK", "1")
    with pytest.raises(ValueError, match="masked_mse on cpu: the mask sums to zero"):
        masked_mse(pred, imgs, torch.zeros(2, 4), 8, False)
    masked_mse(pred, imgs, torch.ones(2, 4), 8, False)  # valid: no error


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the 0/0 it computes
def test_torch_compile_captures_one_graph():
    """The registered ops (opaque custom ops under the interpreter): torch.compile(fullgraph=True) traces the loss in
    one graph, equal to the uncompiled loss; while compiling nothing is checked on the host, so an all-zero mask is
    flagged on the device like on CUDA."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    check_errors()
    pred, imgs = make(2, 3, 2, 3, 8, torch.float32)
    mask = random_mask(2, 6)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(masked_mse, backend=counter, fullgraph=True)
    got = kernel_run(compiled, pred, imgs, mask, 8, True, 3.0)
    want = kernel_run(masked_mse, pred, imgs, mask, 8, True, 3.0)
    assert counter.frame_count == 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.isnan(compiled(pred, imgs, torch.zeros(2, 6), 8, True))
    with pytest.raises(ValueError, match="masked_mse on cpu: the mask sums to zero"):
        check_errors()


@pytest.mark.parametrize("norm", [False, True])
def test_deterministic(norm):
    torch.manual_seed(7)
    pred, imgs = make(3, 3, 3, 3, 16, torch.float16)
    mask = random_mask(3, 9)
    a = kernel_run(masked_mse, pred, imgs, mask, 16, norm, 5.0)
    b = kernel_run(masked_mse, pred, imgs, mask, 16, norm, 5.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("p,c", [(8, 3), (14, 1)])
def test_rows_entry_point_equals_full_loss(p, c, norm):
    """pred for the masked patches only (raster order) gives the loss of the full pred with the 0/1 mask."""
    torch.manual_seed(8)
    n, num = 2, 12
    full, imgs = make(n, c, 3, 4, p, torch.float32)
    mask = random_mask(n, num)
    ids = torch.argsort(mask, dim=1, descending=True, stable=True)[:, : int(mask[0].sum())]  # [N, M]
    rows = torch.gather(full, 1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1]))  # [N, M, D]
    gscale = full.shape[-1] * float(mask.sum()) / 2
    loss, grad = kernel_run(
        lambda pr, im, i, pp, nn: masked_mse(pr, im, None, pp, nn, ids=i), rows, imgs, ids, p, norm, gscale
    )
    ref_hi = eager_run(full, imgs, mask.double(), p, norm, gscale, torch.float64)
    ref_lo = eager_run(full, imgs, mask, p, norm, gscale, torch.float32)
    pick = lambda g: torch.gather(g, 1, ids.unsqueeze(-1).expand(-1, -1, g.shape[-1]))  # [N, M, D]
    assert_within_eager_error(loss, ref_hi[0], ref_lo[0], torch.float32, "rows loss")
    assert_within_eager_error(grad, pick(ref_hi[1]), pick(ref_lo[1]), torch.float32, "rows dpred")


def test_rows_entry_point_bad_ids():
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32)
    rows = pred[:, :3]
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\)"):
        masked_mse(rows, imgs, None, 8, ids=torch.tensor([[0, 1, 4], [0, 1, 2]]))
    with pytest.raises(TypeError, match="ids must be an int64"):
        masked_mse(rows, imgs, None, 8, ids=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="ids must have shape"):
        masked_mse(rows, imgs, None, 8, ids=torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask must have shape \[N, R\] = \[2, 3\]"):
        masked_mse(rows, imgs, torch.ones(2, 4), 8, ids=torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_with_weights_matches_eager(dtype):
    """ids with per-row weights (fractional, some zero; repeated patches): the reference's loss of the same rows."""
    torch.manual_seed(10)
    p, c, n = 8, 3, 2
    full, imgs = make(n, c, 3, 4, p, dtype)
    ids = torch.randint(0, 12, (n, 5))  # [N, R]
    rows = full[:, :5]  # [N, R, D]
    weights = torch.rand(n, 5) * (torch.rand(n, 5) > 0.3)
    weights[0, 0] = 1.0
    gscale = rows.shape[-1] * float(weights.sum()) / 2
    pred = rows.detach().clone().requires_grad_()
    with poison_outputs():
        loss = masked_mse(pred, imgs, weights, p, True, ids=ids)
        loss.backward(torch.tensor(gscale))
    ref = []
    for dt, w in ((dtype, weights), (torch.float64, weights.double())):
        r = rows.detach().to(dt).requires_grad_()
        out = reference.masked_mse(r, imgs.to(torch.float64) if dt == torch.float64 else imgs, w, p, True, ids=ids)
        out.backward(torch.tensor(gscale, dtype=out.dtype))
        ref.append((out.detach(), r.grad))
    (lo, dlo), (hi, dhi) = ref
    assert_within_eager_error(loss, hi, lo.float(), dtype, "rows loss")
    assert_within_eager_error(pred.grad, dhi, dlo, dtype, "rows dpred", atol_for(pred.grad, dhi))
    assert (pred.grad[weights == 0] == 0).all()


def bad_cases():
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32)
    mask = torch.ones(2, 4)
    return [
        ((pred.double(), imgs, mask, 8), TypeError, "pred must be float32"),
        ((pred, imgs.int(), mask, 8), TypeError, "imgs must be float32"),
        ((pred, imgs, mask, 8.0), TypeError, "patch_size must be a positive int"),
        ((pred, imgs, mask, 0), TypeError, "patch_size must be a positive int"),
        ((pred, imgs, mask, 8, 1), TypeError, "norm_pix_loss must be a bool"),
        ((pred[0], imgs, mask, 8), ValueError, "pred must be 3-D"),
        ((pred, imgs[0], mask, 8), ValueError, "imgs must be 4-D"),
        ((pred, imgs, mask, 7), ValueError, "multiples of patch_size"),
        ((pred[:1], imgs, mask, 8), ValueError, "pred has batch 1, imgs has 2"),
        ((pred[..., :100], imgs, mask, 8), ValueError, r"pred's last dim must be patch_size²·C = 8²·3 = 192"),
        ((pred[:, :3], imgs, mask, 8), ValueError, "pred has 3 patches but imgs holds 2x2"),
        ((pred, imgs, mask[:, :3], 8), ValueError, r"mask must have shape \[N, R\] = \[2, 4\]"),
        ((pred, imgs, mask.tolist(), 8), TypeError, "mask must be a torch.Tensor"),
        ((pred, imgs, mask.requires_grad_(), 8), ValueError, "mask requires grad"),
        ((pred, imgs.clone().requires_grad_(), torch.ones(2, 4), 8), ValueError, "imgs requires grad"),
        ((pred[..., :1], imgs[:, :1, :2, :2], torch.ones(2, 1), 1, True), ValueError, "at least 2 values"),
    ]


@pytest.mark.parametrize("args,exc,match", bad_cases())
def test_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        masked_mse(*args)


def test_imgs_requiring_grad_is_fine_without_grad_mode():
    pred, imgs = make(1, 1, 1, 2, 8, torch.float32)
    with torch.no_grad():
        out = masked_mse(pred, imgs.requires_grad_(), None, 8)
    torch.testing.assert_close(out, reference.masked_mse(pred, imgs.detach(), None, 8))


def compile_specs():
    """Every (p, C) in bf16 (as under autocast), and per tile config fp16 and fp32 with the other flags."""
    ints = ["total_rows", "R", "L", "GW", "s_pn", "s_pr", "s_pd", "s_in", "s_ic", "s_ih", "s_iw"]

    def spec(kernel, pred_t, img_t, p, c, norm=True, has_mask=True, has_ids=False, grad=True):
        if kernel in ("_fwd_kernel", "_bwd_kernel"):
            block_r, block_i, block_m, block_s, warps = tiling(p, c)
            sig = {"PRED": pred_t, "IMGS": img_t, "MASK": "*fp32", "IDS": "*i64", "WPART": "*fp32"}
            if kernel == "_fwd_kernel":
                sig.update({"PART": "*fp32", "DPRED": pred_t, "ERR": "*i32"})
                cx = dict(P=p, C=c, NORM=norm, HAS_MASK=has_mask, HAS_IDS=has_ids, GRAD=grad, WPARTS=64)
            else:
                sig.update({"GRAD": "*fp32", "DPRED": pred_t})
                cx = dict(P=p, C=c, NORM=norm, HAS_MASK=has_mask, HAS_IDS=has_ids, WPARTS=64)
            sig.update({k: "i32" for k in ints})
            cx.update(BLOCK_R=block_r, BLOCK_I=block_i, BLOCK_M=block_m, BLOCK_S=block_s)
        else:
            block_r, block_d, warps = row_tiling(p * p * c)
            sig = {"GRAD": "*fp32", "MASK": "*fp32", "DPRED": pred_t, "total_rows": "i32", "num_blocks": "i32"}
            cx = dict(D=p * p * c, HAS_MASK=has_mask, BLOCK_R=block_r, BLOCK_D=block_d)
        sig.update({k: "constexpr" for k in cx})
        return KernelSpec(MOD, kernel, sig, cx, num_warps=warps)

    specs = []
    for kernel in ("_fwd_kernel", "_bwd_kernel", "_bwd_scale_kernel"):
        for p, c in PC:
            specs.append(spec(kernel, "*bf16", "*fp32", p, c))
        for p, c in [(8, 1), (8, 3), (16, 1), (16, 3)]:  # one per tile config
            specs.append(spec(kernel, "*fp16", "*fp16", p, c))
            specs.append(spec(kernel, "*fp32", "*fp32", p, c, norm=False, has_mask=False, has_ids=True, grad=False))
    for has_mask in (False, True):
        reduce_sig = {"PART": "*fp32", "WPART": "*fp32", "LOSS": "*fp32", "ERR": "*i32", "total_rows": "i32"}
        reduce_cx = {"HAS_MASK": has_mask, "WPARTS": 16, "BLOCK": 1024}
        reduce_sig.update({"num_programs": "i32", **dict.fromkeys(reduce_cx, "constexpr")})
        specs.append(KernelSpec(MOD, "_fwd_reduce_kernel", reduce_sig, reduce_cx))
    wsum_sig = {"MASK": "*fp32", "WPART": "*fp32", "total_rows": "i32", "span": "i32", "BLOCK": "constexpr"}
    specs.append(KernelSpec(MOD, "_fwd_wsum_kernel", wsum_sig, {"BLOCK": 1024}))
    return specs


def test_tile_configs_are_the_compiled_ones():
    fwd = {(16, 8, 8, 8, 4), (16, 8, 32, 32, 8), (16, 16, 16, 16, 8), (4, 16, 64, 64, 8)}
    assert {tiling(p, c) for p, c in PC} == fwd
    assert {tiling(p, c) for p, c in [(8, 1), (8, 3), (16, 1), (16, 3)]} == fwd
    assert {row_tiling(p * p * c) for p, c in PC} == {(16, 64, 4), (16, 256, 8), (4, 1024, 8)}


def test_compiles_for_sm80_sm90():
    assert_compiles(compile_specs())


VIT_SHAPES = {"vit_b": (16, 3, 14), "vit_l": (16, 3, 14), "vit_h": (14, 3, 16)}


@pytest.mark.cuda
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("model", list(VIT_SHAPES))
def test_cuda_vit_shapes_bf16_twice(model, norm):
    p, c, grid = VIT_SHAPES[model]
    torch.manual_seed(0)
    pred, imgs = make(8, c, grid, grid, p, torch.bfloat16, "cuda", img_dtype=torch.float32)
    mask = random_masking(8, grid * grid, 0.75, "cuda").mask
    first = check_against_eager(pred, imgs, mask, p, norm, name=model)
    second = check_against_eager(pred, imgs, mask, p, norm, name=model)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.cuda
def test_cuda_fp16_and_fp32_all_configs():
    for dtype in (torch.float16, torch.float32):
        for p, c in PC:
            pred, imgs = make(3, c, 5, 7, p, dtype, "cuda")
            check_against_eager(pred, imgs, random_masking(3, 35, 0.75, "cuda").mask, p, True, name=f"{dtype}")


@pytest.mark.cuda
def test_cuda_all_zero_mask_raises_late():
    check_errors()
    pred, imgs = make(2, 3, 2, 2, 8, torch.float32, "cuda")
    loss = masked_mse(pred, imgs, torch.zeros(2, 4, device="cuda"), 8, False)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="masked_mse on cuda:0: the mask sums to zero"):
        check_errors()
    check_errors()  # reported once
