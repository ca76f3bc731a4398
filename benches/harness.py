"""What ``bench_*.py`` (pytest-benchmark) and ``report.py`` share: shapes, inputs, counts, providers, timing, checks.

Shapes: ViT-B/16, ViT-L/16 and ViT-H/14 MAE at batch 256, mask ratio 0.75, bf16 on CUDA; a tiny one in fp32 for
the CPU dry run (Triton kernels under the interpreter), which shows that every body runs, not how fast. Providers:
``eager`` (fastmae/reference.py), ``compile`` (``torch.compile`` of it), ``triton`` (fastmae's kernel), for the
block and the step ``triton+compile``, for the step ``triton+graphs`` (the step captured in a CUDA graph, as
``pretrain.py --cuda-graphs`` runs it) and ``triton+reduce-overhead`` (``torch.compile(mode="reduce-overhead")``), for
attention each SDPA backend (``sdpa_*``). Counts: BENCHMARKS.md, "What the rates count".

Adding an op, say ``softmax``: write ``_softmax(s, stage, dtype, device) -> Case`` (fresh random inputs,
differentiated ones as leaves, the output gradient, the counts), add ``"softmax": Op(reference.softmax, _softmax)`` to
:data:`OPS` (its kernel is ``fastmae.ops.KERNELS["softmax"]``; an op that fastmae builds from several kernels, like
the block of benches/harness_block.py, names its function, module and kernels in ``Op.fused``, ``fused_module`` and
``kernels``), copy ``bench_masked_mse.py`` to ``bench_softmax.py`` with the name changed, and add its target to
``report.TARGETS`` and its name to ``report.OP_SECTIONS``; the report's checks, tables and results follow from
:data:`OPS`.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import gc
import itertools
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benches import harness_block
from fastmae import MAE, get_config, ops, reference
from fastmae import step as steps
from fastmae.configs import MAEConfig
from fastmae.kernels._common import interpreting
from fastmae.masking import num_kept, random_masking
from fastmae.pos_embed import sincos_2d
from fastmae.schedule import build_adamw

HAS_CUDA = torch.cuda.is_available()
MODES = ("fwd", "fwd+bwd")
MODEL_PROVIDERS = ("eager", "compile", "triton", "triton+compile")
STEP_PROVIDERS = (*MODEL_PROVIDERS, "triton+graphs", "triton+reduce-overhead")
SDPA = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}
NORM_PIX_LOSS = True  # the loss as the paper's best recipe trains it
MIB = 1024**2
NO_CPU_COMPILE = (
    "torch.compile providers run on CUDA only: on the CPU, inductor's C++ backend took 9-27 s per op shape here "
    "(too slow for the dry run), and compiling over kernels run by the Triton interpreter fails"
)


class Unavailable(Exception):
    """A provider that cannot run here; the message says why (reported as a skip, never as a result)."""


@dataclass(frozen=True)
class Shape:
    """One MAE config at one batch size."""

    name: str
    cfg: MAEConfig
    batch: int
    mask_ratio: float = 0.75

    @property
    def patches(self) -> tuple[int, int, int]:
        """``(L, K, P)``: patches per image, visible ones, values per patch (``p²·C``)."""
        c = self.cfg
        length = (c.img_size // c.patch_size) ** 2
        return length, num_kept(length, self.mask_ratio), c.patch_size**2 * c.in_chans

    def images(self, device: torch.device) -> torch.Tensor:
        c = self.cfg
        return torch.randn(self.batch, c.in_chans, c.img_size, c.img_size, device=device)  # [N, C, H, W]

    def describe(self) -> str:
        c = self.cfg
        return f"{self.name} (img {c.img_size}, p {c.patch_size}, D {c.embed_dim}, batch {self.batch})"


GPU_MODELS = {
    "vit_b16": Shape("vit_b16", get_config("mae_vit_base_patch16"), 256),
    "vit_l16": Shape("vit_l16", get_config("mae_vit_large_patch16"), 256),
    "vit_h14": Shape("vit_h14", get_config("mae_vit_huge_patch14"), 256),
}
# 16 patches of 8×8×3, 4 visible; encoder 5 tokens (head dim 32), decoder 17 tokens (head dim 16).
TINY_MODELS = {"tiny": Shape("tiny", MAEConfig(32, 8, 64, 2, 2, 32, 1, 2), 2)}
MODELS = {**GPU_MODELS, **TINY_MODELS}


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on the CPU, where the Triton interpreter does not compute bf16 dots correctly."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------------------- ops


@dataclass
class Case:
    """One op's inputs at one shape, the gradient it is differentiated with, and the work it counts."""

    label: str
    args: tuple
    grad_idx: tuple[int, ...]  # the differentiated arguments
    names: tuple[str, ...]  # the checked tensors: the output, then each gradient
    grad_out: torch.Tensor
    flops: dict[str, float | None]
    nbytes: dict[str, float]
    bound: str  # the ceiling the op is judged by: "matmul" or "copy"


