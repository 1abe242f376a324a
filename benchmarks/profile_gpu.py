"""Where the GPU time goes: per-kernel profiles of our decode step, model prefill and prefill kernel.

Reports, from torch.profiler (CUDA activity only), the kernel count and GPU microseconds per call by
kernel name for: one eager decode step of the gla-1.3B-shaped model (random bf16 weights) at B=1 and
B=64; one model prefill of 8K tokens; our chunked prefill kernel and fla-core's `chunk_gla` at T=2K
and 32K. These are the profiles the closing notes of the kernel and e2e issues cite.

    python benchmarks/profile_gpu.py --out profile.json [--no-fla]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable
from functools import partial

import torch


def kernel_profile(fn: Callable[[], object], reps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            d = by_name.setdefault(e.name[:70], [0, 0.0])
            d[0] += 1
            d[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in by_name.values()) / reps
    kernels = sum(v[0] for v in by_name.values()) / reps
    top = sorted(((k, v[0] / reps, round(v[1] / reps, 1)) for k, v in by_name.items()), key=lambda r: -r[2])
    return {"gpu_us_per_call": round(total, 1), "kernels_per_call": kernels,
            "top": [{"name": k, "count": c, "us": us} for k, c, us in top[:20]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--parts", default="kernels,model", help="comma list of kernels (prefill kernel), model")
    args = ap.parse_args()
    from benchmarks.bench_kernels import SHAPES, prefill_inputs
    from kernels.triton_chunk import chunk_gla_prefill_triton

    res: dict = {"meta": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "triton": __import__("triton").__version__,
                          "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                          "command": "python benchmarks/profile_gpu.py"}}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    for name in SHAPES if "kernels" in args.parts else ():
        H, K, V = SHAPES[name]
        for T in (2048, 32768):
            q, k, v, g, cu = prefill_inputs([T], H, K, V)
            pool = torch.randn(1, H, V, K, device="cuda") * 0.1
            slots = torch.zeros(1, dtype=torch.int32, device="cuda")
            res[f"prefill-ours-{name}-T{T}"] = kernel_profile(
                partial(chunk_gla_prefill_triton, q, k, v, g, cu, pool, slots))
            if not args.no_fla:
                from fla.ops.gla import chunk_gla

                res[f"prefill-fla-{name}-T{T}"] = kernel_profile(
                    partial(chunk_gla, q[None], k[None], v[None], g[None], initial_state=pool,
                            output_final_state=True, state_v_first=True))
            print(name, T, {kk: vv["gpu_us_per_call"] for kk, vv in res.items() if kk != "meta"}, flush=True)
            save()

    if "model" in args.parts:
        profile_model(res, save)
    report(res)


def profile_model(res: dict, save: Callable[[], None]) -> None:
    from model import GLAConfig, GLAForCausalLM

    cfg = GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GLAForCausalLM(cfg).to(torch.bfloat16).eval()
    model.fuse_for_inference()
    pool = model.new_state_pool(65)
    for B in (1, 64):
        tok = torch.randint(0, 32000, (B,), device="cuda")
        slots = torch.arange(B, dtype=torch.int32, device="cuda")
        with torch.no_grad():
            res[f"decode-step-B{B}"] = kernel_profile(partial(model.decode, tok, pool, slots))
        print("decode", B, res[f"decode-step-B{B}"]["gpu_us_per_call"], res[f"decode-step-B{B}"]["kernels_per_call"],
              flush=True)
        save()
    for T in (2048, 8192):
        x = torch.randint(0, 32000, (T,), device="cuda")
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        sl = torch.zeros(1, dtype=torch.int32, device="cuda")
        with torch.no_grad():
            res[f"model-prefill-T{T}"] = kernel_profile(partial(model.prefill, x, cu, pool, sl), reps=2)
        save()


def report(res: dict) -> None:
    for kk, vv in res.items():
        if kk != "meta":
            print(f"== {kk}: {vv['gpu_us_per_call']} us GPU, {vv['kernels_per_call']} kernels")
            for r in vv["top"][:14]:
                print(f"   {r['us']:9.1f} us  x{r['count']:<5g} {r['name']}")


if __name__ == "__main__":
    main()
