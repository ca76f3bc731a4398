"""Test-wide set-up, loaded before any test module (and so before any kernel module) is imported.

Without CUDA, Triton kernels run on the CPU through the interpreter: ``TRITON_INTERPRET=1`` is set here, since
``@triton.jit`` reads it when a kernel module is imported. Tests marked ``cuda`` skip with a reason.
``make test`` runs the suite on every core with pytest-xdist; plain ``pytest`` runs it in one process.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist the workers share the cores: one worker's ops should not each spread over all of them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU; run with `pytest -m cuda` on a GPU machine")
