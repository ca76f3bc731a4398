"""Patch embedding of the visible patches (eager: conv, positions, gather) for every provider, fwd and fwd+bwd."""

import pytest

from benches import harness


@pytest.mark.parametrize(harness.PARAMS, harness.params("patch_embed"))
def test_patch_embed(bench, model, stage, mode, provider):
    bench("patch_embed", model, stage, mode, provider)
