#!/usr/bin/env bash
# One device call: GPU tests of the fused layer kernels, model-level e2e (ours), HTTP load + resumed
# turns, then fla parity (fp32 dots in IEEE mode, as fla's own tests) for what time remains.
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 60 python3 -m pytest -q -m gpu -s tests/kernels/test_fused.py tests/model/test_fused.py -p no:cacheprovider \
  -o addopts="" 2>&1 | tee "$OUT/gpu-fused-tests.log" | grep -E "passed|failed|FAILED|Error|kernels|per layer" | tail -12
timeout 120 python3 benchmarks/e2e.py --quick --no-fla --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" \
  | grep -E "^(decode|prefill)"
timeout 140 python3 benchmarks/e2e_server.py --concurrency 1 64 --prompt-tokens 512 --max-tokens 64 \
  --resume 1024 8192 32768 --out "$OUT/e2e-server.json" 2>&1 | tee "$OUT/e2e-server.log" | grep -v -i warn | tail -9
TRITON_F32_DEFAULT=ieee timeout ${PARITY_S:-45} python3 benchmarks/fla_parity.py --out "$OUT/fla-parity.json" \
  > "$OUT/fla-parity.log" 2>&1
grep -v -i "warn\|shards" "$OUT/fla-parity.log" | cut -c1-300 | tail -6
