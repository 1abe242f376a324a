"""How far our bf16 model is from our fp32 model on the fla parity check's input (runs on the CPU).

The fla parity bound for bf16 (5e-3 rel-RMS of logits between fla's bf16 model and ours) compares
two roundings of the same math. This measures the rounding alone: the same random checkpoint as
`fla_parity.py` (hidden 256, 2 layers, 4 heads, weights perturbed by 0.02), loaded by our loader in
fp32 and in bf16, T=200, batch 2, on the CPU's PyTorch path. If our own bf16 model sits further from
fp32 than the bound, the bound cannot separate a bug from rounding.

    python benchmarks/bf16_distance.py --out benchmarks/results/bf16-distance-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile

import torch


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bf16-distance.json")
    args = ap.parse_args()
    from model import GLAConfig, GLAForCausalLM, StatePool, load_checkpoint

    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(hidden_size=256, num_hidden_layers=2, num_heads=4, vocab_size=1000)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    ids = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(200))
    runs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = load_checkpoint(d, dtype=dtype, device="cpu")
        with torch.no_grad():
            forward = m(ids).logits.float()
        pool = StatePool(m.config, 4)
        slots = torch.tensor([3, 1], dtype=torch.int32)
        last = m.prefill(ids.flatten(), torch.tensor([0, 200, 400], dtype=torch.int32), pool, slots)
        step = m.decode(torch.tensor([5, 7]), pool, slots)
        runs[name] = (forward, last, step)
    res = {
        "forward_bf16_vs_fp32": rel_rms(runs["bf16"][0], runs["fp32"][0]),
        "prefill_last_bf16_vs_fp32": rel_rms(runs["bf16"][1], runs["fp32"][1]),
        "decode_step_bf16_vs_fp32": rel_rms(runs["bf16"][2], runs["fp32"][2]),
        "logits_std_fp32": float(runs["fp32"][0].std()),
        "meta": {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                 "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "command": "python benchmarks/bf16_distance.py"},
    }
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
