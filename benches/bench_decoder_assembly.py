"""The decoder's input (visible tokens + mask tokens, unshuffled, + positions) for every provider.

Target (H100, bf16): at least 2× eager. GB/s over the bytes that must move.
"""

import pytest

from benches import common


@pytest.mark.parametrize("provider", common.OP_PROVIDERS["decoder_assembly"])
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("model", common.model_params())
def test_decoder_assembly(bench_op, model, mode, provider):
    bench_op("decoder_assembly", model, mode, provider)
