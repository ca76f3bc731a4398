"""The transformer block row of the benchmarks: timm's eager ``Block`` against fastmae's fused one.

Both run as functions of the input and the block's parameters (``torch.func.functional_call`` on a parameterless
template), so that the checks differentiate and compare every parameter and ``torch.compile`` traces a plain
function. The inputs are what a block of MAE sees in training: an fp32 residual stream and fp32 weights, under bf16
autocast on CUDA (fp32 without autocast on the CPU dry run).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from fastmae import layers, reference

# The parameters of a block, in the order the block functions take them (timm's names, which fastmae keeps).
BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                "mlp.fc2.bias")  # fmt: skip


@functools.cache
def _template(kind: str, dim: int, num_heads: int) -> torch.nn.Module:
    """timm's ``Block`` or fastmae's on the meta device, in eval mode (no dropout calls)."""
    from timm.models.vision_transformer import Block as TimmBlock

    with torch.device("meta"):
        if kind == "timm":
            block = TimmBlock(dim, num_heads, 4.0, qkv_bias=True, norm_layer=reference.LayerNorm6)
        else:
            block = layers.Block(dim, num_heads, 4.0, reference.LayerNorm6, impl="triton")
    return block.eval()


def _run(kind: str, x: torch.Tensor, num_heads: int, *params: torch.Tensor) -> torch.Tensor:
    """One pre-norm block on ``x [B, N, D]`` with ``params`` (:data:`BLOCK_PARAMS` order): ``[B, N, D]``."""
    block = _template(kind, x.shape[-1], num_heads)
    amp = x.is_cuda and x.dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        return torch.func.functional_call(block, dict(zip(BLOCK_PARAMS, params, strict=True)), (x,))


def block_reference(x: torch.Tensor, num_heads: int, *params: torch.Tensor) -> torch.Tensor:
    """The eager block: timm's ``Block``, as the reference model builds it (attention through SDPA)."""
    return _run("timm", x, num_heads, *params)


def fused_block(x: torch.Tensor, num_heads: int, *params: torch.Tensor) -> torch.Tensor:
    """fastmae's block on its kernels: LayerNorm fused with the residual add, GELU with fc1's bias, attention."""
    return _run("fastmae", x, num_heads, *params)


def block_case(s, stage: str, device: torch.device) -> dict:
    """The fields of a ``harness.Case`` for the ``stage`` block of shape ``s`` (encoder: ``1+K`` tokens; decoder:
    ``1+L``): fresh random fp32 input and parameters (norm weights near 1), and the counts.

    FLOPs: the four Linears ``2·B·N·(4D² + 2·r·D²)`` and attention ``4·B·N²·D``; backward twice the Linears' and
    2.5× attention's. Bytes: what a block must read and write at least, in fp32: x, the output and the weights;
    backward adds the output gradient read, dx written, the weights read again and their gradients written.
    """
    c, (length, k, _), b = s.cfg, s.patches, s.batch
    d, h, n = (
        (c.embed_dim, c.num_heads, 1 + k)
        if stage == "encoder"
        else (c.decoder_embed_dim, c.decoder_num_heads, 1 + length)
    )
    hid = int(d * c.mlp_ratio)
    sizes = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (hid, d), (hid,), (d, hid), (d,)]
    params = []
    for name, size in zip(BLOCK_PARAMS, sizes):
        t = torch.randn(*size, device=device) * (size[-1] ** -0.5 if len(size) == 2 else 0.1)
        params.append((t + 1.0 if name.startswith("norm") and name.endswith("weight") else t).requires_grad_())
    x = torch.randn(b, n, d, device=device).requires_grad_()  # [B, N, D] fp32: the residual stream
    linear, attn = 2.0 * b * n * (4 * d * d + 2 * hid * d), 4.0 * b * n * n * d
    act, weights = b * n * d * 4, sum(t.numel() for t in params) * 4
    return dict(
        label=f"{stage} B={b} N={n} D={d} H={h}",
        args=(x, h, *params),
        grad_idx=(0, *range(2, 2 + len(params))),
        names=("out", "d_x", *(f"d_{name}" for name in BLOCK_PARAMS)),
        grad_out=torch.randn(b, n, d, device=device),
        flops={"fwd": linear + attn, "fwd+bwd": 3 * linear + 3.5 * attn},
        nbytes={"fwd": 2 * act + weights, "fwd+bwd": 4 * act + 3 * weights},
        bound="matmul",
    )
