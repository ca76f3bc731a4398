"""The tolerance rule for kernels: error against a high-precision reference at most 2× the eager op's own error."""

from __future__ import annotations

import math

import torch

from fastmae.kernels._common import interpreting

# The small absolute slack added to the bound, per dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def atol_for(result: torch.Tensor, ref: torch.Tensor) -> float | None:
    """The rule's atol, plus one bf16 ulp of max|ref| for bf16 results under the interpreter, whose fp32→bf16
    casts truncate (the GPU rounds to nearest even, and is held to the plain rule in the cuda tests)."""
    if not (interpreting() and result.dtype == torch.bfloat16):
        return None
    top = ref.abs().max().item()
    return ATOL[torch.bfloat16] + (2.0 ** (math.floor(math.log2(top)) - 7) if top > 0 else 0.0)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_eager_error(
    out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, dtype: torch.dtype, name: str = "", atol=None
) -> None:
    """``max|out − ref_hi| ≤ 2·max|ref_lo − ref_hi| + atol``.

    Args:
        out: the kernel's result.
        ref_hi: the eager op run in float64 (on inputs upcast from the same low-precision values).
        ref_lo: the eager op run in the kernel's dtype.
        dtype: the kernel's input dtype (selects the default atol).
    """
    assert out.shape == ref_hi.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten elements?)"
    atol = ATOL[dtype] if atol is None else atol
    err, eager_err = max_err(out, ref_hi), max_err(ref_lo, ref_hi)
    bound = 2 * eager_err + atol
    assert err <= bound, f"{name}: kernel error {err:.3g} > 2 × eager error {eager_err:.3g} + {atol:g}"


def assert_model_within_eager_error(build, device, img_size: int, num_patches: int, **forward_kwargs):
    """``build(impl)`` with ``impl="triton"`` (fp32) against ``impl="eager"`` (fp32, and an fp64 copy as the
    reference), all with the eager model's weights: loss, prediction and every parameter gradient within the rule.

    Returns the eager model.
    """
    eager = build("eager").to(device)
    models = {"eager": eager}
    for name, impl, dtype in [("triton", "triton", torch.float32), ("fp64", "eager", torch.float64)]:
        models[name] = build(impl).to(device, dtype)
        models[name].load_state_dict(eager.state_dict())
    imgs = torch.randn(2, 3, img_size, img_size, device=device)
    noise = torch.rand(2, num_patches, device=device)
    res = {}
    for name, model in models.items():
        dtype = next(model.parameters()).dtype
        loss, pred, _ = model(imgs.to(dtype), noise=noise.to(dtype), **forward_kwargs)
        loss.backward()
        res[name] = (loss.detach(), pred.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    for i, what in enumerate(("loss", "pred")):
        assert_within_eager_error(res["triton"][i], res["fp64"][i], res["eager"][i], torch.float32, what)
    grads = {name: r[2] for name, r in res.items()}
    assert grads["triton"].keys() == grads["eager"].keys()
    for k in grads["eager"]:
        assert_within_eager_error(grads["triton"][k], grads["fp64"][k], grads["eager"][k], torch.float32, k)
    return eager
