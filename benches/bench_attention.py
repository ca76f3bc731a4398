"""Attention from the packed qkv to the proj-ready ``[B, N, H·d]`` at the encoder and decoder shapes.

Providers: the eager math, ``torch.compile`` of it, fastmae's kernel, and each SDPA backend (flash, efficient,
cuDNN, math) chosen explicitly with ``sdpa_kernel``, fed through the eager model's permutes and copies.
Target (H100, bf16): forward+backward at least 1.2× the best SDPA backend at both shapes.
TFLOP/s over ``4·B·H·N²·d`` forward, 3.5× that for forward+backward.
"""

import pytest

from benches import common


@pytest.mark.parametrize("provider", common.OP_PROVIDERS["attention"])
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("stage", common.STAGES)
@pytest.mark.parametrize("model", common.model_params())
def test_attention(bench_op, model, stage, mode, provider):
    bench_op("attention", model, mode, provider, stage)
