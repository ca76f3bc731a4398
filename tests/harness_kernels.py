"""Two tiny kernels for the compile harness (one valid, one that only fails when compiled), and a launch site."""

import triton
import triton.language as tl


@triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=2), triton.Config({"BLOCK": 64}, num_warps=4)], key=[])
@triton.jit
def square_dot(X, Y, n, BLOCK: tl.constexpr):
    """Y[:n] = (X Xᵀ)[:n] for a BLOCK×BLOCK tile: a tensor-core dot."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs[:, None] * BLOCK + offs[None, :]).to(tl.float16)
    y = tl.dot(x, tl.trans(x))
    tl.store(Y + offs[:, None] * BLOCK + offs[None, :], y, mask=offs[:, None] < n)


@triton.jit
def shared_hog(X, Y, BLOCK: tl.constexpr):
    """A dot of BLOCK×BLOCK fp32 tiles: at BLOCK=256 it needs far more shared memory than any GPU has."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
    tl.store(Y + offs[:, None] * BLOCK + offs[None, :], tl.dot(x, x))


def capture_examples() -> list:
    """Launches of ``square_dot`` captured from its launch site (run without ``TRITON_INTERPRET``): ``n`` = 1, 32
    and 7, then 7 again with ``X`` one element off its 16-byte aligned start."""
    import torch

    from tests.compile_harness import capture_launches

    x = torch.empty(65 * 64, dtype=torch.float32)
    y = torch.empty(64 * 64, dtype=torch.float32)
    with capture_launches(90) as rec:
        for n in (1, 32, 7):
            with rec.tagged(n=n):
                square_dot[(1,)](x, y, n)
        with rec.tagged(n="7, X + 1"):
            square_dot[(1,)](x[1:], y, 7)
    return rec.launches
