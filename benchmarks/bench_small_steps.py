"""The two small steps a resumed conversation's first token waits on, at the gla-1.3B shape.

Why: the device tier's resumed turn (issue 5) and batch-1 decode (issue 8) are both a few short
GPU steps bound by kernel count and launch gaps, not bytes. This measures, in one process (random
bf16 weights):
  - the batch-1 decode step replayed from a CUDA graph with and without the prep-in-decode fusion
    (`kernels.DECODE_PROJ`), each variant captured afresh;
  - the prefill of a resumed turn (`--resume-tokens` new tokens from a state in the slot) replayed
    from the engine's prefill graphs (`model.cuda_graph.GraphedPrefiller`, the buckets the engine
    captures) at max_num_seqs 1, 32 and 64 (graphs hold max_num_seqs + 1 sequences: padding ones
    write the scratch slot), and eagerly;
  - the per-kernel GPU time of both (torch.profiler).

    python benchmarks/bench_small_steps.py --out small-steps.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import time
from typing import Any

import torch

from benchmarks.e2e import copy_bandwidth_gbs, cuda_time_ms
from benchmarks.profile_gpu import kernel_profile


def wall_ms(fn: Any, iters: int = 30, warmup: int = 3) -> float:
    """Median host wall time of fn() through its GPU work (synchronised): what a first token waits."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def decode_variants(model: Any, pool: Any, variants: list[dict[str, Any]], res: dict, rounds: int = 7) -> None:
    """Every variant's graph is captured first, then the replays are timed round-robin, `rounds` times:
    the GPU's clocks drift over a run by more than the differences between variants."""
    import kernels
    from model.cuda_graph import GraphedDecoder

    tok = torch.randint(0, model.config.vocab_size, (1,), device="cuda")
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    decoders = {}
    from kernels import _launch, triton_gemv

    # variant key -> (the config dict, its entry) it sets; unset keys keep the current value
    knobs = {"decode_proj": (kernels.DECODE_PROJ, "enabled"), "gemv": (kernels.GEMV_ROUTE, "enabled"),
             "prenorm": (kernels.GEMV_ROUTE, "prenorm"), "pdl": (_launch.PDL, "fused"),
             "gemv_pdl": (triton_gemv.GEMV, "PDL")}
    saved = {k: d[e] for k, (d, e) in knobs.items()}
    for var in variants:
        for k, (d, e) in knobs.items():
            d[e] = type(saved[k])(var.get(k, saved[k]))
        name = f"proj{int(var['decode_proj'])}" + "".join(
            f"-{k}{int(var[k])}" for k in ("gemv", "gemv_pdl", "pdl", "prenorm") if k in var)
        try:
            decoders[name] = GraphedDecoder(model, pool, pool.num_slots - 1, max_batch=1, buckets=[1])
            with torch.no_grad():
                prof = kernel_profile(lambda: model.decode(tok, pool, slots))
            res["decode_b1"][name] = {**var, "eager_profile": prof, "graph_ms_rounds": []}
        except Exception as exc:  # report a failing variant, keep the others
            res["decode_b1"][name] = {**var, "error": f"{type(exc).__name__}: {exc}"}
            print(f"decode B=1 {name} failed: {exc!r}", flush=True)
    for _ in range(rounds):
        for name, dec in decoders.items():
            ms = cuda_time_ms(lambda dec=dec: dec(tok, slots), iters=30, warmup=3)
            res["decode_b1"][name]["graph_ms_rounds"].append(ms)
    for name in decoders:
        row = res["decode_b1"][name]
        row["graph_ms"] = statistics.median(row["graph_ms_rounds"])
        prof = row["eager_profile"]
        print(f"decode B=1 {name}: graph {row['graph_ms']:.3f} ms (rounds "
              f"{' '.join(f'{x:.3f}' for x in row['graph_ms_rounds'])}), eager {prof['kernels_per_call']:.0f} "
              f"kernels {prof['gpu_us_per_call']:.0f} us GPU", flush=True)
    for k, (d, e) in knobs.items():
        d[e] = saved[k]