def _rand(device, dtype, *size: int, scale: float = 1.0, leaf: bool = False) -> torch.Tensor:
    return (torch.randn(*size, device=device) * scale).to(dtype).requires_grad_(leaf)


def _pos(dim: int, s: Shape, dtype, device) -> torch.Tensor:
    return sincos_2d(dim, (s.cfg.img_size // s.cfg.patch_size,) * 2)[None].to(device, dtype)  # [1, 1+L, dim], fixed


def _patch_embed(s: Shape, stage: str, dtype, device) -> Case:
    (length, k, kp), d, n, e = s.patches, s.cfg.embed_dim, s.batch, dtype.itemsize
    ids_keep = random_masking(n, length, s.mask_ratio, device).ids_keep
    p = s.cfg.patch_size
    weight = _rand(device, dtype, d, s.cfg.in_chans, p, p, scale=kp**-0.5, leaf=True)
    bias, cls = (_rand(device, dtype, *size, scale=0.02, leaf=True) for size in ((d,), (1, 1, d)))
    args = (s.images(device).to(dtype), ids_keep, weight, bias, _pos(d, s, dtype, device), cls)
    fwd = 2.0 * n * k * d * kp  # the visible patches only; backward computes dW only (the images need none)
    params = (d * kp + 2 * d) * e
    fwd_b = n * k * kp * e + params + n * k * d * e + n * k * 8 + n * (1 + k) * d * e
    bwd_b = n * (1 + k) * d * e + n * k * kp * e + n * k * 8 + params
    grad = _rand(device, dtype, n, 1 + k, d)
    names = ("out", "d_weight", "d_bias", "d_cls_token")
    return Case(f"N={n} K={k} D={d} p={p}", args, (2, 3, 5), names, grad, {"fwd": fwd, "fwd+bwd": 2 * fwd},
                {"fwd": fwd_b, "fwd+bwd": fwd_b + bwd_b}, "matmul")  # fmt: skip


def _attention(s: Shape, stage: str, dtype, device) -> Case:
    c, (length, k, _), b = s.cfg, s.patches, s.batch
    if stage == "encoder":
        h, n, d = c.num_heads, 1 + k, c.embed_dim // c.num_heads
    else:
        h, n, d = c.decoder_num_heads, 1 + length, c.decoder_embed_dim // c.decoder_num_heads
    fwd = 4.0 * b * h * n * n * d  # q·kᵀ and p·v; backward 2.5× that (dv, dp, dq, dk and p recomputed)
    fwd_b = b * n * h * d * dtype.itemsize * 4 + b * h * n * 4  # qkv read, out written, lse
    bwd_b = b * n * h * d * dtype.itemsize * 8 + b * h * n * 4  # qkv, out, dout and lse read, dqkv written
    qkv, grad = _rand(device, dtype, b, n, 3 * h * d, leaf=True), _rand(device, dtype, b, n, h * d)
    return Case(f"{stage} B={b} H={h} N={n} d={d}", (qkv, h), (0,), ("out", "d_qkv"), grad,
                {"fwd": fwd, "fwd+bwd": 3.5 * fwd}, {"fwd": fwd_b, "fwd+bwd": fwd_b + bwd_b}, "matmul")  # fmt: skip


def _masked_mse(s: Shape, stage: str, dtype, device) -> Case:
    (length, k, kp), n, e = s.patches, s.batch, dtype.itemsize
    mask = random_masking(n, length, s.mask_ratio, device).mask
    args = (_rand(device, dtype, n, length, kp, leaf=True), s.images(device).to(dtype), mask, s.cfg.patch_size)
    # the masked pred rows and their pixels, the mask, and dpred written in full: the kernel forms dpred in its
    # forward (pred requires grad), and the backward of ``loss.backward()`` (an upstream gradient of 1, which the
    # training step gives an unscaled loss) moves nothing more
    moved = n * (length - k) * kp * 2 * e + n * length * 4 + n * length * kp * e
    return Case(f"N={n} L={length} masked={length - k} P={kp}", (*args, NORM_PIX_LOSS), (0,), ("loss", "d_pred"),
                torch.ones((), device=device), dict.fromkeys(MODES), dict.fromkeys(MODES, moved), "copy")  # fmt: skip


def _decoder_assembly(s: Shape, stage: str, dtype, device) -> Case:
    (length, k, _), dd, n, e = s.patches, s.cfg.decoder_embed_dim, s.batch, dtype.itemsize
    x, token = _rand(device, dtype, n, 1 + k, dd, leaf=True), _rand(device, dtype, 1, 1, dd, scale=0.02, leaf=True)
    ids_restore = random_masking(n, length, s.mask_ratio, device).ids_restore
    fwd_b = n * (1 + k) * dd * e + n * length * 8 + (1 + length) * dd * e + n * (1 + length) * dd * e
    bwd_b = n * (1 + length) * dd * e + n * length * 8 + n * (1 + k) * dd * e + dd * e
    return Case(f"N={n} K={k} L={length} Dd={dd}", (x, ids_restore, token, _pos(dd, s, dtype, device)), (0, 2),
                ("out", "d_x", "d_mask_token"), _rand(device, dtype, n, 1 + length, dd), dict.fromkeys(MODES),
                {"fwd": fwd_b, "fwd+bwd": fwd_b + bwd_b}, "copy")  # fmt: skip


def _block(s: Shape, stage: str, dtype, device) -> Case:
    return Case(**harness_block.block_case(s, stage, device))  # fp32 under bf16 autocast on CUDA, whatever dtype


@dataclass(frozen=True)
class Op:
    """A benchmarked op: its eager form, its case builder, its shapes (``stages``) and providers; ``fused``: fastmae's
    form when it is not one kernel of ``fastmae.ops.KERNELS`` but a module (``fused_module``) built on the kernels
    ``kernels``."""

    reference: Callable
    make: Callable[[Shape, str, torch.dtype, torch.device], Case]
    stages: tuple[str, ...] = ("",)
    providers: tuple[str, ...] = ("eager", "compile", "triton")
    fused: Callable | None = None
    fused_module: str = ""
    kernels: tuple[str, ...] = ()


BLOCK = Op(harness_block.block_reference, _block, ("encoder", "decoder"), (*MODEL_PROVIDERS[:3], "triton+compile"),
           harness_block.fused_block, "fastmae.layers.Block", ("layer_norm", "gelu", "attention"))  # fmt: skip

# The one place an op's name meets its functions (the kernel: fastmae.ops.KERNELS[name]).
OPS = {
    "patch_embed": Op(reference.patch_embed, _patch_embed),
    "attention": Op(reference.attention, _attention, ("encoder", "decoder"), ("eager", "compile", "triton", *SDPA)),
    "masked_mse": Op(reference.masked_mse, _masked_mse),
    "decoder_assembly": Op(reference.decoder_assembly, _decoder_assembly),
    "block": BLOCK,
}


def make_case(op: str, shape: Shape, device: torch.device, dtype: torch.dtype, stage: str = "") -> Case:
    """Fresh random inputs for ``op`` at ``shape`` (``stage``: attention's "encoder" or "decoder")."""
    return OPS[op].make(shape, stage or OPS[op].stages[0], dtype, device)


def kernel_module(op: str) -> str | None:
    """The module of ``op``'s Triton kernel (or of the module built on its kernels), or None when fastmae has none."""
    spec = OPS.get(op)
    if spec is not None and spec.fused is not None:
        return spec.fused_module if all(ops.triton_kernel(k) is not None for k in spec.kernels) else None
    return ops.KERNELS[op][0] if ops.triton_kernel(op) is not None else None


def _need_triton(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise Unavailable("Triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU")


def kernel(op: str, device: torch.device) -> Callable:
    """fastmae's Triton kernel for ``op``; :class:`Unavailable` when it is missing or cannot run here."""
    spec = OPS.get(op)
    if kernel_module(op) is None:
        missing = ", ".join(spec.kernels) if spec and spec.fused else ops.KERNELS[op][0]
        raise Unavailable(f"{missing}: not present (no Triton kernel for {op} yet)")
    _need_triton(device)
    return spec.fused if spec and spec.fused else ops.triton_kernel(op)


def compiled(fn: Callable, mode: str | None = None) -> Callable:
    """``torch.compile(fn, dynamic=False, mode=mode)``: a graph per benchmarked shape, past dynamo's caps."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(fn, dynamic=False, mode=mode)


@functools.cache
def _compiled_reference(op: str, fused: bool = False) -> Callable:
    # one wrapper per op: forward and forward+backward rows share its graphs
    return compiled(OPS[op].fused if fused else OPS[op].reference)


def _sdpa(qkv: torch.Tensor, num_heads: int, *, backend: str) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)):
        return reference.sdpa_attention(qkv, num_heads)  # the eager model's permutes around SDPA: [B, N, H·d]


def provider_fn(op: str, provider: str, device: torch.device) -> Callable:
    """The function measured for ``op`` under ``provider``, with the eager op's signature."""
    if provider not in OPS[op].providers:
        raise ValueError(f"provider for {op} must be one of {OPS[op].providers}, got {provider!r}")
    if provider == "triton":
        return kernel(op, device)
    if device.type != "cuda" and provider in ("compile", "triton+compile", "sdpa_efficient", "sdpa_cudnn"):
        raise Unavailable(NO_CPU_COMPILE if "compile" in provider else f"{provider} is a CUDA-only SDPA backend")
    if provider.startswith("sdpa_"):
        return functools.partial(_sdpa, backend=SDPA[provider])
    if provider == "triton+compile":
        kernel(op, device)
        return _compiled_reference(op, fused=True)
    return _compiled_reference(op) if provider == "compile" else OPS[op].reference


# ------------------------------------------------------------------------------------------------- benches


@dataclass
class Bench:
    """One measurable call: an op at one shape, mode and provider, or a training step of ``images`` images."""

    run: Callable[[], object]
    label: str
    flops: float | None
    nbytes: float | None
    bound: str
    images: int | None = None
    kernels: list[str] | None = None


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights, as MAE trains); none on the CPU dry run."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def build_model(shape: Shape, provider: str, device: torch.device) -> torch.nn.Module:
    """``MaskedAutoencoderViT`` for eager/compile, ``fastmae.MAE(impl="triton")`` for the ``triton*`` providers."""
    kwargs = shape.cfg.kwargs() | {"norm_pix_loss": NORM_PIX_LOSS}
    if not provider.startswith("triton"):
        return reference.MaskedAutoencoderViT(**kwargs).to(device)
    _need_triton(device)
    return MAE(**kwargs, impl="triton").to(device)


def kernels_in_use() -> list[str]:
    """The ops for which fastmae has a Triton kernel (the rest of ``impl="triton"`` runs eager)."""
    return [op for op in OPS if kernel_module(op)]


def step_flops(s: Shape) -> dict[str, float]:
    """Model (matmul) FLOPs: ``forward`` and its ``forward_attention`` part for the batch, and ``step``: 3× forward,
    but 2× for the patch embedding (the images need no gradient)."""
    c, (length, k, kp) = s.cfg, s.patches
    r, d, dd, n, m = c.mlp_ratio, c.embed_dim, c.decoder_embed_dim, 1 + k, 1 + length
    embed = 2.0 * k * kp * d
    attention = c.depth * 4.0 * n * n * d + c.decoder_depth * 4.0 * m * m * dd
    linear = c.depth * 2.0 * n * (4 + 2 * r) * d * d + 2.0 * n * d * dd
    linear += c.decoder_depth * 2.0 * m * (4 + 2 * r) * dd * dd + 2.0 * m * dd * kp
    forward, step = s.batch * (embed + linear + attention), s.batch * (3.0 * (linear + attention) + 2.0 * embed)
    return {"forward": forward, "forward_attention": s.batch * attention, "step": step}


def make_bench(op: str, shape: Shape, stage: str, mode: str, provider: str, device: torch.device) -> Bench:
    """``op`` of :data:`OPS` in ``mode``; or ``"step"``: forward under autocast, backward, training/pretrain.py's
    AdamW (MAE's parameter groups, fused on CUDA); ``triton+graphs`` runs it as ``fastmae.step.GraphedStep`` (which
    also computes the gradient norm, as pretrain.py's step does)."""
    torch.manual_seed(0)
    if op != "step":
        fn = provider_fn(op, provider, device)
        c = make_case(op, shape, device, bench_dtype(device), stage)
        if mode == "fwd":  # autograd records, as in training
            run = functools.partial(fn, *c.args)
        else:  # nothing accumulates between calls
            run = lambda: torch.autograd.grad(fn(*c.args), [c.args[i] for i in c.grad_idx], c.grad_out)
        return Bench(run, c.label, c.flops[mode], c.nbytes[mode], c.bound)
    if provider not in STEP_PROVIDERS:
        raise ValueError(f"step provider must be one of {STEP_PROVIDERS}, got {provider!r}")
    if provider != "triton" and provider != "eager" and device.type != "cuda":
        raise Unavailable(NO_CPU_COMPILE if "compile" in provider else f"{provider} needs CUDA (CUDA graphs)")
    model = build_model(shape, provider, device)
    opt = build_adamw(model, lr=1.5e-4)
    imgs, kernels = shape.images(device), kernels_in_use() if provider.startswith("triton") else []  # fp32, as loaded
    if provider == "triton+graphs":  # pretrain.py --cuda-graphs: one replay per step, new masks each time
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        graphed = steps.GraphedStep(steps.TrainStep(model, model, opt, scaler, torch.bfloat16, shape.mask_ratio,
                                                    False, 1, None, device))  # fmt: skip
        seeds = itertools.count()
        return Bench(lambda: graphed([imgs], [next(seeds)], 1.5e-4), f"batch {shape.batch}",
                     step_flops(shape)["step"], None, "matmul", shape.batch, kernels)  # fmt: skip
    mode = "reduce-overhead" if provider.endswith("reduce-overhead") else None
    forward = compiled(model, mode) if "compile" in provider or mode else model

    def step() -> torch.Tensor:
        if mode:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device):
            loss, _, _ = forward(imgs, shape.mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return Bench(step, f"batch {shape.batch}", step_flops(shape)["step"], None, "matmul", shape.batch, kernels)


PARAMS = "model,stage,mode,provider"


def params(op: str) -> list:
    """pytest params (:data:`PARAMS`) of ``op``'s benches (or ``"step"``'s): the GPU sizes, skipped with the reason
    when there is no CUDA, and on the CPU the tiny size."""
    import pytest

    skip = pytest.mark.skipif(not HAS_CUDA, reason="GPU size: needs CUDA (the CPU dry run uses the 'tiny' size)")
    models = [*GPU_MODELS] + ([] if HAS_CUDA else ["tiny"])
    axes = (("",), ("step",), STEP_PROVIDERS) if op == "step" else (OPS[op].stages, MODES, OPS[op].providers)
    return [
        pytest.param(*p, id="-".join(x for x in p if x not in ("", "step")), marks=skip if p[0] in GPU_MODELS else ())
        for p in itertools.product(models, *axes)
    ]


def release(op: str, provider: str, device: torch.device) -> None:
    """Free what a measurement held: a step's model (and its compiled graphs), the allocator's cached blocks."""
    if op == "step":
        if "compile" in provider or "reduce-overhead" in provider:
            torch._dynamo.reset()
        gc.collect()  # a model's reference cycles; about 0.5 s, so not after every op row
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: float = 100) -> float:
    """``triton.testing.do_bench``'s median on CUDA (L2 flushed between repetitions); one plain call on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def numbers(b: Bench, ms: float, ceilings: dict | None, device: torch.device) -> dict:
    """Rates from a time (TFLOP/s, GB/s, their fractions of the measured ceilings; images/s and MFU for a step),
    and the peak allocated MiB of one more call, in total and above what was allocated before it."""
    sec, c = ms * 1e-3, ceilings or {}
    out: dict = {"ms": ms, "tflops": b.flops / sec / 1e12 if b.flops else None}
    out["gbps"] = b.nbytes / sec / 1e9 if b.nbytes else None
    out["pct_matmul"] = out["tflops"] / c["matmul_tflops"] if out["tflops"] and c.get("matmul_tflops") else None
    out["pct_copy"] = out["gbps"] / c["copy_gbps"] if out["gbps"] and c.get("copy_gbps") else None
    out["pct_ceiling"] = out[f"pct_{b.bound}"]
    if b.images:
        out.update(images_per_s=b.images / sec, mfu=out["pct_matmul"], kernels=b.kernels)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        b.run()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_mib=peak / MIB, peak_extra_mib=(peak - before) / MIB)
    return out


def measure(b: Bench, device: torch.device, ceilings: dict | None) -> dict:
    """Warm-up calls (compilation, autotuning), then the median time and its :func:`numbers`."""
    for _ in range((3 if b.images else 2) if device.type == "cuda" else 1):
        b.run()
    sync(device)
    return numbers(b, time_ms(b.run, device, rep_ms=800 if b.images else 50), ceilings, device)


def measure_ceilings(device: torch.device, dry_run: bool = False) -> dict:
    """The card's copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s), measured on random data.

    CUDA: a 1 GiB device-to-device copy and an 8192³ bf16 matmul (``dry_run``: 64 MiB, 2048³). CPU: a 16 MiB copy
    and a 256³ fp32 matmul, only so that the dry run exercises the same code.
    """
    if device.type == "cuda":
        mib, n, dtype = (64, 2048, torch.bfloat16) if dry_run else (1024, 8192, torch.bfloat16)
    else:
        mib, n, dtype = 16, 256, torch.float32
    src = torch.rand(mib * MIB // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)  # library set-up outside the timing
    copy_ms, mm_ms = time_ms(lambda: dst.copy_(src), device, 200), time_ms(lambda: a @ b, device, 200)
    return {
        "copy_gbps": 2 * mib * MIB / (copy_ms * 1e-3) / 1e9,
        "matmul_tflops": 2.0 * n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_desc": f"{'device-to-device' if device.type == 'cuda' else 'host'} copy of {mib} MiB (read + write)",
        "matmul_desc": f"{n}³ {str(dtype).removeprefix('torch.')} matmul",
    }


# ------------------------------------------------------------------------------------------------ correctness


def _verdict(names, got, low, high, err_fn, tol: float) -> dict:
    """The tests' rule per tensor: ``err(got, high) ≤ 2·err(low, high) + tol``, and every value finite."""
    rows = []
    for name, g, lo, hi in zip(names, got, low, high, strict=True):
        finite = bool(torch.isfinite(g).all()) and g.shape == hi.shape
        err, eager_err = (err_fn(g, hi) if finite else None), err_fn(lo, hi)
        bound = 2 * eager_err + tol
        rows.append({"tensor": name, "err": err, "eager_err": eager_err, "bound": bound, "ok": finite and err <= bound})
    return {"tensors": rows, "ok": all(r["ok"] for r in rows)}


def check_op(op: str, case: Case, fn: Callable, dtype: torch.dtype) -> dict:
    """``fn``'s output and every gradient against the eager op, with outputs NaN-poisoned before launch, by
    tests/tolerance.py's rule: ``max|fn − eager_fp64| ≤ 2·max|eager_low − eager_fp64| + atol(dtype)``."""
    from fastmae.kernels._common import poison_outputs
    from tests.tolerance import ATOL, max_err

    def outputs(f, args, grad_out):
        out = f(*args)
        return [out.detach(), *torch.autograd.grad(out, [args[i] for i in case.grad_idx], grad_out.to(out.dtype))]

    def double(a):
        return a.detach().double().requires_grad_(a.requires_grad) if torch.is_floating_point(a) else a

    with poison_outputs():
        got = outputs(fn, case.args, case.grad_out)
    ref, hi_args = OPS[op].reference, [double(a) if torch.is_tensor(a) else a for a in case.args]
    low, high = outputs(ref, case.args, case.grad_out), outputs(ref, hi_args, case.grad_out.double())
    return _verdict(case.names, got, low, high, max_err, ATOL[dtype])


CHECKED_PARAMS = ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "norm.weight")
CHECKED_PARAMS += ("decoder_embed.weight", "mask_token", "decoder_blocks.0.attn.qkv.weight", "decoder_pred.weight")


