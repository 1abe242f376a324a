"""A resumed turn's prefill at the gla-1.3B shape: the short kernel's settings and the graph's rows.

Why: a resumed conversation's first token waits on one prefill graph of its ~17 new tokens (issue 5).
That graph cost ~2.0 ms on an H200 against ~1.4 ms for a batch-1 decode step reading the same
weights. Two suspects, measured here in one process (random bf16 weights):
  1. the token-by-token kernel (`kernels.triton_recurrent.SHORT`): ~1 us per token per layer, so
     its tile and warps are swept (kernel alone, 20 launches per CUDA graph; a sweep of the
     prefetch depth, since removed, found nothing: resume-prefill-sweep-h200-run9.json);
  2. the rows every GEMM of the graph runs: padding sequences used to take a token each, so the
     smallest graph had 64 + max_num_seqs + 1 rows (97 at the default 32); they are empty now and a
     17-token turn replays the 32-token graph. Both bucket sizes are captured and replayed
     round-robin with the same 17 real tokens.

    python benchmarks/bench_resume_prefill.py --out resume-prefill.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
from typing import Any

import torch

from benchmarks.e2e import cuda_time_ms

SHAPE = {"H": 4, "K": 256, "V": 512}
SHORT_VARIANTS = [
    {"TILE_ELEMS": te, "num_warps": nw}
    for (te, nw) in ((4096, 2), (4096, 4), (2048, 1), (2048, 2), (1024, 1), (1024, 2), (512, 1), (256, 1))
]


def graph_us(fn: Any, reps: int = 20) -> float:
    """GPU time of one fn() call, from a CUDA graph of `reps` calls (no launch gaps but the graph's)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return 1e3 * cuda_time_ms(g.replay, iters=20, warmup=3) / reps


def sweep_short(res: dict, tokens: list[int]) -> None:
    from kernels.triton_recurrent import SHORT, short_prefill_triton

    H, K, V = SHAPE["H"], SHAPE["K"], SHAPE["V"]
    default = dict(SHORT)
    pool = torch.randn(4, H, V, K, device="cuda") * 0.1
    for T in tokens:
        Tp = T + 3  # one real sequence + one padding sequence of 3 tokens (slot -1)
        q, k, v = (torch.randn(Tp, H, d, device="cuda", dtype=torch.bfloat16) for d in (K, K, V))
        g = (torch.nn.functional.logsigmoid(torch.randn(Tp, H, K, device="cuda")) / 16).to(torch.bfloat16)
        cu = torch.tensor([0, T, Tp], dtype=torch.int32, device="cuda")
        slots = torch.tensor([1, -1], dtype=torch.int32, device="cuda")
        mask = torch.tensor([True, False], device="cuda")
        for var in SHORT_VARIANTS:
            SHORT.update(var)
            name = f"T{T}-tile{var['TILE_ELEMS']}-w{var['num_warps']}"
            try:
                args = (q, k, v, g, cu, pool, slots)
                us = graph_us(lambda a=args, m=mask: short_prefill_triton(*a, initial_state_mask=m))
                res["short_kernel"][name] = {"T": T, **var, "us": us}
                print(f"short kernel {name}: {us:.2f} us", flush=True)
            except Exception as exc:  # report a failing variant, keep the others
                res["short_kernel"][name] = {"T": T, **var, "error": f"{type(exc).__name__}: {exc}"}
                print(f"short kernel {name} failed: {exc!r}", flush=True)
    SHORT.clear()
    SHORT.update(default)


def graph_rows(model: Any, pool: Any, n_new: int, max_seqs_list: list[int], res: dict, rounds: int = 7) -> None:
    """The 17-token prefill replayed from the new smallest bucket and from the old one's size."""
    from model.cuda_graph import GraphedPrefiller, pad_layout

    ids = torch.randint(3, model.config.vocab_size, (n_new,)).tolist()
    for max_seqs in max_seqs_list:
        old = 64 + max_seqs + 1
        buckets = [16 * ((n_new + 15) // 16), old]
        gp = GraphedPrefiller(model, pool, pool.num_slots - 1, max_seqs, buckets)
        layouts = {}
        for b in buckets:
            cu, slots, mask = pad_layout(n_new, [0, n_new], [0], [True], gp.num_seqs, b)  # type: ignore[misc]
            layouts[b] = (torch.tensor(cu, dtype=torch.int32), torch.tensor(slots, dtype=torch.int32),
                          torch.tensor(mask))
        gp.ids[:n_new].copy_(torch.tensor(ids))
        times: dict[int, list[float]] = {b: [] for b in buckets}
        for _ in range(rounds):
            for b in buckets:
                cu, slots, mask = layouts[b]
                gp.cu.copy_(cu)
                gp.slots.copy_(slots)
                gp.mask.copy_(mask)
                times[b].append(cuda_time_ms(gp.graphs[b, True].replay, iters=20, warmup=2))
        for b in buckets:
            key = f"max_seqs{max_seqs}-bucket{b}"
            ms = statistics.median(times[b])
            res["graph"][key] = {"max_seqs": max_seqs, "bucket": b, "ms": ms,
                                 "rounds": times[b], "old_layout": b == old}
            print(f"prefill graph {n_new} tokens {key}: {ms:.3f} ms", flush=True)
        del gp
        torch.cuda.synchronize()


def decode_b1(model: Any, pool: Any, res: dict) -> None:
    from model.cuda_graph import GraphedDecoder

    dec = GraphedDecoder(model, pool, pool.num_slots - 1, max_batch=1, buckets=[1])
    tok = torch.randint(0, model.config.vocab_size, (1,), device="cuda")
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    res["decode_b1_graph_ms"] = statistics.median(
        cuda_time_ms(lambda: dec(tok, slots), iters=30, warmup=3) for _ in range(5))
    print(f"decode B=1 graph: {res['decode_b1_graph_ms']:.3f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="resume-prefill.json")
    ap.add_argument("--resume-tokens", type=int, default=17, help="new tokens of the resumed turn (16 + pending)")
    ap.add_argument("--max-seqs", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 17, 64], help="short-kernel sweep lengths")
    ap.add_argument("--sweep-only", action="store_true", help="only the short-kernel sweep")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    from benchmarks.bench_small_steps import random_13b_model

    res: dict[str, Any] = {"meta": {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "command": "python benchmarks/bench_resume_prefill.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "skip_sweep", "sweep_only")),
    }, "short_kernel": {}, "graph": {}}
    if not args.skip_sweep:
        sweep_short(res, args.tokens)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.sweep_only:
        return
    model, pool = random_13b_model(max(args.max_seqs) + 2)
    decode_b1(model, pool, res)
    graph_rows(model, pool, args.resume_tokens, args.max_seqs, res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
