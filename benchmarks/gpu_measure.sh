#!/usr/bin/env bash
# One device call that measures where things stand: fla parity, the GPU kernel tests not yet run on
# a GPU, the decode kernel against fla-core, and per-kernel profiles. Logs and JSON go to $OUT.
#   bash benchmarks/gpu_measure.sh   (carry .whl)
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)"
if [[ ${PARTS:-parity,tests,decode,profile} == *parity* ]]; then
  timeout 110 python3 benchmarks/fla_parity.py --out "$OUT/fla-parity.json" > "$OUT/fla-parity.log" 2>&1
  echo "parity rc=$?"; grep -v -i warn "$OUT/fla-parity.log" | cut -c1-400 | tail -6
fi
if [[ ${PARTS:-parity,tests,decode,profile} == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -m gpu tests/kernels/test_triton.py -k "${TEST_K:-decode or varlen or checkpoint}" \
    -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "passed|failed|FAILED|Error" | tail -12
fi
if [[ ${PARTS:-parity,tests,decode,profile} == *decode* ]]; then
  timeout 120 python3 benchmarks/bench_kernels.py --parts decode --out "$OUT/kernels-decode.json" 2>&1 \
    | tee "$OUT/bench-decode.log" | grep -v "^  (graph" | tail -16
fi
if [[ ${PARTS:-parity,tests,decode,profile} == *profile* ]]; then
  timeout 170 python3 benchmarks/profile_gpu.py --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1
  echo "profile rc=$?"; grep -v -i warn "$OUT/profile.log" | tail -80
fi
