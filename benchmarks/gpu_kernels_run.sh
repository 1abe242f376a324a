#!/usr/bin/env bash
# One device call: install fla-core from carried wheels, run the kernel tests on CUDA, compare with
# fla-core, benchmark. Run from the repo root on the GPU machine with .whl carried; logs go to $OUT.
#   bash benchmarks/gpu_kernels_run.sh [bench args...]
set -o pipefail
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
STAGES=${STAGES:-tests,check,bench}
if [[ $STAGES == *tests* ]]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/kernels -q -p no:cacheprovider --maxfail=40 \
    --durations=5 -o addopts="" -k "${TEST_K:-not nothing}" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -25
fi
if [[ $STAGES == *check* ]]; then
  timeout "${CHECK_TIMEOUT:-120}" python3 benchmarks/gpu_kernels_check.py --out "$OUT/kernels-fla-check.json" 2>&1 | tail -25
fi
if [[ $STAGES == *bench* ]]; then
  timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_kernels.py --out "$OUT/kernels-bench.json" "$@" \
    2>&1 | tee "$OUT/bench.log" | grep -v "^  (graph"
fi
