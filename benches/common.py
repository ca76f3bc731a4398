"""Benchmark shapes, the FLOP and byte counts every rate is computed from, and the performance targets.

Shapes: ViT-B/16, ViT-L/16 and ViT-H/14 MAE at batch 256 and mask ratio 0.75 on CUDA (encoder 50 / 50 / 65
tokens, decoder 197 / 197 / 257; head dims 64 / 64 / 80 in the encoder, 32 in the decoder), and one tiny shape for
the CPU dry run (``pytest benches/ --benchmark-disable`` and ``report.py --dry-run``), which checks that every bench
body still runs, not how fast it runs.

Counting conventions (the same numbers for every provider, so rates compare like with like):

- attention: ``4·B·H·N²·d`` FLOPs forward (q·kᵀ and p·v); backward counts ``2.5×`` that (dv, dp, dq, dk plus the
  recomputation of p), so forward+backward is ``3.5×``.
- patch embedding: ``2·N·K·D·C·p²`` FLOPs forward over the K visible patches only (the eager reference embeds all
  L patches: its extra work is not counted); backward computes only the weight gradient (the images need none),
  so forward+backward is ``2×``. Bytes: kept pixels, weight, bias, gathered positional rows, ids and the tokens
  written; backward re-reads the kept pixels, reads the token gradient and writes dW, db, d(cls).
- masked MSE loss: bytes that must move = the masked rows of ``pred`` and their pixels read (plus the mask);
  forward+backward adds ``dpred`` written in full (zeros on visible rows), and reads each masked row once only.
- decoder assembly: forward reads x, ids_restore and the positional table and writes ``[N, 1+L, Dd]``; backward
  reads the output gradient and ids_restore and writes dx and d(mask_token).
- training step: model FLOPs = matmul FLOPs only (norms, softmax, elementwise work and the optimizer are not
  counted): per image, forward = patch embedding ``2·K·C·p²·D`` + per encoder block over ``n = 1+K`` tokens
  ``2·n·(4D² + 2·r·D²) + 4·n²·D`` + decoder_embed ``2·n·D·Dd`` + per decoder block over ``m = 1+L`` tokens
  ``2·m·(4Dd² + 2·r·Dd²) + 4·m²·Dd`` + decoder_pred ``2·m·Dd·p²C``; the step counts ``3×`` the forward
  (backward = input and weight gradients, no recomputation) except the patch embedding, ``2×`` (no image
  gradient). MFU = step FLOPs / step time / the card's measured bf16 matmul rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fastmae import get_config

HAS_CUDA = torch.cuda.is_available()

MODES = ("fwd", "fwd+bwd")
STAGES = ("encoder", "decoder")
OPS = ("patch_embed", "attention", "masked_mse", "decoder_assembly")

# Providers. "eager" is fastmae/reference.py (its ops, MaskedAutoencoderViT for the step); "compile" is
# torch.compile of it; "triton" is fastmae's kernel (MAE(impl="triton") for the step); "triton+compile" is
# torch.compile of MAE(impl="triton"). Attention is also measured on each SDPA backend, chosen explicitly.
SDPA_PROVIDERS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")
OP_PROVIDERS = {
    "patch_embed": ("eager", "compile", "triton"),
    "attention": ("eager", "compile", "triton", *SDPA_PROVIDERS),
    "masked_mse": ("eager", "compile", "triton"),
    "decoder_assembly": ("eager", "compile", "triton"),
}
STEP_PROVIDERS = ("eager", "compile", "triton", "triton+compile")

# The loss as the paper's best recipe trains it.
NORM_PIX_LOSS = True


@dataclass(frozen=True)
class ModelShape:
    """One MAE architecture at one batch size: everything a benchmark needs to build inputs and count work."""

    name: str
    img: int
    patch: int
    dim: int
    depth: int
    heads: int
    dec_dim: int
    dec_depth: int
    dec_heads: int
    batch: int
    chans: int = 3
    mask_ratio: float = 0.75
    mlp_ratio: float = 4.0

    @property
    def num_patches(self) -> int:
        return (self.img // self.patch) ** 2

    @property
    def keep(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.chans

    def attn(self, stage: str) -> tuple[int, int, int, int]:
        """``(B, H, N, d)`` of the encoder's or the decoder's attention."""
        if stage == "encoder":
            return self.batch, self.heads, 1 + self.keep, self.dim // self.heads
        if stage == "decoder":
            return self.batch, self.dec_heads, 1 + self.num_patches, self.dec_dim // self.dec_heads
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")

    def model_kwargs(self) -> dict:
        """Constructor keywords shared by ``MaskedAutoencoderViT`` and ``fastmae.MAE``."""
        return dict(
            img_size=self.img,
            patch_size=self.patch,
            in_chans=self.chans,
            embed_dim=self.dim,
            depth=self.depth,
            num_heads=self.heads,
            decoder_embed_dim=self.dec_dim,
            decoder_depth=self.dec_depth,
            decoder_num_heads=self.dec_heads,
            mlp_ratio=self.mlp_ratio,
            norm_pix_loss=NORM_PIX_LOSS,
        )

    @classmethod
    def from_config(cls, name: str, config: str, batch: int) -> ModelShape:
        """The shape of fastmae's named config (see :func:`fastmae.list_configs`) at ``batch``."""
        c = get_config(config)
        return cls(
            name, c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.decoder_embed_dim,
            c.decoder_depth, c.decoder_num_heads, batch, chans=c.in_chans, mlp_ratio=c.mlp_ratio,
        )  # fmt: skip

    def with_batch(self, batch: int) -> ModelShape:
        return ModelShape(**{**asdict(self), "batch": batch})

    def describe(self) -> str:
        return f"{self.name} (img {self.img}, p {self.patch}, D {self.dim}, batch {self.batch})"


