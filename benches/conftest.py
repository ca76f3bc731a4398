"""pytest set-up for ``benches/``: collect ``bench_*.py``; the ``bench`` fixture every bench file calls.

``pytest benches/ --benchmark-only`` measures on CUDA; ``pytest benches/ --benchmark-disable`` runs every bench
body once (on the CPU at the tiny size, Triton kernels under the interpreter that the root conftest.py sets up).
"""

import time

import pytest
import torch

from benches import harness


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest's python plugin, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    torch.backends.cudnn.benchmark = True  # as the original MAE pretraining script sets it (eager conv)
    return torch.device("cuda" if harness.HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def ceilings(device: torch.device) -> dict:
    return harness.measure_ceilings(device)  # once per session


@pytest.fixture
def bench(benchmark, device: torch.device, ceilings: dict):
    """``bench(op, model, stage, mode, provider)``: time ``op`` (or ``"step"``) with pytest-benchmark.

    A provider that cannot run here skips with the reason. A group holds every provider of one op, mode and shape,
    so the table and ``--benchmark-compare`` rank them. Warm-up calls (compilation, autotuning) come first and each
    timed call ends with a synchronization; ``extra_info`` holds :func:`harness.numbers` against the ceilings.
    """

    def run(op: str, model: str, stage: str, mode: str, provider: str) -> None:
        try:
            b = harness.make_bench(op, harness.MODELS[model], stage, mode, provider, device)
        except harness.Unavailable as e:
            pytest.skip(str(e))
        benchmark.group = f"{op} {mode} | {model} {b.label}"

        def timed():
            out = b.run()
            harness.sync(device)
            return out

        try:
            for _ in range((3 if b.images else 2) if benchmark.enabled else 0):
                timed()
            t0 = time.perf_counter()
            benchmark(timed)
            seconds = benchmark.stats.stats.median if benchmark.stats is not None else time.perf_counter() - t0
            info = harness.numbers(b, seconds * 1e3, ceilings, device)
            dtype = str(harness.bench_dtype(device)).removeprefix("torch.")  # a step's autocast dtype
            benchmark.extra_info.update(op=op, model=model, case=b.label, mode=mode, provider=provider, dtype=dtype)
            benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})
        finally:
            b = None  # a step's model goes before release() collects
            harness.release(op, provider, device)

    return run
