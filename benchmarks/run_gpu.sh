#!/usr/bin/env bash
# The whole GPU benchmark sweep and its report, written into one folder (no network needed):
#     bash benchmarks/run_gpu.sh [OUT_DIR]     (default: benchmarks/results/<GPU name>)
set -euo pipefail
cd "$(dirname "$0")/.."
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
out=${1:-benchmarks/results/$name}
mkdir -p "$out"
FASTCAPS_BENCH_DEVICE=cuda python -m pytest benchmarks/ -q -p no:cacheprovider \
    --benchmark-enable --benchmark-only --benchmark-json "$out/benchmarks.json" \
    2>&1 | tee "$out/pytest.log"
python -m benchmarks.report "$out/benchmarks.json"