GPU_MODELS = {
    "vit_b16": ModelShape.from_config("vit_b16", "mae_vit_base_patch16", batch=256),
    "vit_l16": ModelShape.from_config("vit_l16", "mae_vit_large_patch16", batch=256),
    "vit_h14": ModelShape.from_config("vit_h14", "mae_vit_huge_patch14", batch=256),
}
# The CPU dry run: 16 patches of 8×8×3, 4 visible; encoder 5 tokens (head dim 32), decoder 17 tokens (head dim 16).
TINY_MODELS = {"tiny": ModelShape("tiny", 32, 8, 64, 2, 2, 32, 1, 2, batch=2)}
ALL_MODELS = {**GPU_MODELS, **TINY_MODELS}


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA. fp32 on the CPU: the Triton interpreter does not compute bf16 dots correctly."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------- FLOPs and bytes


def attention_flops(b: int, h: int, n: int, d: int, mode: str) -> float:
    fwd = 4.0 * b * h * n * n * d
    return fwd if mode == "fwd" else 3.5 * fwd


def attention_bytes(b: int, h: int, n: int, d: int, mode: str, elt: int) -> float:
    """qkv read and the output written; backward reads qkv, out, dout (+ lse) and writes dqkv."""
    fwd = b * n * h * d * elt * (3 + 1) + b * h * n * 4
    bwd = b * n * h * d * elt * (3 + 1 + 1 + 3) + b * h * n * 4
    return fwd if mode == "fwd" else fwd + bwd


def patch_embed_flops(s: ModelShape, mode: str) -> float:
    fwd = 2.0 * s.batch * s.keep * s.dim * s.patch_dim
    return fwd if mode == "fwd" else 2.0 * fwd


def patch_embed_bytes(s: ModelShape, mode: str, elt: int) -> float:
    n, k, d, kp = s.batch, s.keep, s.dim, s.patch_dim
    params = (d * kp + d + d) * elt  # weight, bias, cls_token
    fwd = n * k * kp * elt + params + n * k * d * elt + n * k * 8 + n * (1 + k) * d * elt
    bwd = n * (1 + k) * d * elt + n * k * kp * elt + n * k * 8 + params
    return fwd if mode == "fwd" else fwd + bwd


def masked_mse_bytes(s: ModelShape, mode: str, pred_elt: int, img_elt: int) -> float:
    n, masked, length, kp = s.batch, s.num_patches - s.keep, s.num_patches, s.patch_dim
    fwd = n * masked * kp * (pred_elt + img_elt) + n * length * 4  # masked pred rows + their pixels + the mask
    return fwd if mode == "fwd" else fwd + n * length * kp * pred_elt  # + dpred written


