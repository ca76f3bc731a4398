"""One training step (forward under bf16 autocast, backward, AdamW step) for every provider.

Providers: ``MaskedAutoencoderViT`` eager and under ``torch.compile``; ``fastmae.MAE(impl="triton")`` eager and
under ``torch.compile``. ``extra_info`` holds images/s, model TFLOP/s, MFU (model FLOPs of the step over the
time and the card's measured bf16 matmul rate; see benches/common.py) and the peak allocated memory.
Targets (H100): ViT-B/16 at least 1.6× eager and 1.2× compile with peak memory at most 0.75× eager; MFU at least
45% (ViT-B/16) and 55% (ViT-L/16).
"""

import pytest
import torch

from benches import common, measure, providers


@pytest.mark.parametrize("provider", common.STEP_PROVIDERS)
@pytest.mark.parametrize("model", common.model_params())
def test_train_step(benchmark, device, ceilings, model, provider):
    shape = common.ALL_MODELS[model]
    try:
        case = providers.make_step(shape, provider, device)
    except providers.Unavailable as e:
        pytest.skip(str(e))
    try:
        seconds = measure.run_benchmark(
            benchmark,
            case.step,
            device,
            group=f"train step | {shape.describe()}",
            ceilings=ceilings,
            flops=case.flops["step"],
            bound="matmul",
            warmup_calls=3,
        )
        benchmark.extra_info.update(
            model=model,
            provider=provider,
            kernels=case.kernels,
            images_per_s=shape.batch / seconds,
            mfu=benchmark.extra_info.get("pct_matmul"),
            step_tflop=case.flops["step"] / 1e12,
        )
    finally:
        del case
        if "compile" in provider:
            torch._dynamo.reset()
        measure.free_memory(device)
