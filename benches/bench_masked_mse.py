"""MAE's loss on the masked patches (``norm_pix_loss`` on) for every provider, fwd and fwd+bwd."""

import pytest

from benches import harness


@pytest.mark.parametrize(harness.PARAMS, harness.params("masked_mse"))
def test_masked_mse(bench, model, stage, mode, provider):
    bench("masked_mse", model, stage, mode, provider)
