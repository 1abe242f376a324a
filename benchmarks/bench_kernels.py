"""Kernel benchmark on a CUDA GPU: our Triton prefill/decode vs fla-core in the same process, same inputs.

    python benchmarks/bench_kernels.py --out kernels-h100.json [--quick] [--sweep]

GPU time is the median over CUDA-graph replays (events); `eager_ms` is wall time per call with the GPU
synchronised once per batch of calls; `host_us` is the Python time per call before any sync.
Prefill FLOPs (same formula for both, so the ratio is the time ratio): per token and head
4*K*V (state update k v^T + inter-chunk q S) + BT*(K+V) (causal half of the BT=64 intra-chunk q k^T and
A v), i.e. F = T*H*(4KV + 64(K+V)). Decode bytes: the fp32 state read and written (2*B*H*V*K*4) plus
q, k, g, v in and o out in the input dtype.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from kernels import triton_chunk, triton_recurrent
from kernels.triton_chunk import chunk_gla_prefill_triton
from kernels.triton_recurrent import fused_recurrent_gla_decode_triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemv import capture_graph  # noqa: E402

SHAPES = {"gla-1.3B": (4, 256, 512), "gla-340M": (4, 128, 256)}


def graph_ms(fn: Callable[[], object], reps: int = 20) -> tuple[float, str]:
    """Median GPU ms per call from CUDA-graph replays; falls back to do_bench if capture fails."""
    try:
        graph = capture_graph(fn)[0]
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(5):
                graph.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 5)
        return statistics.median(times), "graph"
    except Exception as exc:  # fla's varlen path syncs on the host, which capture forbids
        print(f"  (graph capture failed: {type(exc).__name__}; using do_bench)", file=sys.stderr)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench"


def eager(fn: Callable[[], object], n: int = 30) -> tuple[float, float]:
    """(wall ms per call incl. GPU, host us per call before sync)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    return wall, host


