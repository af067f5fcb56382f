#!/usr/bin/env bash
# The whole GPU benchmark sweep and its report, written into one folder (no network needed):
#     bash benchmarks/run_gpu.sh [OUT_DIR]     (default: benchmarks/results/<GPU name>)
# 1. the static sm_90 model of every Triton kernel beside its measured time on this GPU
#    (the committed static report, modelled without a GPU, is the "before" column);
# 2. the pytest-benchmark sweep of every op and provider, and its report.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}  # the lent machines' python3 holds torch; PYTHON picks another
# run uninstalled (the lent machines): fastcaps.kernels is the top-level kernels/ folder
[ -e fastcaps/kernels ] || ln -s ../kernels fastcaps/kernels
name=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
out=${1:-benchmarks/results/$name}
mkdir -p "$out"
baseline=()
if [ -f benchmarks/results/static-sm90/report.json ]; then
    baseline=(--baseline benchmarks/results/static-sm90/report.json)
fi
"$py" -m benchmarks.gpu_static --measure --out "$out/static-sm90" "${baseline[@]}" \
    2>&1 | tee "$out/static-sm90.log"
FASTCAPS_BENCH_DEVICE=cuda "$py" -m pytest benchmarks/ -q -p no:cacheprovider \
    --benchmark-enable --benchmark-only --benchmark-json "$out/benchmarks.json" \
    2>&1 | tee "$out/pytest.log"
"$py" -m benchmarks.report "$out/benchmarks.json"
