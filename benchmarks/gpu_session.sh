#!/usr/bin/env bash
# All the GPU evidence one short lease can give, in one call, most valuable first:
#     bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S]     (BUDGET_S: 560 unless given)
# A lease is about 15 minutes of device time, the machine's start included, and one command may
# run 10, so every step has its own share of BUDGET_S and a `timeout`: a slow step loses its tail,
# never the steps after it. After every step OUT_DIR/gpu-session.tar.gz is rewritten (without
# checkpoints: the lease returns files of 16 MiB at most), so a call killed at its limit still
# returns all that finished. Steps, in order:
#   1. the tests the last lease left failing or unreached (exp_squash's exactness test, the
#      torch.compile tests), with full tracebacks;
#   2. the torch, Triton and reference providers of every op at the MNIST layer, B = 128,
#      forward + backward, and the network's training step (pytest-benchmark writes its JSON only
#      at the end: one JSON per step); each model's training step profiled (profile_step.py);
#   3. the test suite on CUDA (float16 and bfloat16 included; the CPU cases and the slow ones, CI
#      runs them, are left out), verbose, each failure's traceback written as it happens;
#   4. torch.compile of the reference at the MNIST layer;
#   5. what earlier leases measured already: the static sm_90 model of every Triton kernel beside
#      its measured time (gpu_static --measure), the kernels before the redesign if carried in
#      data/fastcaps-181097f (mkdir -p data/fastcaps-181097f && git archive 181097f fastcaps
#      kernels | tar -x -C data/fastcaps-181097f), two short epochs of each model, the tiling
#      sweep (benchmarks/tiling_sweep.py), and the rest of the benchmark sweep one op at a time
#      (`bash benchmarks/run_gpu.sh` is the whole sweep).
# MNIST is read from $FASTCAPS_DATA, else data/mnist (git-ignored: copy ../shared/mnist there and
# name it, and data/fastcaps-181097f, in the lease's carry).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_S]" >&2
    exit 2
fi
out=$1
budget=${2:-560}
py=${PYTHON:-python3}  # the lent machines' python3 holds torch; PYTHON picks another
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_session.sh needs a CUDA GPU (torch.cuda.is_available() is False)" >&2
    exit 2
fi
# The lent machines run the checkout uninstalled: fastcaps.kernels is the top-level kernels/ folder
# (pyproject's package-dir mapping), so link it where the import looks
[ -e fastcaps/kernels ] || ln -s ../kernels fastcaps/kernels
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
export FASTCAPS_DATA=${FASTCAPS_DATA:-data/mnist}
work=$(mktemp -d)
mkdir -p "$out"
log="$out/session.log"
start=$(date +%s)

pack() {
    tar -czf "$out/.gpu-session.tar.gz" --exclude="*.pt" -C "$work" . && mv "$out/.gpu-session.tar.gz" "$out/gpu-session.tar.gz"
}

# step NAME SHARE COMMAND...: run COMMAND under a timeout of SHARE percent of the budget (never
# past what is left), its output in NAME.log, then pack
step() {
    local name=$1 share=$2
    shift 2
    local now left limit t0 rc
    now=$(date +%s)
    left=$((budget - (now - start)))
    limit=$((budget * share / 100))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "$name: skipped, ${left}s of the budget left" | tee -a "$log"
        return
    fi
    echo "$name: start, limit ${limit}s: $*" | tee -a "$log"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    echo "$name: rc $rc ($([ $rc -eq 124 ] && echo 'timed out, ')$(($(date +%s) - t0))s)" | tee -a "$log"
    tail -n 5 "$work/$name.log" | tee -a "$log"
    pack
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c "import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
    git log -1 --format='commit %H %s' 2>/dev/null
} > "$work/env.txt" 2>&1
cat "$work/env.txt" | tee -a "$log"

