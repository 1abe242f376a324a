"""End-to-end GPU benchmark: gla-1.3B shape (random bf16 weights), ours vs fla + HF generate().

Measures, in one process on one GPU:
  (a) batch-1 decode step latency (CUDA graph) against the floor (weight + state bytes) / copy BW;
  (b) aggregate decode tokens/s at 1, 16, 64, 256 concurrent sequences;
  (c) prefill time (time to first token at the model level) for 1K-32K-token prompts;
  (d) decode step latency at contexts of 1K, 16K and 128K tokens;
  (e) fla 0.6.0 GLAForCausalLM + HF generate() on the same shapes (1024-token prompt, N new tokens)
      and fla's model forward for a 2048-token prompt, as ratios.

    python benchmarks/e2e.py --out benchmarks/results/e2e-h100.json [--quick] [--no-fla]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import time

import torch


def cuda_time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs() -> float:
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time_ms(lambda: y.copy_(x), iters=20)
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e9


def build_ours(cfg, num_slots: int):
    from model import GLAForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        m = GLAForCausalLM(cfg).to(torch.bfloat16).eval()
    return m, m.new_state_pool(num_slots)


def run_ours(cfg, batches: list[int], quick: bool) -> dict:
    from model import state_bytes_per_sequence
    from model.cuda_graph import GraphedDecoder

    res: dict = {"config": "gla-1.3B shape, random bf16 weights"}
    bw = copy_bandwidth_gbs()
    res["copy_bandwidth_GBps"] = bw
    model, pool = build_ours(cfg, max(batches) + 1)
    scratch = pool.num_slots - 1
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # embeddings are gathered, not streamed: the decode floor reads every other weight once
    streamed = weight_bytes - model.model.embeddings.weight.numel() * 2
    state_b = state_bytes_per_sequence(cfg)
    res["weight_bytes"], res["state_bytes_per_seq"] = weight_bytes, state_b

    t0 = time.perf_counter()
    dec = GraphedDecoder(model, pool, scratch_slot=scratch, max_batch=max(batches), buckets=batches)
    res["graph_capture_s"] = time.perf_counter() - t0
    # (a)+(b) decode steps from a real prefilled state (1K context)
    ctx = 1024
    ids = torch.randint(0, cfg.vocab_size, (max(batches), ctx), device="cuda")
    decode = {}
    for b in batches:
        slots = torch.arange(b, dtype=torch.int32, device="cuda")
        cu = torch.arange(0, (b + 1) * ctx, ctx, dtype=torch.int32, device="cuda")
        for i in range(0, b, 16):  # prefill in groups to bound activation memory
            j = min(b, i + 16)
            model.prefill(ids[i:j].flatten(), cu[: j - i + 1] - cu[0], pool, slots[i:j])
        tok = torch.randint(0, cfg.vocab_size, (b,), device="cuda")
        ms_graph = cuda_time_ms(lambda tok=tok, slots=slots: dec(tok, slots), iters=50)
        ms_eager = cuda_time_ms(lambda tok=tok, slots=slots: model.decode(tok, pool, slots), iters=10)
        floor_ms = (streamed + b * 2 * state_b) / (bw * 1e9) * 1e3
        decode[b] = {"graph_ms": ms_graph, "eager_ms": ms_eager, "tok_per_s": b / ms_graph * 1e3,
                     "floor_ms": floor_ms, "ratio_to_floor": ms_graph / floor_ms}
        print(f"decode B={b}: graph {ms_graph:.3f} ms eager {ms_eager:.2f} ms floor {floor_ms:.3f} ms "
              f"-> {b / ms_graph * 1e3:.0f} tok/s", flush=True)
    res["decode"] = decode

    # (c) prefill / model-level TTFT
    prefill = {}
    for T in ([1024, 2048, 8192] if quick else [1024, 2048, 4096, 8192, 16384, 32768]):
        x = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        sl = torch.tensor([0], dtype=torch.int32, device="cuda")
        ms = cuda_time_ms(lambda x=x, cu=cu, sl=sl: model.prefill(x, cu, pool, sl), iters=5, warmup=2)
        prefill[T] = {"ms": ms, "tok_per_s": T / ms * 1e3}
        print(f"prefill T={T}: {ms:.2f} ms", flush=True)
    res["prefill"] = prefill
    res["prefill_graphed"] = graphed_prefill(model, pool, scratch, [T for T in prefill if T <= 8192])

    # (d) decode latency vs context length (batch 1, graph)
    vs_ctx = {}
    sl = torch.tensor([0], dtype=torch.int32, device="cuda")
    for T in [1024, 16384, 131072]:  # the fixed-size state: latency must not grow with context
        done = 0
        pool.zero_([0])
        while done < T:  # build the context in 16K pieces, resuming from the slot
            n = min(16384, T - done)
            x = torch.randint(0, cfg.vocab_size, (n,), device="cuda")
            model.prefill(x, torch.tensor([0, n], dtype=torch.int32, device="cuda"), pool, sl,
                          torch.tensor([done > 0], device="cuda"))
            done += n
        tok = torch.randint(0, cfg.vocab_size, (1,), device="cuda")
        vs_ctx[T] = cuda_time_ms(lambda tok=tok: dec(tok, sl), iters=50)
        print(f"decode at context {T}: {vs_ctx[T]:.3f} ms", flush=True)
    res["decode_vs_context_ms"] = vs_ctx
    return res


def graphed_prefill(model, pool, scratch: int, lengths: list[int]) -> dict:
    """Model-level prefill replayed from CUDA graphs (model.cuda_graph.GraphedPrefiller): what the
    engine's `cuda_graph_prefill` setting would save in host time. Errors are reported, not raised."""
    from model.cuda_graph import GraphedPrefiller

    out: dict = {}
    try:
        gp = GraphedPrefiller(model, pool, scratch, max_seqs=1, buckets=[T + 1 for T in lengths])
        for T in lengths:
            ids = torch.randint(0, model.config.vocab_size, (T,)).tolist()
            ms = cuda_time_ms(lambda ids=ids, T=T: gp(ids, [0, T], [0], [False]), iters=10, warmup=2)
            out[T] = {"ms": ms}
            print(f"prefill graphed T={T}: {ms:.2f} ms", flush=True)
    except Exception as exc:  # experimental path: say why, keep the rest of the run
        out["error"] = f"{type(exc).__name__}: {exc}"
        print("prefill graphed failed:", out["error"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="decode batch sizes (default 1 16 64, or 1 16 64 256 without --quick)")
    ap.add_argument("--fla-batches", type=int, nargs="+", default=None,
                    help="batch sizes of fla + HF generate (default: those <= 16 with --quick, else <= 64)")
    args = ap.parse_args()
    from model import GLAConfig

    cfg = GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24, vocab_size=32000)
    batches = args.batches or ([1, 16, 64] if args.quick else [1, 16, 64, 256])
    res = run_ours(cfg, batches, args.quick)
    res["meta"] = meta(args)
    save(args.out, res)  # a run cut off inside the fla part still leaves ours
    torch.cuda.empty_cache()

    if not args.no_fla:
        res["fla"] = {}
        fla_batches = args.fla_batches or [b for b in batches if b <= (16 if args.quick else 64)]
        run_fla(cfg, fla_batches, args.new_tokens, out=res["fla"],
                save=lambda: save(args.out, res))
        for b, r in res["fla"]["generate"].items():
            ours = res["decode"].get(int(b))
            if ours:
                r["ours_over_fla_decode_tok_s"] = ours["tok_per_s"] / r["decode_tok_per_s"]
        if 2048 in res["prefill"]:
            res["fla"]["prefill_2048_ratio"] = res["fla"]["forward_2048_ms"] / res["prefill"][2048]["ms"]
    save(args.out, res)
    print(json.dumps(res, indent=1, default=str))


