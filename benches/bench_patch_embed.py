"""Patch embedding of the visible patches (conv + pos + gather in eager) for every provider, fwd and fwd+bwd.

Target (H100, bf16): forward+backward at least 3× eager and faster than ``torch.compile`` of it.
Rates: TFLOP/s over the visible patches' ``2·N·K·D·C·p²`` (×2 with backward); GB/s over the bytes that must move.
"""

import pytest

from benches import common


@pytest.mark.parametrize("provider", common.OP_PROVIDERS["patch_embed"])
@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("model", common.model_params())
def test_patch_embed(bench_op, model, mode, provider):
    bench_op("patch_embed", model, mode, provider)
