"""Attention from the packed qkv to ``[B, N, H·d]`` at the encoder and decoder shapes, for every provider
(eager, ``torch.compile``, fastmae's kernel and each SDPA backend chosen with ``sdpa_kernel``), fwd and fwd+bwd."""

import pytest

from benches import harness


@pytest.mark.parametrize(harness.PARAMS, harness.params("attention"))
def test_attention(bench, model, stage, mode, provider):
    bench("attention", model, stage, mode, provider)