def prefill_inputs(lens: list[int], H: int, K: int, V: int):  # type: ignore[no-untyped-def]
    T = sum(lens)
    gen = torch.Generator(device="cuda").manual_seed(T)
    q, k = (torch.randn(T, H, K, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    v = torch.randn(T, H, V, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = (F.logsigmoid(torch.randn(T, H, K, device="cuda", generator=gen)) / 16).to(torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, g, cu


def bench_prefill(name: str, lens: list[int], with_fla: bool, seg: int | None = None,
                  timing_eager: bool = True) -> dict:
    H, K, V = SHAPES[name]
    T, N = sum(lens), len(lens)
    q, k, v, g, cu = prefill_inputs(lens, H, K, V)
    pool = torch.randn(N, H, V, K, device="cuda", generator=torch.Generator(device="cuda").manual_seed(N)) * 0.1
    slots = torch.arange(N, dtype=torch.int32, device="cuda")
    ours = lambda: chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots, seg_len=seg)
    flops = T * H * (4 * K * V + 64 * (K + V))
    ms, how = graph_ms(ours)
    wall, host = eager(ours, n=10) if timing_eager else (float("nan"), float("nan"))
    row = {"kernel": "prefill", "shape": name, "B": N, "T": lens[0], "H": H, "K": K, "V": V,
           "seg": seg or "auto", "ours_ms": ms, "ours_timing": how, "ours_tflops": flops / ms / 1e9,
           "ours_eager_ms": wall, "ours_host_us": host}
    if with_fla:
        from fla.ops.gla import chunk_gla

        h0 = pool.clone()
        if N == 1:
            fla = lambda: chunk_gla(q[None], k[None], v[None], g[None], initial_state=h0,
                                    output_final_state=True, state_v_first=True)
        else:
            cu64, cu_cpu = cu.long(), cu.long().cpu()
            fla = lambda: chunk_gla(q[None], k[None], v[None], g[None], initial_state=h0,
                                    output_final_state=True, state_v_first=True, cu_seqlens=cu64,
                                    cu_seqlens_cpu=cu_cpu)
        fms, fhow = graph_ms(fla)
        fwall, fhost = eager(fla, n=10)
        row.update({"fla_ms": fms, "fla_timing": fhow, "fla_tflops": flops / fms / 1e9, "fla_eager_ms": fwall,
                    "fla_host_us": fhost, "speedup": fms / ms})
    return row


def bench_decode(name: str, B: int, with_fla: bool, gated: bool = False, timing_eager: bool = True) -> dict:
    H, K, V = SHAPES[name]
    # a private generator: a failed graph capture (fla's varlen path) leaves the default one unusable
    gen = torch.Generator(device="cuda").manual_seed(B)
    q, k = (torch.randn(B, H, K, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    v = torch.randn(B, H, V, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = (F.logsigmoid(torch.randn(B, H, K, device="cuda", generator=gen)) / 16).to(torch.bfloat16)
    S = 2 * B
    pool = torch.randn(S, H, V, K, device="cuda", generator=gen) * 0.1
    slots = torch.randperm(S, device="cuda", generator=gen)[:B].to(torch.int32)
    gate = torch.randn(B, H, V, device="cuda", dtype=torch.bfloat16, generator=gen) if gated else None
    w = torch.rand(V, device="cuda", dtype=torch.bfloat16, generator=gen) if gated else None
    ours = lambda: fused_recurrent_gla_decode_triton(q, k, v, g, pool, slots, gate=gate, norm_weight=w)
    nbytes = 2 * B * H * V * K * 4 + (3 * B * H * K + 2 * B * H * V) * 2
    ms, how = graph_ms(ours, reps=50)
    wall, host = eager(ours, n=100) if timing_eager else (float("nan"), float("nan"))
    row = {"kernel": "decode" + ("+gate" if gated else ""), "shape": name, "B": B, "H": H, "K": K, "V": V,
           "ours_ms": ms, "ours_timing": how, "ours_gbps": nbytes / ms / 1e6, "ours_eager_ms": wall,
           "ours_host_us": host}
    if with_fla:
        from fla.ops.gla import fused_recurrent_gla

        h0 = pool[:B].clone()
        fla = lambda: fused_recurrent_gla(q[:, None], k[:, None], v[:, None], gk=g[:, None], initial_state=h0,
                                          output_final_state=True, state_v_first=True)
        fms, fhow = graph_ms(fla, reps=50)
        fwall, fhost = eager(fla, n=100)
        row.update({"fla_ms": fms, "fla_timing": fhow, "fla_gbps": nbytes / fms / 1e6, "fla_eager_ms": fwall,
                    "fla_host_us": fhost, "speedup": fms / ms})
    return row


def ceilings() -> dict:
    x = torch.randn(2**29, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return {"copy_gbps": 2 * 2**31 / copy_ms / 1e6, "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


def sweep(rows: list[dict]) -> dict:
    """Time a few tile/warp/stage/wave settings per head dim at T=2K and 32K; keep the best."""
    chosen = {}
    grid = {256: [(32, 4, 2, 2), (64, 8, 1, 1), (64, 4, 1, 2), (64, 8, 1, 2), (32, 4, 1, 4)],
            128: [(64, 4, 2, 2), (64, 8, 1, 1), (32, 4, 2, 4)]}
    for name, (_, K, _) in SHAPES.items():
        best = None
        for bv, nw, ns, waves in grid[K]:
            triton_chunk.CONFIGS[K] = {"BV": bv, "num_warps": nw, "num_stages": ns, "waves": waves}
            try:
                ms = [bench_prefill(name, lens, False, timing_eager=False) for lens in ([2048], [32768])]
            except Exception as exc:  # e.g. out of shared memory for this tile
                print(f"sweep {name} BV={bv} nw={nw} ns={ns} waves={waves}: {type(exc).__name__}", flush=True)
                continue
            for r in ms:
                r.update(sweep=True, BV=bv, num_warps=nw, num_stages=ns, waves=waves)
                rows.append(r)
            score = ms[0]["ours_ms"] / 0.1 + ms[1]["ours_ms"] / 1.6  # both lengths, fla-relative weight
            print(f"sweep {name} BV={bv} nw={nw} ns={ns} waves={waves}: T=2K {ms[0]['ours_ms'] * 1e3:.1f} us, "
                  f"T=32K {ms[1]['ours_ms'] * 1e3:.1f} us", flush=True)
            if best is None or score < best[0]:
                best = (score, dict(triton_chunk.CONFIGS[K]))
        if best is not None:
            triton_chunk.CONFIGS[K] = best[1]
            chosen[name] = best[1]
    print("chosen:", chosen, flush=True)
    return chosen


def sweep_prep(rows: list[dict]) -> dict:
    """The prep kernel's key block and warps, scored on both shapes at T=2K and 32K (fla-relative)."""
    best = None
    for bkc, nw, bkd in ((32, 4, 0), (32, 4, 4), (32, 4, 8), (64, 4, 8), (32, 8, 8), (64, 8, 8), (32, 8, 4)):
        triton_chunk.PREP.update(BKC=bkc, num_warps=nw, BKD=bkd)
        try:
            ms = [bench_prefill(name, lens, False, timing_eager=False) for name in SHAPES
                  for lens in ([2048], [32768])]
        except Exception as exc:
            print(f"sweep prep BKC={bkc} nw={nw} BKD={bkd}: {type(exc).__name__}", flush=True)
            continue
        for r in ms:
            r.update(sweep="prep", BKC=bkc, prep_warps=nw, BKD=bkd)
            rows.append(r)
        score = sum(r["ours_ms"] / ref for r, ref in zip(ms, (0.1, 1.6, 0.05, 0.8), strict=True))
        times = ", ".join(f"{r['shape']} T={r['T']} {r['ours_ms'] * 1e3:.1f} us" for r in ms)
        print(f"sweep prep BKC={bkc} nw={nw} BKD={bkd}: {times}", flush=True)
        if best is None or score < best[0]:
            best = (score, {"BKC": bkc, "num_warps": nw, "BKD": bkd})
    assert best is not None
    triton_chunk.PREP.update(best[1])
    print("chosen prep:", best[1], flush=True)
    return best[1]


def sweep_split(rows: list[dict]) -> int:
    """Up to how many (chunk, head) programs the split-K prep (atomic A) beats the serial one."""
    limit = 0
    for T in (512, 1024, 2048, 4096, 8192):
        times = {}
        for name in SHAPES:
            for on in (False, True):
                triton_chunk.PREP["SPLIT_MAX_PROGRAMS"] = 10**9 if on else 0
                r = bench_prefill(name, [T], False, timing_eager=False)
                r.update(sweep="split", split=on)
                rows.append(r)
                times[name, on] = r["ours_ms"]
        wins = all(times[n, True] < times[n, False] for n in SHAPES)
        print(f"sweep split T={T}: " + ", ".join(f"{n} {times[n, False] * 1e3:.1f} -> {times[n, True] * 1e3:.1f} us"
                                                  for n in SHAPES), flush=True)
        if not wins:
            break
        limit = (T // 64 + 1) * SHAPES["gla-1.3B"][0]
    triton_chunk.PREP["SPLIT_MAX_PROGRAMS"] = limit
    print("chosen split limit (programs):", limit, flush=True)
    return limit


def sweep_decode(rows: list[dict]) -> dict:
    """Decode tile size and warps, scored on the 1.3B shape at B=1, 64 and 256."""
    best = None
    for tile, nw in ((8192, 4), (4096, 4), (8192, 8), (16384, 8), (2048, 4), (4096, 2)):
        triton_recurrent.DECODE.update(TILE_ELEMS=tile, num_warps=nw)
        ms = [bench_decode("gla-1.3B", B, False, timing_eager=False) for B in (1, 64, 256)]
        for r in ms:
            r.update(sweep="decode", TILE_ELEMS=tile, decode_warps=nw)
            rows.append(r)
        score = sum(r["ours_ms"] / ref for r, ref in zip(ms, (0.008, 0.075, 0.27), strict=True))
        print(f"sweep decode tile={tile} nw={nw}: " + ", ".join(f"B={r['B']} {r['ours_ms'] * 1e3:.1f} us "
                                                              f"{r['ours_gbps']:.0f} GB/s" for r in ms), flush=True)
        if best is None or score < best[0]:
            best = (score, {"TILE_ELEMS": tile, "num_warps": nw})
    assert best is not None
    triton_recurrent.DECODE.update(best[1])
    print("chosen decode:", best[1], flush=True)
    return best[1]


def check_config() -> dict:
    """The chosen configs still compute the right thing (bf16 in, varlen, multi-segment)."""
    from kernels import naive_recurrent_gla

    out = {}
    for name, (H, K, V) in SHAPES.items():
        lens = [1000, 3000]
        q, k, v, g, cu = prefill_inputs(lens, H, K, V)
        pool = torch.randn(2, H, V, K, device="cuda") * 0.1
        h0 = pool.clone()
        o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, torch.arange(2, dtype=torch.int32, device="cuda"))
        errs = []
        for i, (a, b) in enumerate(((0, 1000), (1000, 4000))):
            ro, rs = naive_recurrent_gla(*(x[None, a:b].double() for x in (q, k, v, g)),
                                         initial_state=h0[i:i + 1].double(), output_final_state=True)
            errs.append(max(((o[a:b].double() - ro[0]).norm() / ro[0].norm()).item(),
                            ((pool[i].double() - rs[0]).norm() / rs[0].norm()).item()))
        out[name] = max(errs)
    return out


def profile(name: str, lens: list[int], who: str) -> dict:
    """GPU microseconds per call by kernel name (torch.profiler), to see what limits the prefill."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    H, K, V = SHAPES[name]
    q, k, v, g, cu = prefill_inputs(lens, H, K, V)
    pool = torch.randn(len(lens), H, V, K, device="cuda") * 0.1
    slots = torch.arange(len(lens), dtype=torch.int32, device="cuda")
    if who == "ours":
        fn = lambda: chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots)
    else:
        from fla.ops.gla import chunk_gla

        fn = lambda: chunk_gla(q[None], k[None], v[None], g[None], initial_state=pool, output_final_state=True,
                               state_v_first=True)
    fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            out[e.key[:60]] = round(t / 3, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def fmt(r: dict) -> str:
    what = f"T={r['T']}" if r["kernel"] == "prefill" else f"B={r['B']}"
    rate = f"{r['ours_tflops']:6.1f} TF/s" if "ours_tflops" in r else f"{r['ours_gbps']:6.0f} GB/s"
    s = (f"{r['kernel']:12} {r['shape']:9} {what:9} N={r['B'] if r['kernel'] == 'prefill' else '-':<3} "
         f"ours {r['ours_ms'] * 1e3:8.1f} us {rate}  eager {r['ours_eager_ms'] * 1e3:8.1f} us  "
         f"host {r['ours_host_us']:6.1f} us")
    if "fla_ms" in r:
        s += f" | fla {r['fla_ms'] * 1e3:8.1f} us host {r['fla_host_us']:6.1f} us | x{r['speedup']:.2f}"
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="skip 128K and the second shape")
    ap.add_argument("--sweep", action="store_true", help="also time segment lengths / V tiles")
    ap.add_argument("--sweep-prep", action="store_true", help="also time the prep kernel's key block / warps")
    ap.add_argument("--sweep-decode", action="store_true", help="also time decode tile sizes / warps")
    ap.add_argument("--sweep-split", action="store_true", help="also find where the split-K prep pays")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--parts", default="prefill,decode,profile", help="comma list: prefill, decode, profile")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    with_fla = not args.no_fla
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    if with_fla:
        import fla

        meta["fla"] = getattr(fla, "__version__", "?")
    meta.update(ceilings())
    print(json.dumps(meta))
    rows: list[dict] = []

    def save() -> None:  # after every row: a run cut off by its time limit still leaves its numbers
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)

    sweeps = ((args.sweep_prep, "chosen_prep", sweep_prep), (args.sweep_split, "chosen_split", sweep_split),
              (args.sweep, "chosen", sweep), (args.sweep_decode, "chosen_decode", sweep_decode))
    for wanted, name, run in sweeps:
        if wanted:  # each sweep leaves its choice in the kernels' config for what follows
            meta[name] = run(rows)
            save()
    meta["chosen_config_check"] = check_config()
    print("config check (rel-RMS vs float64, bf16 in):", meta["chosen_config_check"], flush=True)
    from kernels._launch import Launcher

    meta["configs"] = {"prefill": triton_chunk.CONFIGS, "prep": triton_chunk.PREP, "decode": triton_recurrent.DECODE,
                       "fast_launch_ok": Launcher.fast_ok}
    print("configs:", meta["configs"], flush=True)
    shapes = ["gla-1.3B"] if args.quick else args.shapes.split(",")
    for name in shapes:
        for lens in ([512], [2048], [8192], [32768], [131072], [2048] * 8):
            if "prefill" not in parts:
                break
            if args.quick and lens == [131072]:
                continue
            rows.append(bench_prefill(name, lens, with_fla))
            print(fmt(rows[-1]), flush=True)
            save()
        for B in (1, 8, 64, 256):
            if "decode" not in parts:
                break
            rows.append(bench_decode(name, B, with_fla))
            print(fmt(rows[-1]), flush=True)
            save()
        for B in (1, 64):
            if "decode" not in parts:
                break
            rows.append(bench_decode(name, B, False, gated=True))
            print(fmt(rows[-1]), flush=True)
        save()
    if "profile" not in parts:
        return
    meta["profile_us"] = {f"{who}-T32768": profile("gla-1.3B", [32768], who) for who in
                          (["ours", "fla"] if with_fla else ["ours"])}
    print(json.dumps(meta["profile_us"]), flush=True)
    save()

if __name__ == "__main__":
    main()
