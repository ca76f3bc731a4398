#!/usr/bin/env bash
# One prepared GPU check, for a machine with torch, triton, timm and pytest-benchmark preinstalled (no network).
#   bash benches/gpu_session.sh static   # install, then this GPU's own compile of each kernel vs the static figures
#   bash benches/gpu_session.sh tests    # install, static, then the GPU tests twice (races show as differing runs)
#   bash benches/gpu_session.sh report   # install, then the benchmark report (a 300 s deadline between rows)
#   bash benches/gpu_session.sh all      # all three (about 12 minutes: split it where one command may run less)
# Logs, JSON and BENCHMARKS.csv (with the run's rows) go to $OUT (default runs/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
stage=${1:-all}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/versions.txt"
python3 -m pip install --quiet --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
rc=0
if [[ $stage == static || $stage == tests || $stage == all ]]; then
  python3 benches/static_gpu.py --json "$OUT/static-gpu.json" 2>&1 | tee "$OUT/static-gpu.log" | tail -40
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
fi
if [[ $stage == tests || $stage == all ]]; then
  for run in 1 2; do
    python3 -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu-tests-$run.log" | tail -25
    [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
  done
fi
if [[ $stage == report || $stage == all ]]; then
  PYTHONUNBUFFERED=1 python3 benches/report.py --json "$OUT/bench-report.json" --markdown "$OUT/bench-report.md" \
    2>&1 | tee "$OUT/report.log" | tail -120
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
  cp BENCHMARKS.csv "$OUT/"  # the committed results with this run's rows appended
fi
exit $rc
