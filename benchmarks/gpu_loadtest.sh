#!/usr/bin/env bash
# Issue 8 item 3 on a GPU: `python -m loadtest` against a real `gla-serve serve` process serving a
# gla-1.3B-shaped checkpoint (random bf16 weights, the bundled tokenizer) at 64 concurrent streams.
# Writes the loadtest JSON and the server log to $OUT. Carry .whl (and .triton-cache if you have it).
set -u
source benchmarks/gpu_env.sh
python3 - <<'PY' || exit 1
import shutil, torch
from model import GLAConfig, GLAForCausalLM
from model.loader import bundled_model_path
cfg = GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24, vocab_size=32000)
torch.manual_seed(0)
with torch.device("cuda"):
    m = GLAForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained("/tmp/gla-1.3b-random")
for f in bundled_model_path().iterdir():
    if f.name.startswith(("tokenizer", "special_tokens")):
        shutil.copy(f, "/tmp/gla-1.3b-random/")
PY
GLA_MAX_NUM_SEQS=64 GLA_MAX_NUM_BATCHED_TOKENS=8192 python3 -m server.cli serve --model /tmp/gla-1.3b-random \
  --port 8123 > "$OUT/serve.log" 2>&1 &
for _ in $(seq 1 120); do curl -sf localhost:8123/ready >/dev/null && break; sleep 1; done
curl -s localhost:8123/health | cut -c1-200; echo
timeout 240 python3 -m loadtest --base-url http://127.0.0.1:8123 --concurrency 64 --num-requests 512 \
  --prompt-words 300 --max-tokens 64 --temperature 0 --progress none --json --output "$OUT/loadtest-64.json" \
  2>&1 | tail -25
kill %1 2>/dev/null; wait
