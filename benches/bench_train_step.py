"""One training step (forward under bf16 autocast, backward, AdamW) for every provider and model size."""

import pytest

from benches import harness


@pytest.mark.parametrize(harness.PARAMS, harness.params("step"))
def test_train_step(bench, model, stage, mode, provider):
    bench("step", model, stage, mode, provider)
