"""The decoder's input (visible and mask tokens, unshuffled, plus positions) for every provider, fwd and fwd+bwd."""

import pytest

from benches import harness


@pytest.mark.parametrize(harness.PARAMS, harness.params("decoder_assembly"))
def test_decoder_assembly(bench, model, stage, mode, provider):
    bench("decoder_assembly", model, stage, mode, provider)