def decoder_assembly_bytes(s: ModelShape, mode: str, elt: int) -> float:
    n, k, length, dd = s.batch, s.keep, s.num_patches, s.dec_dim
    fwd = n * (1 + k) * dd * elt + n * length * 8 + (1 + length) * dd * elt + n * (1 + length) * dd * elt
    bwd = n * (1 + length) * dd * elt + n * length * 8 + n * (1 + k) * dd * elt + dd * elt
    return fwd if mode == "fwd" else fwd + bwd


def step_flops(s: ModelShape) -> dict[str, float]:
    """Model FLOPs of one training step (see the module docstring).

    Returns:
        ``forward`` (the batch's forward), ``forward_attention`` (its q·kᵀ and p·v part), ``step`` and
        ``per_image`` (the step's FLOPs per image).
    """
    r, d, dd = s.mlp_ratio, s.dim, s.dec_dim
    n, m = 1 + s.keep, 1 + s.num_patches
    embed = 2.0 * s.keep * s.patch_dim * d
    enc = s.depth * (2.0 * n * (4 * d * d + 2 * r * d * d) + 4.0 * n * n * d)
    dec_embed = 2.0 * n * d * dd
    dec = s.dec_depth * (2.0 * m * (4 * dd * dd + 2 * r * dd * dd) + 4.0 * m * m * dd)
    pred = 2.0 * m * dd * s.patch_dim
    rest = enc + dec_embed + dec + pred
    per_image = 3.0 * rest + 2.0 * embed
    attention = s.depth * 4.0 * n * n * d + s.dec_depth * 4.0 * m * m * dd
    return {
        "forward": s.batch * (embed + rest),
        "forward_attention": s.batch * attention,
        "step": s.batch * per_image,
        "per_image": per_image,
    }


# ------------------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """A performance target: ``metric`` of fastmae's provider in ``section`` compared with ``threshold``."""

    section: str
    metric: str  # "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_best_sdpa", "pct_copy", "peak_ratio", "mfu"
    threshold: float
    models: tuple[str, ...] = ()  # empty: every model measured
    higher_is_better: bool = True
    mode: str = "fwd+bwd"
    note: str = ""

    def describe(self) -> str:
        what = {
            "speedup_vs_eager": f"≥ {self.threshold:g}× eager",
            "speedup_vs_compile": f"≥ {self.threshold:g}× torch.compile",
            "speedup_vs_best_sdpa": f"≥ {self.threshold:g}× the best SDPA backend",
            "pct_copy": f"≥ {self.threshold:.0%} of copy bandwidth",
            "peak_ratio": f"peak memory ≤ {self.threshold:g}× eager",
            "mfu": f"MFU ≥ {self.threshold:.0%}",
        }[self.metric]
        where = "training step" if self.section == "step" else f"{self.section} {self.mode}"
        return f"{where}: {what}" + (f" ({self.note})" if self.note else "")


TARGETS = (
    Target("patch_embed", "speedup_vs_eager", 3.0),
    Target("patch_embed", "speedup_vs_compile", 1.0, note="faster than compile"),
    Target("attention", "speedup_vs_best_sdpa", 1.2, note="encoder and decoder shapes"),
    Target("masked_mse", "pct_copy", 0.70),
    Target("masked_mse", "speedup_vs_eager", 4.0),
    Target("decoder_assembly", "speedup_vs_eager", 2.0),
    Target("step", "speedup_vs_eager", 1.6, models=("vit_b16",), mode="step"),
    Target("step", "speedup_vs_compile", 1.2, models=("vit_b16",), mode="step"),
    Target("step", "peak_ratio", 0.75, models=("vit_b16",), higher_is_better=False, mode="step"),
    Target("step", "mfu", 0.45, models=("vit_b16",), mode="step"),
    Target("step", "mfu", 0.55, models=("vit_l16",), mode="step"),
)


def model_params() -> list:
    """pytest params for the model shapes: the GPU sizes (skipped without CUDA), plus ``tiny`` on the CPU."""
    import pytest

    reason = "GPU size: needs CUDA (the CPU dry run uses the 'tiny' size)"
    params = [pytest.param(n, id=n, marks=pytest.mark.skipif(not HAS_CUDA, reason=reason)) for n in GPU_MODELS]
    if not HAS_CUDA:
        params.append(pytest.param("tiny", id="tiny"))
    return params
