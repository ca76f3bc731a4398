"""Inputs and providers for every benchmarked op and the training step, and the correctness checks.

An :class:`OpCase` holds one op's inputs at one shape (fresh random values, never zeros), the gradient it is
differentiated with, and its FLOP and byte counts. A provider is a function with the eager op's signature:
the reference (``eager``), ``torch.compile`` of it (``compile``), fastmae's Triton kernel (``triton``), or, for
attention, ``F.scaled_dot_product_attention`` pinned to one backend with ``sdpa_kernel`` (``sdpa_*``), fed
from the packed qkv through the same permutes (and whatever copies the backend makes of them) as the eager model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastmae import ops, reference
from fastmae.masking import random_masking
from fastmae.pos_embed import sincos_2d
from fastmae.schedule import build_adamw

from . import common
from .common import ModelShape

REFERENCE: dict[str, Callable] = {
    "patch_embed": reference.patch_embed_visible,
    "attention": reference.attention,
    "masked_mse": reference.masked_mse_loss,
    "decoder_assembly": reference.decoder_assemble,
}

# Compiling on the CPU was measured at 9–27 s per op shape with inductor's C++ backend on a 2-core machine, too
# slow for a dry run that CI repeats; and torch.compile over the kernels running in the Triton interpreter fails
# (dynamo cannot trace the interpreter's launch, nor fake-run a triton_op there). So compile runs on CUDA only.
CPU_COMPILE_REASON = (
    "torch.compile providers run on CUDA only: on the CPU, inductor's C++ backend took 9-27 s per op shape here "
    "(too slow for the dry run), and compiling over kernels run by the Triton interpreter fails"
)


class Unavailable(Exception):
    """A provider that cannot run here; the message says why (reported as a skip, never as a result)."""


@dataclass
class OpCase:
    """One op's inputs at one shape: ``args`` are the op's arguments, ``grad_idx`` the differentiated ones."""

    op: str
    label: str
    args: tuple
    grad_idx: tuple[int, ...]
    grad_names: tuple[str, ...]
    grad_out: torch.Tensor
    flops: dict[str, float | None] = field(default_factory=dict)
    nbytes: dict[str, float | None] = field(default_factory=dict)
    bound: str = "copy"  # the ceiling this op is judged by: "matmul" or "copy"

    @property
    def grad_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.args[i] for i in self.grad_idx)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def case_label(op: str, shape: ModelShape, stage: str = "encoder") -> str:
    """A short description of ``op``'s shape, e.g. ``encoder B=256 H=12 N=50 d=64``."""
    s = shape
    if op == "patch_embed":
        return f"N={s.batch} K={s.keep} D={s.dim} p={s.patch}"
    if op == "attention":
        b, h, n, d = s.attn(stage)
        return f"{stage} B={b} H={h} N={n} d={d}"
    if op == "masked_mse":
        return f"N={s.batch} L={s.num_patches} masked={s.num_patches - s.keep} P={s.patch_dim}"
    if op == "decoder_assembly":
        return f"N={s.batch} K={s.keep} L={s.num_patches} Dd={s.dec_dim}"
    raise ValueError(f"op must be one of {common.OPS}, got {op!r}")