def check_model(shape: Shape, device: torch.device) -> dict:
    """``MAE(impl="triton")`` against ``MaskedAutoencoderViT``, same weights, images and mask: loss, pred and the
    gradients of :data:`CHECKED_PARAMS`, by the rule's norm-relative form (tol 1e-3 under bf16 autocast, 1e-5)."""
    torch.manual_seed(0)
    ref = build_model(shape, "eager", device)
    fast, ref_hi = build_model(shape, "triton", device), copy.deepcopy(ref).double()
    fast.load_state_dict(ref.state_dict())
    imgs, noise = shape.images(device), torch.rand(shape.batch, shape.patches[0], device=device)

    def run(model, x, low: bool) -> list[torch.Tensor]:
        with autocast(device) if low else torch.autocast(device.type, enabled=False):
            loss, pred, _ = model(x, shape.mask_ratio, noise)
        loss.backward()
        params = dict(model.named_parameters())
        return [loss.detach(), pred.detach(), *[params[n].grad for n in CHECKED_PARAMS]]

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    got, low, high = run(fast, imgs, True), run(ref, imgs, True), run(ref_hi, imgs.double(), False)
    return _verdict(("loss", "pred", *CHECKED_PARAMS), got, low, high, rel, 1e-3 if device.type == "cuda" else 1e-5)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on: date, card, versions, driver and fastmae's commit."""
    import triton

    def first_line(*cmd: str) -> str | None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout
        except OSError:
            return None
        return out.strip().splitlines()[0] if out.strip() else None

    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "driver": first_line("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") if cuda else None,
        "fastmae_commit": first_line("git", "describe", "--always", "--dirty"),
    }
