"""Bytes a transformer block moves per training step, counted op by op: timm's eager block against fastmae's.

Every op a block runs, forward and backward (aten ops and fastmae's kernel ops alike), is counted as reading each
tensor it takes and writing each tensor it returns, once; views move nothing and allocations write nothing. For a
fastmae kernel op that is what its loads and stores come to (each reads its operands and writes its results once);
for a GEMM it is the least it moves (its tile re-reads come from L2). The blocks run on fake tensors at the real
shapes (the launchers run, the kernels do not), so the count needs no GPU and takes seconds.

The block is one of a chain, as in the model: fastmae's takes the previous block's pending residual branch and
leaves its own last add to the next block's first LayerNorm (``layers.run_blocks``); timm's adds both residuals
itself. Parameters and activations are 16-bit (a bf16 model; fp16 here, the same bytes), LayerNorm statistics fp32.

    python -m benches.block_bytes            # ViT-B/16, L/16 and H/14, batch 256, encoder and decoder blocks
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

os.environ.setdefault("TRITON_INTERPRET", "1")  # the launchers only run on fake tensors: no kernel is compiled

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from fastmae import configs, layers, reference  # noqa: E402

# Ops that move no data: allocations, and reshapes whose result aliases their input.
_GEMMS = ("aten::mm", "aten::addmm")
_NO_DATA = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
            "_unsafe_view"}  # fmt: skip


class ByteCounter(TorchDispatchMode):
    """Sums, per op name, the bytes of the tensors each op takes (read) and returns (written)."""

    def __init__(self):
        super().__init__()
        self.read: dict[str, int] = defaultdict(int)
        self.written: dict[str, int] = defaultdict(int)
        self.gemm_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_DATA or func.namespace == "prim":
            return out
        key = f"{func.namespace}::{name}"
        inputs = {id(t): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.read[key] += sum(t.nbytes for t in inputs.values())
        self.written[key] += sum(t.nbytes for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        if key in _GEMMS:
            a, b = args[-2:]  # mm(a, b), addmm(bias, a, b): [M, K] @ [K, N]
            self.gemm_flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return out

    def total(self) -> int:
        return sum(self.read.values()) + sum(self.written.values())

    def other_bytes(self) -> int:
        """The bytes of every op but the GEMMs (which are compute-bound at these shapes)."""
        return self.total() - sum(self.read[k] + self.written[k] for k in _GEMMS)

    def modelled_ms(self, tflops: float, tbps: float) -> float:
        """A two-term roofline: the GEMMs at ``tflops`` TFLOP/s plus every other op's bytes at ``tbps`` TB/s."""
        return (self.gemm_flops / (tflops * 1e12) + self.other_bytes() / (tbps * 1e12)) * 1e3


def block_bytes(kind: str, tokens: tuple[int, int], dim: int, heads: int, mlp_ratio: float) -> ByteCounter:
    """The count of one block's forward and backward: ``kind`` "timm" or "fastmae", ``tokens`` (B, N)."""
    from timm.models.vision_transformer import Block as TimmBlock

    dt = torch.float16
    if kind == "timm":
        block = TimmBlock(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=reference.LayerNorm6)
    else:
        block = layers.Block(dim, heads, mlp_ratio, reference.LayerNorm6, impl="triton")
    block = block.to(dt)  # real parameters (a few MB); the activations are fake
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(*tokens, dim, dtype=dt, requires_grad=True)  # [B, N, D]
        branch = torch.randn(*tokens, dim, dtype=dt, requires_grad=True)  # [B, N, D] the previous block's add
        grad = torch.randn(*tokens, dim, dtype=dt)  # [B, N, D]
        with ByteCounter() as count:
            if kind == "timm":
                block(x).backward(grad)
            else:
                torch.autograd.backward(block(x, branch, pending=True), (grad, grad))
    return count


def table(models: list[str], batch: int, mask_ratio: float, tflops: float, tbps: float) -> list[str]:
    """The markdown table: per block, the bytes each side moves, and modelled times; per model, its blocks."""
    lines = [
        "| model | block | tokens B x N | eager (timm) MB | fastmae MB | fastmae / eager | GEMM GFLOP | "
        "modelled eager ms | modelled fastmae ms | modelled speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        cfg = configs.get_config(name)
        length = (cfg.img_size // cfg.patch_size) ** 2
        keep = int(length * (1 - mask_ratio))
        stages = {
            "encoder": ((batch, 1 + keep), cfg.embed_dim, cfg.num_heads, cfg.depth),
            "decoder": ((batch, 1 + length), cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.decoder_depth),
        }
        step = [0.0, 0.0]
        for stage, (tokens, dim, heads, depth) in stages.items():
            eager, fused = (block_bytes(kind, tokens, dim, heads, cfg.mlp_ratio) for kind in ("timm", "fastmae"))
            ms = [c.modelled_ms(tflops, tbps) for c in (eager, fused)]
            step = [step[0] + depth * ms[0], step[1] + depth * ms[1]]
            lines.append(
                f"| {name} | {stage} | {tokens[0]} x {tokens[1]} | {eager.total() / 1e6:.0f} | "
                f"{fused.total() / 1e6:.0f} | {fused.total() / eager.total():.2f} | {fused.gemm_flops / 1e9:.0f} | "
                f"{ms[0]:.2f} | {ms[1]:.2f} | {ms[0] / ms[1]:.2f}x |"
            )
        lines.append(
            f"| {name} | all {cfg.depth} + {cfg.decoder_depth} | | | | | | {step[0]:.1f} | {step[1]:.1f} | "
            f"{step[0] / step[1]:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--tflops", type=float, default=600.0, help="the GEMMs' rate in the model (H100 bf16: ~600)")
    p.add_argument("--tbps", type=float, default=3.0, help="the other ops' rate in the model (H100 copy: ~3.0)")
    args = p.parse_args(argv)
    print("\n".join(table(args.models.split(","), args.batch, args.mask_ratio, args.tflops, args.tbps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
