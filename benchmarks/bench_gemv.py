"""Triton GEMV (kernels/triton_gemv.py) vs cuBLAS at the gla-1.3B decode shapes, on a CUDA GPU.

    python benchmarks/bench_gemv.py --out benchmarks/results/gemv-h200.json [--no-sweep] [--no-model]

Per projection (the fused q|k|v|g|gk_proj.0 [6160, 2048], o_proj [2048, 2048], gate|up [11264, 2048],
down_proj [2048, 5632] with its SwiGLU) and M in {1, 4, 16} tokens, bf16:
  - torch: `F.linear` (cuBLAS); for down_proj, the separate Triton SwiGLU kernel + `F.linear`, which
    is what the model runs now;
  - ours: `gemv_triton` / `swiglu_gemv_triton` with the committed config, then (unless --no-sweep) a
    small sweep of tile / warp / split-K settings; the best is reported per case, and the best single
    setting per path (geometric mean over the cases that use it) as a suggested `GEMV` config.
Time is the median over reps of CUDA events around a back-to-back loop over enough distinct weight
copies that L2 holds none of them (as in a decode step, where every layer reads new weights),
divided by the loop length. `graph` runs that loop from a CUDA graph (GPU time, no launch gaps);
`eager` launches it from Python (at M=1 mostly host time). GB/s counts weight bytes only.
The same run measures the HBM copy bandwidth (read + write of 1 GiB) as the ceiling.
Unless --no-model, it also times a whole CUDA-graph decode step of the 24-layer 1.3B-shaped model
(random bf16 weights, vocab 32000) with `kernels.GEMV_ROUTE` off and on.
Sized for about 2-3 min on an H200 (not yet run there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton

import kernels
from kernels import triton_gemv
from kernels.triton_gemv import gemv_triton, swiglu_gemv_triton

SHAPES: dict[str, tuple[int, int, bool]] = {  # name: (N, K, swiglu prologue)
    "in_proj": (6160, 2048, False),
    "o_proj": (2048, 2048, False),
    "gate_up": (11264, 2048, False),
    "down_swiglu": (2048, 5632, True),
}
DTYPE = torch.bfloat16

# Sweep candidates: overrides of triton_gemv.GEMV. "fma" settings apply at M = 1 (and at M > 1 with
# DOT_MIN_M = 17), "dot" settings at M >= DOT_MIN_M. Candidates whose launch plan equals one already
# timed for a case are not compiled or timed again.
FMA = {f"fma-n{bn}-k{bk}-w{w}": {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w}
       for bn, bk, w in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (32, 512, 8),
                         (64, 256, 8))}
DOT = {f"dot-n{bn}-k{bk}-w{w}-s{s}": {"DOT_BLOCK_N": bn, "DOT_BLOCK_K": bk, "DOT_num_warps": w, "DOT_num_stages": s}
       for bn, bk, w, s in ((16, 256, 4, 3), (32, 256, 4, 3), (32, 512, 4, 2), (64, 256, 8, 3), (16, 512, 4, 2),
                            (32, 128, 4, 4))}
SPLIT = {"split-off": {"SPLIT_K": 1}, "split-132": {"TARGET_PROGRAMS": 132}, "split-528": {"TARGET_PROGRAMS": 528}}


def copy_gbps() -> float:
    x = torch.empty(2**29, dtype=torch.float16, device="cuda").normal_()  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * x.element_size() / ms / 1e6


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """fn captured in a CUDA graph after two warm-up runs on a side stream (compiles happen outside
    the capture); returns the graph and what the captured call returned."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def timed(step: Callable[[int], object], n: int, graph: bool, reps: int) -> float:
    """Median µs per call of step(0), ..., step(n - 1) run back to back."""
    def loop() -> None:
        for i in range(n):
            step(i)

    run: Callable[[], object] = loop
    if graph:
        run = capture_graph(loop)[0].replay
    else:
        loop()
    torch.cuda.synchronize()
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(times)


class Case:
    """One projection at one M: inputs, enough weight copies to defeat L2, and the two callables."""

    def __init__(self, name: str, M: int, l2_bytes: int) -> None:
        self.name, self.M = name, M
        self.N, self.K, self.swiglu = SHAPES[name]
        self.weight_bytes = self.N * self.K * DTYPE.itemsize
        copies = min(64, max(4, math.ceil(4 * l2_bytes / self.weight_bytes)))
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.ws = [torch.randn(self.N, self.K, device="cuda", dtype=DTYPE, generator=gen) * 0.02
                   for _ in range(copies)]
        self.x = torch.randn(M, 2 * self.K if self.swiglu else self.K, device="cuda", dtype=DTYPE, generator=gen)

    def torch_step(self, i: int) -> torch.Tensor:
        if self.swiglu:
            return F.linear(kernels.swiglu(self.x), self.ws[i])
        return F.linear(self.x, self.ws[i])

    def ours_step(self, i: int) -> torch.Tensor:
        return swiglu_gemv_triton(self.x, self.ws[i]) if self.swiglu else gemv_triton(self.x, self.ws[i])

    def time(self, step: Callable[[int], object], graph: bool = True, reps: int = 30) -> float:
        return timed(step, len(self.ws), graph, reps)

    def gbps(self, us: float) -> float:
        return self.weight_bytes / us / 1e3

    def error(self) -> float:
        """rel-RMS of ours vs torch (both bf16 out; each is one rounding from the fp32 sum)."""
        a, b = self.ours_step(0).double(), self.torch_step(0).double()
        return float((a - b).norm() / b.norm())


