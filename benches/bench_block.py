"""A ViT transformer block (encoder: 1+K tokens, decoder: 1+L) for every provider, fwd and fwd+bwd: timm's eager
block, ``torch.compile`` of it, fastmae's fused block and ``torch.compile`` of that."""

import pytest

from benches import harness


@pytest.mark.parametrize(harness.PARAMS, harness.params("block"))
def test_block(bench, model, stage, mode, provider):
    bench("block", model, stage, mode, provider)