def resume_prefill(model: Any, pool: Any, n_new: int, max_seqs_list: list[int], res: dict) -> None:
    from model.cuda_graph import GraphedPrefiller, pad_layout
    from server.engine import prefill_buckets
    from server.settings import Settings

    ids = torch.randint(3, model.config.vocab_size, (n_new,)).tolist()
    for max_seqs in max_seqs_list:
        buckets = prefill_buckets(Settings(max_num_seqs=max_seqs, device="cuda")) or []
        small = [b for b in buckets if b <= 256]  # the ones a short resume can hit
        try:
            gp = GraphedPrefiller(model, pool, pool.num_slots - 1, max_seqs, small)
            bucket = gp.bucket_for(n_new, 1)
            ms = wall_ms(lambda gp=gp: gp(ids, [0, n_new], [0], [True]))
            # the same inputs (loaded by the call above) through each captured variant: the chunked
            # graph with padding in PAD_SLOT, and as before this change (padding writing the scratch slot)
            replays = {}
            for name, key in (("short", (bucket, True)), ("chunked", (bucket, False))):
                if key in gp.graphs:
                    replays[name] = wall_ms(gp.graphs[key].replay)
            gp.slots[1:].fill_(pool.num_slots - 1)
            replays["chunked_scratch_padding"] = wall_ms(gp.graphs[bucket, False].replay)
            short = (bucket, True) in gp.graphs
            cu_l, slots_l, mask_l = pad_layout(n_new, [0, n_new], [0], [True], gp.num_seqs, bucket)
            args_l = (torch.tensor(cu_l, dtype=torch.int32, device="cuda"),
                      torch.tensor(slots_l, dtype=torch.int32, device="cuda"),
                      torch.tensor(mask_l, dtype=torch.bool, device="cuda"))
            with torch.no_grad():
                prof = kernel_profile(lambda gp=gp, a=args_l, b=bucket, cu_l=cu_l, sh=short: model.prefill(
                    gp.ids[:b], a[0], pool, a[1], a[2], cu_seqlens_host=cu_l, short=sh), reps=3)
            res["resume_prefill"][f"graph-max_seqs{max_seqs}"] = {
                "max_seqs": max_seqs, "bucket_tokens": bucket, "wall_ms": ms, "replay_ms": replays,
                "profile": prof}
            print(f"resume prefill {n_new} tokens, graphed, max_seqs {max_seqs} (bucket {bucket}): {ms:.3f} ms "
                  f"(replays {', '.join(f'{k} {v:.3f}' for k, v in replays.items())}); "
                  f"eager layout {prof['kernels_per_call']:.0f} kernels {prof['gpu_us_per_call']:.0f} us GPU",
                  flush=True)
            del gp
        except Exception as exc:
            res["resume_prefill"][f"graph-max_seqs{max_seqs}"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"resume prefill graphed max_seqs {max_seqs} failed: {exc!r}", flush=True)
    x = torch.tensor(ids, device="cuda")
    cu = torch.tensor([0, n_new], dtype=torch.int32, device="cuda")
    sl = torch.zeros(1, dtype=torch.int32, device="cuda")
    for short in (True, False):
        with torch.no_grad():
            ms = wall_ms(lambda sh=short: model.prefill(x, cu, pool, sl, cu_seqlens_host=[0, n_new], short=sh))
            prof = kernel_profile(lambda sh=short: model.prefill(x, cu, pool, sl, cu_seqlens_host=[0, n_new],
                                                                 short=sh))
        name = "eager-short" if short else "eager-chunked"
        res["resume_prefill"][name] = {"wall_ms": ms, "profile": prof}
        print(f"resume prefill {n_new} tokens, {name}: {ms:.3f} ms; {prof['kernels_per_call']:.0f} kernels "
              f"{prof['gpu_us_per_call']:.0f} us GPU", flush=True)


def random_13b_model(num_slots: int) -> tuple[Any, Any]:
    """The gla-1.3B config with random bf16 weights, fused for inference, and a pool of random states."""
    from model import GLAConfig, GLAForCausalLM

    cfg = GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GLAForCausalLM(cfg).to(torch.bfloat16).eval()
    model.fuse_for_inference()
    pool = model.new_state_pool(num_slots)
    with torch.no_grad():
        for t in pool.recurrent:
            t.normal_(0, 0.1)
    return model, pool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="small-steps.json")
    ap.add_argument("--resume-tokens", type=int, default=17, help="new tokens of the resumed turn (16 + pending)")
    ap.add_argument("--max-seqs", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--decode-only", action="store_true", help="skip the resumed-turn prefill part")
    ap.add_argument("--pdl", action="store_true",
                    help="decode variants: GEMV route x programmatic dependent launch x norm_gemv prologue")
    args = ap.parse_args()
    from model import state_bytes_per_sequence

    model, pool = random_13b_model(max(args.max_seqs) + 2)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not cfg.tie_word_embeddings:  # one embedding row is read, not the table
        weight_bytes -= model.model.embeddings.weight.numel() * model.model.embeddings.weight.element_size()
    bw = copy_bandwidth_gbs()
    res: dict[str, Any] = {"meta": {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "command": f"python benchmarks/bench_small_steps.py --resume-tokens {args.resume_tokens} --max-seqs "
                   + " ".join(map(str, args.max_seqs)) + (" --decode-only" if args.decode_only else "")
                   + (" --pdl" if args.pdl else ""),
        "copy_gbps": bw, "streamed_weight_bytes": weight_bytes,
        "state_bytes": state_bytes_per_sequence(cfg),
        "floor_b1_ms": (weight_bytes + 2 * state_bytes_per_sequence(cfg)) / (bw * 1e9) * 1e3,
    }, "decode_b1": {}, "resume_prefill": {}}
    print(f"copy {bw:.0f} GB/s; B=1 floor {res['meta']['floor_b1_ms']:.3f} ms", flush=True)
    if args.pdl:  # issue 8: programmatic dependent launch, with cuBLAS GEMMs and with the Triton GEMVs
        variants = [{"decode_proj": True, "gemv": g, "gemv_pdl": gp, "pdl": f, "prenorm": n}
                    for g, gp, f, n in ((0, 0, 0, 0), (0, 0, 1, 0), (1, 0, 0, 0), (1, 0, 0, 1),
                                        (1, 1, 0, 0), (1, 1, 1, 0), (1, 1, 1, 1))]
    else:
        variants = [{"decode_proj": p} for p in (False, True)]
    decode_variants(model, pool, variants, res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if not args.decode_only:
        resume_prefill(model, pool, args.resume_tokens, args.max_seqs, res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
