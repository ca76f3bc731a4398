"""pytest set-up for ``benches/``: collect the ``bench_*.py`` files, and the session's device and ceilings.

``pytest benches/ --benchmark-only`` measures on CUDA (ViT-B/16, ViT-L/16, ViT-H/14 at batch 256, bf16);
``pytest benches/ --benchmark-disable`` runs every bench body once (on the CPU at the tiny size, Triton kernels
under the interpreter set up by the root conftest.py; GPU sizes skip with a reason).
"""

from __future__ import annotations

import pytest
import torch

from benches import common, measure


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest's python plugin, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    if common.HAS_CUDA:
        torch.backends.cudnn.benchmark = True  # as the original MAE pretraining script sets it (eager conv)
    return torch.device("cuda" if common.HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def ceilings(device: torch.device) -> dict:
    """The card's copy bandwidth and bf16 matmul rate, measured once per session (tiny on the CPU)."""
    return measure.measure_ceilings(device)


@pytest.fixture(autouse=True)
def _release_memory(device: torch.device):
    yield
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture
def bench_op(benchmark, device: torch.device, ceilings: dict):
    """``bench_op(op, model, mode, provider, stage="encoder")``: one op at one shape for one provider.

    Skips with the reason when the provider cannot run here (no kernel yet, a CUDA-only SDPA backend, compile
    on the CPU). The group gathers every provider of one op, mode and shape, so the default table and
    ``--benchmark-compare`` rank providers against each other.
    """
    from benches import providers

    def run(op: str, model: str, mode: str, provider: str, stage: str = "encoder") -> None:
        try:
            fn = providers.op_provider(op, provider, device)
        except providers.Unavailable as e:
            pytest.skip(str(e))
        case = providers.make_case(op, common.ALL_MODELS[model], device, common.bench_dtype(device), stage)
        measure.run_benchmark(
            benchmark,
            providers.runner(case, fn, mode),
            device,
            group=f"{op} {mode} | {model} {case.label}",
            ceilings=ceilings,
            flops=case.flops[mode],
            nbytes=case.nbytes[mode],
            bound=case.bound,
        )
        benchmark.extra_info.update(
            op=op,
            model=model,
            case=case.label,
            mode=mode,
            provider=provider,
            dtype=str(case.grad_out.dtype).removeprefix("torch."),
        )

    return run