def meta(args: argparse.Namespace) -> dict:
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        or "unknown",
        "command": " ".join(["python benchmarks/e2e.py", *(["--quick"] if args.quick else []),
                             *(["--no-fla"] if args.no_fla else []),
                             *(["--batches", *map(str, args.batches)] if args.batches else []),
                             *(["--fla-batches", *map(str, args.fla_batches)] if args.fla_batches else []),
                             f"--new-tokens {args.new_tokens}"]),
    }


def save(path: str, res: dict) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=2, default=str)


def run_fla(cfg, batches: list[int], new_tokens: int, out: dict, save) -> dict:
    """fla's GLAForCausalLM + HF generate(): greedy, 1024-token prompt, `new_tokens` new tokens."""
    import fla
    from fla.models import GLAConfig as FlaConfig
    from fla.models import GLAForCausalLM as FlaModel

    fcfg = FlaConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = FlaModel(fcfg).to(torch.bfloat16).eval()
    out.update({"fla_version": getattr(fla, "__version__", "?"), "generate": {}})
    x = torch.randint(0, 32000, (1, 2048), device="cuda")
    with torch.no_grad():
        out["forward_2048_ms"] = cuda_time_ms(lambda m=m, x=x: m(x, use_cache=True), iters=5, warmup=2)
        print(f"fla forward T=2048: {out['forward_2048_ms']:.2f} ms", flush=True)
        save()
        for b in batches:
            prompt = torch.randint(0, 32000, (b, 1024), device="cuda")
            mask = torch.ones_like(prompt)
            kw = dict(attention_mask=mask, do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
            m.generate(prompt, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m.generate(prompt, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
            torch.cuda.synchronize()
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.generate(prompt, **kw)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            dec_s = max(total - t_prefill, 1e-9)
            out["generate"][b] = {"total_s": total, "tok_per_s": b * new_tokens / total,
                                  "decode_tok_per_s": b * (new_tokens - 1) / dec_s}
            print(f"fla generate B={b}: {b * new_tokens / total:.1f} tok/s overall, "
                  f"{b * (new_tokens - 1) / dec_s:.1f} tok/s decode", flush=True)
            save()
    return out


if __name__ == "__main__":
    main()
