#!/usr/bin/env bash
# One device call: fla parity, GPU decode/varlen kernel tests, e2e model benchmark (with fla + HF
# generate), and the HTTP-level benchmark. Each step is time-bounded so the others still report.
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 100 python3 benchmarks/fla_parity.py --out "$OUT/fla-parity.json" 2>&1 | grep -v Warn | tail -8
timeout 70 python3 -m pytest -q -m gpu tests/kernels/test_triton.py -k "decode or varlen or checkpoint" -x \
  -p no:cacheprovider 2>&1 | tail -6
timeout 200 python3 benchmarks/e2e.py --quick --new-tokens 64 --out "$OUT/e2e-h100.json" 2>&1 \
  | grep -E "^(decode|prefill|fla)" 
timeout 90 python3 benchmarks/e2e_server.py --concurrency 1 64 --prompt-tokens 512 --max-tokens 64 \
  --out "$OUT/e2e-server-h100.json" 2>&1 | tail -8
