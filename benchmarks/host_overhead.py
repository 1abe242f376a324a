"""Host time per eager call of our kernels, split into its parts (CUDA GPU needed).

The kernel issue bounds host overhead per call (prefill <= 50 us, decode <= 30 us) because the engine
calls each kernel once per layer per step outside CUDA graphs. This times, with the GPU kept busy
so launches never wait: the whole call; the launch alone (`Launcher` with prebuilt arguments); a
bare `torch.empty`; and the stream lookup, so a closing note can say where the time goes.

    python benchmarks/host_overhead.py --out host.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F


def per_call_us(fn: Callable[[], object], n: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


def prefill_parts(fn: partial) -> dict[str, float]:
    """The parts of one prefill call: its Python and allocations with the four launches stubbed out,
    then each launch replayed alone with the arguments the wrapper built (through `Launcher`'s
    cached direct path)."""
    from kernels import triton_chunk

    res: dict[str, float] = {}
    names = ("_prep", "_state", "_scan", "_output")
    seen: dict[str, tuple] = {}
    real = {n: getattr(triton_chunk, n) for n in names}

    def record(name: str, grid: tuple, key: tuple | None, kargs: tuple, **o: int) -> None:
        seen.setdefault(name, (grid, key, kargs, o))

    for n in names:
        setattr(triton_chunk, n, partial(record, n))
    try:
        res["python_alloc_us"] = per_call_us(fn, n=50)
    finally:
        for n in names:
            setattr(triton_chunk, n, real[n])
    for n, (grid, key, kargs, o) in seen.items():
        res[f"launch{n}_us"] = per_call_us(partial(real[n], grid, key, kargs, **o), n=50)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="host.json")
    args = ap.parse_args()
    from kernels import _launch, triton_recurrent
    from kernels.triton_chunk import chunk_gla_prefill_triton
    from kernels.triton_recurrent import fused_recurrent_gla_decode_triton

    H, K, V = 4, 256, 512
    res: dict[str, float] = {}
    B = 8
    q, k = (torch.randn(B, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, H, V, device="cuda", dtype=torch.bfloat16)
    g = (F.logsigmoid(torch.randn(B, H, K, device="cuda")) / 16).to(torch.bfloat16)
    pool = torch.randn(2 * B, H, V, K, device="cuda")
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    res["decode_call_us"] = per_call_us(lambda: fused_recurrent_gla_decode_triton(q, k, v, g, pool, slots))
    # the launch alone, with the arguments the wrapper built on its last call (recorded, then replayed)
    seen: list[tuple] = []
    real = triton_recurrent._decode
    triton_recurrent._decode = lambda grid, key, kargs, **opts: seen.append((grid, key, kargs, opts)) or real(
        grid, key, kargs, **opts)
    fused_recurrent_gla_decode_triton(q, k, v, g, pool, slots)
    triton_recurrent._decode = real
    grid, key, kargs, opts = seen[-1]
    res["decode_launch_only_us"] = per_call_us(lambda: real(grid, key, kargs, **opts))
    res["torch_empty_us"] = per_call_us(lambda: torch.empty(B, H, V, dtype=torch.bfloat16, device="cuda"))
    res["raw_stream_us"] = per_call_us(lambda: _launch._current_stream(0))
    res["stream_object_us"] = per_call_us(lambda: torch.cuda.current_stream().cuda_stream)
    res["fast_launch_ok"] = float(_launch.Launcher.fast_ok)
    prefills: dict[int, partial] = {}
    for T in (512, 2048, 32768):
        qq, kk = (torch.randn(T, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        vv = torch.randn(T, H, V, device="cuda", dtype=torch.bfloat16)
        gg = (F.logsigmoid(torch.randn(T, H, K, device="cuda")) / 16).to(torch.bfloat16)
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        pp = torch.randn(1, H, V, K, device="cuda")
        sl = torch.zeros(1, dtype=torch.int32, device="cuda")
        prefills[T] = partial(chunk_gla_prefill_triton, qq, kk, vv, gg, cu, pp, sl)
        res[f"prefill_T{T}_call_us"] = per_call_us(prefills[T], n=50)
    # a second round: the numbers drift with the host's load
    for T, fn in prefills.items():
        res[f"prefill_T{T}_call_us_rep1"] = per_call_us(fn, n=50)
    for T, fn in prefills.items():
        res.update({f"prefill_T{T}_{part}": us for part, us in prefill_parts(fn).items()})
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