def with_config(overrides: dict[str, int], fn: Callable[[], Any]) -> Any:
    saved = dict(triton_gemv.GEMV)
    triton_gemv.GEMV.update(overrides)
    try:
        return fn()
    finally:
        triton_gemv.GEMV.clear()
        triton_gemv.GEMV.update(saved)


def candidates(M: int) -> dict[str, dict[str, int]]:
    """The sweep for one M: its own path's tiles, the other path once, and the split-K targets."""
    if M == 1:
        own = dict(FMA)
        other = {"dot-at-M1": {"DOT_MIN_M": 1}}
    else:
        own = dict(DOT)
        other = {"fma-at-M>1": {"DOT_MIN_M": triton_gemv.MAX_ROWS + 1}} if M <= 4 else {}
    return {**own, **other, **SPLIT}


def sweep_case(case: Case, budget_end: float) -> dict[str, float]:
    """µs per candidate (graph), sharing timings between candidates with the same launch plan."""
    by_plan: dict[str, float] = {}
    out: dict[str, float] = {}
    for name, cfg in candidates(case.M).items():
        if time.monotonic() > budget_end:
            break
        plan = json.dumps(with_config(cfg, lambda: triton_gemv.plan(case.M, case.N, case.K)), sort_keys=True)
        if plan not in by_plan:
            try:
                by_plan[plan] = with_config(cfg, lambda: case.time(case.ours_step, reps=20))
                err = with_config(cfg, case.error)
                if not err < 2e-2:
                    print(f"  {name}: wrong result (rel {err:.2e}); ignored", flush=True)
                    by_plan[plan] = math.inf
            except Exception as exc:  # a setting that does not compile (shared memory, registers)
                print(f"  {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                by_plan[plan] = math.inf
        out[name] = by_plan[plan]
    return out


def suggest(sweeps: dict[str, dict[str, float]], rows: list[dict]) -> dict[str, Any]:
    """Per family, the candidate with the best geometric mean over the cases that timed it."""
    result: dict[str, Any] = {}
    for family, names, ms in (("fma", FMA, (1,)), ("dot", DOT, (4, 16)), ("split", SPLIT, (1, 4, 16))):
        scores = {}
        for name in names:
            ts = [sweeps[r["case"]][name] / r["ours_us"] for r in rows if r["M"] in ms and name in sweeps[r["case"]]]
            if ts and all(math.isfinite(t) for t in ts):
                scores[name] = math.exp(sum(math.log(t) for t in ts) / len(ts))
        if scores:
            best = min(scores, key=scores.__getitem__)
            result[family] = {"name": best, "config": names[best], "geomean_vs_default": round(scores[best], 3)}
    return result


def model_step(cfg_overrides: dict[str, int] | None) -> dict[str, Any]:
    """CUDA-graph decode step of the 24-layer 1.3B-shaped model: route off, on, on with the suggestion."""
    from model import GLAConfig, GLAForCausalLM
    from model.cuda_graph import GraphedDecoder

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GLAForCausalLM(GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24, vocab_size=32000))
    model = model.to(DTYPE).eval().fuse_for_inference()
    buckets = [1, 4, 16]
    variants: list[tuple[str, bool, dict[str, int]]] = [("cublas", False, {}), ("gemv-default", True, {})]
    if cfg_overrides:
        variants.append(("gemv-suggested", True, cfg_overrides))
    res: dict[str, Any] = {}
    logits: dict[str, torch.Tensor] = {}
    for name, on, overrides in variants:
        pool = model.new_state_pool(17)
        saved = dict(triton_gemv.GEMV)
        kernels.GEMV_ROUTE["enabled"] = on
        triton_gemv.GEMV.update(overrides)
        try:
            dec = GraphedDecoder(model, pool, scratch_slot=16, max_batch=16, buckets=buckets)
            ids = torch.arange(16, device="cuda") + 5
            slots = torch.arange(16, dtype=torch.int32, device="cuda")
            logits[name] = dec(ids[:1], slots[:1]).clone()
            res[name] = {f"B{b}_us": round(timed(lambda _i, g=dec.graphs[b]: g.replay(), 10, False, 15), 1)
                         for b in buckets}
        finally:
            kernels.GEMV_ROUTE["enabled"] = False
            triton_gemv.GEMV.clear()
            triton_gemv.GEMV.update(saved)
        del dec, pool
        torch.cuda.empty_cache()
        if name != "cublas":  # a Triton failure would silently fall back to PyTorch: say so
            g = kernels._TRITON_GEMV or {}
            res[name]["triton_used"] = all(fn is op.fast for op in g.values() for fn in op.chosen.values())
            a, b = logits[name].double(), logits["cublas"].double()
            res[name]["logits_rel_vs_cublas"] = float((a - b).norm() / b.norm())
        print(f"model decode step {name}: {res[name]}", flush=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    res["weight_bytes"] = weights
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--ms", default="1,4,16", help="token counts M")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true", help="time the committed config only")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model decode step")
    ap.add_argument("--sweep-budget-s", type=float, default=110.0, help="stop sweeping after this long")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemv.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    meta: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "dtype": str(DTYPE), "l2_bytes": l2, "sms": props.multi_processor_count,
        "default_config": dict(triton_gemv.GEMV), "copy_gbps": round(copy_gbps(), 1)}
    print(json.dumps(meta), flush=True)
    rows: list[dict] = []
    sweeps: dict[str, dict[str, float]] = {}
    out: dict[str, Any] = {"meta": meta, "rows": rows, "sweep_us": sweeps}

    def save() -> None:  # after every row: a run cut off by its time limit still leaves its numbers
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)

    budget_end = time.monotonic() + args.sweep_budget_s
    hdr = (f"{'case':<18}{'torch µs':>9}{'ours µs':>9}{'torch GB/s':>11}{'ours GB/s':>10}{'% copy':>7}{'speedup':>8}"
           f"{'eager t/o µs':>14}{'best µs':>9}  best setting")
    print(hdr, flush=True)
    for name in args.shapes.split(","):
        for M in (int(m) for m in args.ms.split(",")):
            case = Case(name, M, l2)
            key = f"{name}-M{M}"
            t_us, o_us = case.time(case.torch_step), case.time(case.ours_step)
            te_us, oe_us = case.time(case.torch_step, graph=False), case.time(case.ours_step, graph=False)
            row = {"case": key, "shape": name, "M": M, "N": case.N, "K": case.K, "weight_copies": len(case.ws),
                   "plan": triton_gemv.plan(M, case.N, case.K), "torch_us": round(t_us, 2), "ours_us": round(o_us, 2),
                   "torch_gbps": round(case.gbps(t_us), 1), "ours_gbps": round(case.gbps(o_us), 1),
                   "ours_pct_copy": round(100 * case.gbps(o_us) / meta["copy_gbps"], 1),
                   "speedup": round(t_us / o_us, 3), "torch_eager_us": round(te_us, 2),
                   "ours_eager_us": round(oe_us, 2), "rel_err_vs_torch": case.error()}
            if not args.no_sweep:
                sweeps[key] = sweep_case(case, budget_end)
                if sweeps[key]:
                    best = min(sweeps[key], key=sweeps[key].__getitem__)
                    row["best"] = {"name": best, "us": round(sweeps[key][best], 2),
                                   "gbps": round(case.gbps(sweeps[key][best]), 1)}
            rows.append(row)
            b = row.get("best", {"us": float("nan"), "name": "-"})
            print(f"{key:<18}{t_us:>9.2f}{o_us:>9.2f}{row['torch_gbps']:>11.0f}{row['ours_gbps']:>10.0f}"
                  f"{row['ours_pct_copy']:>7.1f}{row['speedup']:>7.2f}x{te_us:>7.1f}/{oe_us:<6.1f}{b['us']:>9.2f}  "
                  f"{b['name']}", flush=True)
            del case
            save()
    suggested: dict[str, int] = {}
    if sweeps:
        out["suggested"] = suggest(sweeps, rows)
        for fam in out["suggested"].values():
            if fam["geomean_vs_default"] < 0.98:  # only settings that beat the committed ones
                suggested.update(fam["config"])
        out["suggested_overrides"] = suggested
        print("suggested GEMV overrides:", json.dumps(out["suggested"]), flush=True)
        save()
    if not args.no_model:
        try:
            out["model_step"] = model_step(suggested or None)
        except Exception as exc:  # keep the kernel table even if the model step fails
            out["model_step"] = {"error": f"{type(exc).__name__}: {exc}"}
            print("model decode step failed:", out["model_step"]["error"], flush=True)
        save()
    print(f"copy bandwidth {meta['copy_gbps']:.0f} GB/s; results in {args.out or '(no --out)'}", flush=True)


if __name__ == "__main__":
    main()