def make_case(
    op: str,
    shape: ModelShape,
    device: torch.device,
    dtype: torch.dtype,
    stage: str = "encoder",
    generator: torch.Generator | None = None,
) -> OpCase:
    """Fresh random inputs for ``op`` at ``shape`` (``stage`` picks the encoder's or decoder's attention)."""
    g = generator

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device="cpu") * scale).to(device=device, dtype=dtype)

    s, elt = shape, torch.finfo(dtype).bits // 8
    n, grid = s.batch, (s.img // s.patch, s.img // s.patch)
    noise = torch.rand(n, s.num_patches, generator=g).to(device)
    ids_keep, mask, ids_restore = random_masking(n, s.num_patches, s.mask_ratio, device, noise)
    if op == "patch_embed":
        imgs = randn(n, s.chans, s.img, s.img)
        weight = _leaf(randn(s.dim, s.chans, s.patch, s.patch, scale=s.patch_dim**-0.5))
        bias, cls = _leaf(randn(s.dim, scale=0.02)), _leaf(randn(1, 1, s.dim, scale=0.02))
        pos = sincos_2d(s.dim, grid).unsqueeze(0).to(device=device, dtype=dtype)  # [1, 1+L, D], fixed
        return OpCase(
            op,
            case_label(op, s),
            (imgs, ids_keep, weight, bias, pos, cls),
            (2, 3, 5),
            ("out", "d_weight", "d_bias", "d_cls_token"),
            randn(n, 1 + s.keep, s.dim),
            {m: common.patch_embed_flops(s, m) for m in common.MODES},
            {m: common.patch_embed_bytes(s, m, elt) for m in common.MODES},
            bound="matmul",
        )
    if op == "attention":
        b, h, tokens, d = s.attn(stage)
        qkv = _leaf(randn(b, tokens, 3 * h * d))
        return OpCase(
            op,
            case_label(op, s, stage),
            (qkv, h),
            (0,),
            ("out", "d_qkv"),
            randn(b, tokens, h * d),
            {m: common.attention_flops(b, h, tokens, d, m) for m in common.MODES},
            {m: common.attention_bytes(b, h, tokens, d, m, elt) for m in common.MODES},
            bound="matmul",
        )
    if op == "masked_mse":
        pred = _leaf(randn(n, s.num_patches, s.patch_dim))
        imgs = randn(n, s.chans, s.img, s.img)
        return OpCase(
            op,
            case_label(op, s),
            (pred, imgs, mask, s.patch, common.NORM_PIX_LOSS),
            (0,),
            ("loss", "d_pred"),
            torch.rand((), generator=g).to(device=device, dtype=torch.float32) + 0.5,
            {m: None for m in common.MODES},
            {m: common.masked_mse_bytes(s, m, elt, elt) for m in common.MODES},
        )
    if op == "decoder_assembly":
        x = _leaf(randn(n, 1 + s.keep, s.dec_dim))
        mask_token = _leaf(randn(1, 1, s.dec_dim, scale=0.02))
        pos = sincos_2d(s.dec_dim, grid).unsqueeze(0).to(device=device, dtype=dtype)  # [1, 1+L, Dd], fixed
        return OpCase(
            op,
            case_label(op, s),
            (x, ids_restore, mask_token, pos),
            (0, 2),
            ("out", "d_x", "d_mask_token"),
            randn(n, 1 + s.num_patches, s.dec_dim),
            {m: None for m in common.MODES},
            {m: common.decoder_assembly_bytes(s, m, elt) for m in common.MODES},
        )
    raise ValueError(f"op must be one of {common.OPS}, got {op!r}")


def cases_for(op: str, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> list[tuple[str, OpCase]]:
    """``[(stage, case)]``: attention at its encoder and decoder shapes, the other ops once."""
    stages = common.STAGES if op == "attention" else ("",)
    return [(st, make_case(op, shape, device, dtype, st or "encoder")) for st in stages]


# ------------------------------------------------------------------------------------------------- providers


def _raise_recompile_limits() -> None:
    """Each benchmarked shape compiles once (dynamic=False); lift dynamo's per-function recompile cap."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` with static shapes (each benchmarked shape gets its own specialized graph)."""
    _raise_recompile_limits()
    return torch.compile(fn, dynamic=False)


@functools.cache
def compiled_reference(op: str) -> Callable:
    """One compiled wrapper per op for the whole process, so forward and forward+backward rows share its graphs."""
    return compiled(REFERENCE[op])


def sdpa_backend(provider: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_math": SDPBackend.MATH,
    }[provider]


def sdpa_attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None, *, backend) -> torch.Tensor:
    """The eager model's attention from packed qkv, with SDPA restricted to ``backend``."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return ops.sdpa_attention(qkv, num_heads, scale)  # [B, N, H·d]


def kernel_or_unavailable(op: str, device: torch.device) -> Callable:
    kernel = ops.triton_kernel(op)
    if kernel is None:
        raise Unavailable(f"{ops.KERNELS[op][0]} is not present (no Triton kernel for {op} yet)")
    if device.type != "cuda" and not ops.interpreter_on():
        raise Unavailable("Triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU")
    return kernel


def op_provider(op: str, provider: str, device: torch.device) -> Callable:
    """The function measured for ``op`` under ``provider``; raises :class:`Unavailable` with the reason."""
    if provider not in common.OP_PROVIDERS[op]:
        raise ValueError(f"provider for {op} must be one of {common.OP_PROVIDERS[op]}, got {provider!r}")
    if provider == "eager":
        return REFERENCE[op]
    if provider == "compile":
        if device.type != "cuda":
            raise Unavailable(CPU_COMPILE_REASON)
        return compiled_reference(op)
    if provider == "triton":
        return kernel_or_unavailable(op, device)
    if device.type != "cuda" and provider in ("sdpa_efficient", "sdpa_cudnn"):
        raise Unavailable(f"{provider} is a CUDA-only SDPA backend")
    return functools.partial(sdpa_attention, backend=sdpa_backend(provider))


def runner(case: OpCase, fn: Callable, mode: str) -> Callable[[], object]:
    """A no-argument callable running ``fn`` on the case: forward (autograd recording, as in training), or
    forward + ``torch.autograd.grad`` of the differentiated inputs (no gradient accumulation between calls)."""
    if mode == "fwd":
        return lambda: fn(*case.args)
    if mode != "fwd+bwd":
        raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}")
    inputs = case.grad_inputs

    def fwd_bwd():
        out = fn(*case.args)
        return torch.autograd.grad(out, inputs, case.grad_out)

    return fwd_bwd


# -------------------------------------------------------------------------------------------- correctness


def _to_double(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().double().requires_grad_(a.requires_grad)
    return a


def _results(fn: Callable, args: tuple, grad_idx: tuple[int, ...], grad_out: torch.Tensor) -> list[torch.Tensor]:
    out = fn(*args)
    grads = torch.autograd.grad(out, [args[i] for i in grad_idx], grad_out.to(out.dtype))
    return [out.detach(), *[g.detach() for g in grads]]


def check_op(case: OpCase, fn: Callable, dtype: torch.dtype) -> dict:
    """Compare ``fn``'s output and every gradient with the eager op, by the tests' tolerance rule.

    ``max|fn − eager_fp64| ≤ 2·max|eager_low − eager_fp64| + atol(dtype)`` per tensor (tests/tolerance.py),
    with the kernels' outputs NaN-poisoned before launch so unwritten elements show.
    """
    from fastmae.kernels._common import poison_outputs

    from tests.tolerance import ATOL, max_err

    ref = REFERENCE[case.op]
    with poison_outputs():
        got = _results(fn, case.args, case.grad_idx, case.grad_out)
    lo = _results(ref, case.args, case.grad_idx, case.grad_out)
    hi = _results(ref, tuple(_to_double(a) for a in case.args), case.grad_idx, case.grad_out.double())
    rows = []
    for name, g, low, high in zip(case.grad_names, got, lo, hi, strict=True):
        finite = bool(torch.isfinite(g).all())
        shape_ok = tuple(g.shape) == tuple(high.shape)
        err = max_err(g, high) if shape_ok else float("inf")
        eager_err = max_err(low, high)
        bound = 2 * eager_err + ATOL[dtype]
        rows.append(
            {
                "tensor": name,
                "err": err if finite else float("nan"),
                "eager_err": eager_err,
                "bound": bound,
                "ok": bool(finite and shape_ok and err <= bound),
            }
        )
    return {
        "op": case.op,
        "case": case.label,
        "dtype": str(dtype).removeprefix("torch."),
        "tensors": rows,
        "ok": all(r["ok"] for r in rows),
    }


# ----------------------------------------------------------------------------------------------- training step

STEP_CHECK_PARAMS = (
    "patch_embed.proj.weight",
    "cls_token",
    "blocks.0.attn.qkv.weight",
    "norm.weight",
    "decoder_embed.weight",
    "mask_token",
    "decoder_blocks.0.attn.qkv.weight",
    "decoder_pred.weight",
)


@dataclass
class StepCase:
    """One provider's training step: ``step()`` runs forward (bf16 autocast on CUDA), backward and AdamW.

    The optimizer is the one ``training/pretrain.py`` builds (MAE's parameter groups, betas (0.9, 0.95), weight
    decay 0.05, fused on CUDA), the same for every provider.
    """

    provider: str
    step: Callable[[], torch.Tensor]
    kernels: list[str]
    flops: dict[str, float]
    model: torch.nn.Module


def kernels_in_use() -> list[str]:
    """The ops for which fastmae has a Triton kernel (the rest of ``impl="triton"`` runs eager)."""
    return [op for op in common.OPS if ops.triton_kernel(op) is not None]


def build_model(shape: ModelShape, provider: str, device: torch.device) -> torch.nn.Module:
    """``MaskedAutoencoderViT`` for eager/compile, ``fastmae.MAE(impl="triton")`` for triton/triton+compile."""
    if provider.startswith("triton"):
        if device.type != "cuda" and not ops.interpreter_on():
            raise Unavailable("Triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU")
        from fastmae import MAE

        return MAE(**shape.model_kwargs(), impl="triton").to(device)
    return reference.MaskedAutoencoderViT(**shape.model_kwargs()).to(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights, as MAE trains); none on the CPU dry run."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def make_step(shape: ModelShape, provider: str, device: torch.device, seed: int = 0) -> StepCase:
    """A training step at ``shape`` for ``provider`` (see :data:`common.STEP_PROVIDERS`)."""
    if provider not in common.STEP_PROVIDERS:
        raise ValueError(f"step provider must be one of {common.STEP_PROVIDERS}, got {provider!r}")
    if "compile" in provider and device.type != "cuda":
        raise Unavailable(CPU_COMPILE_REASON)
    torch.manual_seed(seed)
    model = build_model(shape, provider, device)
    opt = build_adamw(model, lr=1.5e-4)  # training/pretrain.py's optimizer: MAE's groups, fused on CUDA
    forward = compiled(model) if "compile" in provider else model
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(shape.batch, shape.chans, shape.img, shape.img, generator=g).to(device)  # fp32, as loaded

    def step() -> torch.Tensor:
        with autocast(device):
            loss, _, _ = forward(imgs, shape.mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    kernels = kernels_in_use() if provider.startswith("triton") else []
    return StepCase(provider, step, kernels, common.step_flops(shape), model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_model(shape: ModelShape, device: torch.device, seed: int = 0) -> dict:
    """``MAE(impl="triton")`` against ``MaskedAutoencoderViT`` with the same weights, images and mask.

    Loss, pred and the gradients of :data:`STEP_CHECK_PARAMS`, each by a norm-relative form of the tests' rule:
    ``‖fast − ref_fp64‖/‖ref_fp64‖ ≤ 2·‖ref_low − ref_fp64‖/‖ref_fp64‖ + tol`` (tol 1e-3 under bf16 autocast on
    CUDA, 1e-5 in fp32 on the CPU).
    """
    import copy

    torch.manual_seed(seed)
    ref = reference.MaskedAutoencoderViT(**shape.model_kwargs()).to(device)
    fast = build_model(shape, "triton", device)
    fast.load_state_dict(ref.state_dict())
    ref_hi = copy.deepcopy(ref).double()
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(shape.batch, shape.chans, shape.img, shape.img, generator=g).to(device)
    noise = torch.rand(shape.batch, shape.num_patches, generator=g).to(device)

    def run(model, x, low: bool) -> list[torch.Tensor]:
        with autocast(device) if low else torch.autocast(device.type, enabled=False):
            loss, pred, _ = model(x, shape.mask_ratio, noise)
        loss.backward()
        params = dict(model.named_parameters())
        return [loss.detach(), pred.detach(), *[params[n].grad for n in STEP_CHECK_PARAMS]]

    got, lo, hi = run(fast, imgs, True), run(ref, imgs, True), run(ref_hi, imgs.double(), False)
    tol = 1e-3 if device.type == "cuda" else 1e-5
    rows = []
    for name, a, low, high in zip(("loss", "pred", *STEP_CHECK_PARAMS), got, lo, hi, strict=True):
        err, eager_err = _rel(a, high), _rel(low, high)
        finite = bool(torch.isfinite(a).all())
        bound = 2 * eager_err + tol
        rows.append(
            {
                "tensor": name,
                "err": err if finite else float("nan"),
                "eager_err": eager_err,
                "bound": bound,
                "ok": bool(finite and err <= bound),
            }
        )
    return {
        "op": "model",
        "case": f"{shape.name} batch {shape.batch}, kernels: {', '.join(kernels_in_use()) or 'none'}",
        "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "tensors": rows,
        "ok": all(r["ok"] for r in rows),
    }
