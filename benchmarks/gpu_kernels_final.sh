#!/usr/bin/env bash
# One device call: GPU tests of the prefill variants, the prep sweep + full kernel table vs fla-core,
# host overhead split, and the fla model parity check. Logs and JSON go to $OUT.
#   bash benchmarks/gpu_kernels_final.sh   (carry .whl)
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 60 python3 -m pytest -q tests/kernels/test_triton.py -p no:cacheprovider -o addopts="" \
  -k "prep_variants or (prefill_matches_naive and T1000 and K256)" 2>&1 | tee "$OUT/gpu-tests.log" | tail -2
timeout 230 python3 benchmarks/bench_kernels.py --sweep-prep --out "$OUT/kernels-bench.json" 2>&1 \
  | tee "$OUT/bench.log" | grep -v "^  (graph" | grep -v "^sweep gla"
timeout 30 python3 benchmarks/host_overhead.py --out "$OUT/host.json" 2>&1 | tail -14
timeout 150 python3 benchmarks/fla_parity.py --out "$OUT/fla-parity.json" > "$OUT/fla-parity.log" 2>&1
echo "parity rc=$?"; grep -v -i "warn\|shards" "$OUT/fla-parity.log" | cut -c1-300 | tail -18
