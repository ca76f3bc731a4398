"""``make test`` runs on every core with ``pytest -n auto --dist loadgroup``: the modules that build a slow run once
(the report's dry run, the torchrun jobs, the static capture) mark themselves ``xdist_group`` so that one worker
runs all their tests. This checks that the installed pytest and pytest-xdist honour the mark."""

import subprocess
import sys

import pytest

pytest.importorskip("xdist")

GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("one")


@pytest.mark.parametrize("i", range(6))
def test_records_its_worker(i):
    with open(os.environ["WORKERS_FILE"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
"""


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    workers = tmp_path / "workers.txt"
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider"]
    env = {"WORKERS_FILE": str(workers), "PATH": "", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([*cmd, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ran_on = workers.read_text().split()
    assert len(ran_on) == 6 and len(set(ran_on)) == 1, ran_on
