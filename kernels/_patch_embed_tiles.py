"""Device helpers of the patch-embedding kernels (``fastmae.kernels.patch_embed``, whose docstring has the math): the
GEMM step in the compute dtype, the bias rounding the conv applies, and a pixel's offset inside a patch."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, CT: tl.constexpr, ALLOW_TF32: tl.constexpr):
    """acc += a @ b with both operands cast to the compute dtype CT (0 fp32, 1 fp16, 2 bf16)."""
    if CT == 1:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif CT == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif ALLOW_TF32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def round_to_ct(x, CT: tl.constexpr):
    """x rounded to the compute dtype CT and back to fp32 (the conv sees its bias in that dtype)."""
    if CT == 1:
        x = x.to(tl.float16)
    elif CT == 2:
        x = x.to(tl.bfloat16)
    return x.to(tl.float32)


@triton.jit
def pixel_offsets(r, s_ic, s_ih, s_iw, P: tl.constexpr):
    """(c, offset) of pixel r = c·P·P + i·P + j inside a patch, for channel, row and pixel strides s_ic, s_ih, s_iw.
    With P even and a unit pixel stride, pixels r and r+1 (r even) are adjacent, which the compiler sees through the
    constant divisions: one 2-pixel load per pair at P = 14."""
    c = r // (P * P)
    i = (r // P) % P
    j = r % P
    return c, c * s_ic + i * s_ih + j * s_iw