# The order follows what the leases so far (2026-11-28, H200) left open: the tests that failed or
# were not reached, with full tracebacks; the host-time changes measured (MNIST layer and the
# network's step); the whole suite; then what they measured already.
bench() {  # bench NAME SHARE PYTEST-ARGS...: one pytest-benchmark run, its JSON in NAME.json
    local name=$1 share=$2
    shift 2
    step "$name" "$share" "$py" -m pytest -q -p no:cacheprovider --benchmark-enable \
        --benchmark-only --benchmark-max-time 0.2 --benchmark-json "$work/$name.json" "$@"
}
step tests-open 12 "$py" -m pytest -v -p no:cacheprovider --tb=long -rfEs \
    "tests/test_attention.py::test_exp_squash_is_exact_at_every_norm" tests/test_compile.py
bench bench-mnist 14 benchmarks/test_ops.py \
    -k "mnist-B128-I1152-J10-D16-K8 and full and (torch or triton or reference) and not naive and not compiled"
bench bench-capsnet 6 benchmarks/test_capsnet.py -k "B128"
# where a training step's time goes (Efficient-CapsNet at its batch of 16 ran about 1,460 images/s
# eager and no faster compiled on the H200, 2026-11-28), and CapsNet's beside it
for run in efficient efficient:--compile paper; do
    step "profile-${run/:--/-}" 4 "$py" -m benchmarks.profile_step --out "$work/profile" \
        --model "${run%%:*}" $([ "$run" != "${run#*:}" ] && echo "${run#*:}")
done
# every failure's traceback goes to tests-failures.log as it happens (tests/conftest.py)
export FASTCAPS_FAILURE_LOG="$work/tests-failures.log"
step tests 30 "$py" -m pytest tests -v -n 16 -p no:cacheprovider -m "not slow" -k "not cpu" \
    --ignore=tests/test_compile.py --tb=short -rfEs --durations=15  # test_compile: tests-open
unset FASTCAPS_FAILURE_LOG
bench bench-compiled 10 benchmarks/test_ops.py \
    -k "capsule_routing and full and mnist-B128-I1152-J10-D16-K8-R3 and reference-compiled"
baseline=()
[ -f benchmarks/results/static-sm90/report.json ] && baseline=(--baseline benchmarks/results/static-sm90/report.json)
step static-sm90 20 "$py" -m benchmarks.gpu_static --measure --out "$work/static-sm90" "${baseline[@]}"
before=data/fastcaps-181097f  # the kernels before the redesign (issue 10), if carried
if [ -d "$before" ]; then
    step static-sm90-181097f 7 "$py" -m benchmarks.gpu_static --quick --measure \
        --fastcaps-from "$before" --out "$work/static-sm90-181097f"
fi
# Efficient-CapsNet trains at batch 16: fewer images keep its two epochs inside the share
for model in paper:20000 efficient:8000; do
    step "train-${model%%:*}" 9 "$py" train_mnist.py --model "${model%%:*}" --epochs 2 \
        --train-limit "${model##*:}" --val-size 2000 --test-limit 2000 --no-figures \
        --log-every 100 --output-dir "$work/train-${model%%:*}" --overwrite
done
step tiling-sweep 8 "$py" -m benchmarks.tiling_sweep --out "$work/tiling-sweep" \
    --budget-s $((budget / 14))
for op in capsule_routing dynamic_routing predictions squash capsule_attention_routing \
    attention_routing exp_squash; do
    bench "bench-$op" 4 benchmarks/test_ops.py -k "test_op[$op- and not compiled and not mnist-B128-I1152-J10-D16-K8"
done
reports=()
for json in "$work"/bench-*.json; do [ -s "$json" ] && reports+=("$json"); done
[ ${#reports[@]} -gt 0 ] && step bench-report 100 "$py" -m benchmarks.report "${reports[@]}" --out "$work/report"
echo "done in $(($(date +%s) - start))s of ${budget}s" | tee -a "$log"
