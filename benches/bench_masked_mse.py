"""MAE's masked-patch MSE (norm_pix_loss on) from pred and the raw image, for every provider, fwd and fwd+bwd.

Target (H100): forward+backward at least 70% of the measured copy bandwidth and at least 4× eager.
GB/s over the bytes that must move: masked pred rows and their pixels read (and the mask), dpred written.
"""

import pytest

from benches import common


@pytest.mark.parametrize("provider", common.OP_PROVIDERS["masked_mse"])
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("model", common.model_params())
def test_masked_mse(bench_op, model, mode, provider):
    bench_op("masked_mse", model, mode, provider)
