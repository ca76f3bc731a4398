"""The input path: one loader worker's time per image on the CPU and the GPU path, and the GPU path's batched
decode + views kernel (CUDA: 256 views at 224 px; CPU: 8 views at 32 px, the stand-in decoder and the interpreter)."""

import pytest
import torch

from benches import harness, harness_data

IMG_SIZE, COUNT, BATCH = (224, 256, harness_data.GPU_BATCH) if harness.HAS_CUDA else (32, 16, 8)


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_worker_per_image(benchmark, path):
    fn = harness_data.worker_fn(path, IMG_SIZE, COUNT)
    benchmark.group = f"data worker | {COUNT} views of {IMG_SIZE} px"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    try:
        benchmark(fn, COUNT)
    finally:
        torch.set_num_threads(threads)
    if benchmark.stats is not None:
        benchmark.extra_info.update(path=path, images_per_s=COUNT / benchmark.stats.stats.median)


def test_decode_and_crop(benchmark):
    device = torch.device("cuda" if harness.HAS_CUDA else "cpu")
    enc, encoded = harness_data.encoded_batch(IMG_SIZE, BATCH)
    from fastmae.gpu_data import ViewDecoder

    decoder = ViewDecoder(enc, device, impl="triton")
    benchmark.group = f"data decode+crop | batch {BATCH} at {IMG_SIZE} px"

    def run():
        out = decoder(encoded)
        harness.sync(device)
        return out

    if benchmark.enabled:
        run()
    views = benchmark(run)
    assert views.images.shape == (BATCH, 3, IMG_SIZE, IMG_SIZE) and decoder.pillow_decoded == 0
    if benchmark.stats is not None:
        benchmark.extra_info.update(images_per_s=BATCH / benchmark.stats.stats.median)
