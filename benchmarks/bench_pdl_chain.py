"""A batch-1 decode step's GEMV chain in one CUDA graph: cuBLAS, our Triton GEMV, and our GEMV with
programmatic dependent launch (PDL), on a CUDA GPU of compute capability 9.0 or newer.

Why: at batch 1 the 1.3B decode step takes ~2.1x its weight-streaming floor. The four projections
per layer alone read their 2.5 GB at 50-78% of copy bandwidth under cuBLAS (o_proj at ~32%), and
each kernel boundary inside the graph leaves the GPU partly idle (docs/benchmarks.md). With PDL a
GEMV loads its first weight tile and lets the next kernel launch before it waits for the previous
grid, so weight streaming overlaps the tail and the launch gap (`triton_gemv.GEMV["PDL"]`). This
measures that on the projections alone, without the rest of the step:

  per layer: x [1, 2048] -> in_proj [6160, 2048] -> its first 2048 columns -> o_proj [2048, 2048]
             -> gate|up [11264, 2048] -> SwiGLU + down_proj [2048, 5632] -> next layer's x

24 layers with their own weights (2.5 GB, bf16), so L2 holds none of them. Each variant is
captured once, then the variants are timed round-robin (the GPU clock drifts within a run).
Reported: graph replay us per step, weight GB/s, and the ratio to the copy bandwidth measured in
the same run. The outputs of the three variants are compared (rel-RMS after 24 layers).

    python benchmarks/bench_pdl_chain.py --out benchmarks/results/pdl-chain-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemv import capture_graph, copy_gbps  # noqa: E402

import kernels  # noqa: E402
from kernels import triton_gemv  # noqa: E402
from kernels.triton_gemv import gemv_triton, swiglu_gemv_triton  # noqa: E402

HIDDEN, IN_PROJ, INTER, LAYERS = 2048, 6160, 5632, 24
DTYPE = torch.bfloat16


class Chain:
    """The 24 layers' projection weights and one step through them, with a choice of GEMV."""

    def __init__(self) -> None:
        gen = torch.Generator(device="cuda").manual_seed(0)

        def w(n: int, k: int) -> torch.Tensor:
            return torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) * k**-0.5

        self.layers = [(w(IN_PROJ, HIDDEN), w(HIDDEN, HIDDEN), w(2 * INTER, HIDDEN), w(HIDDEN, INTER))
                       for _ in range(LAYERS)]
        self.weight_bytes = sum(t.numel() * t.element_size() for layer in self.layers for t in layer)
        self.x = torch.randn(1, HIDDEN, device="cuda", dtype=DTYPE, generator=gen)

    def step(self, ours: bool) -> torch.Tensor:
        """The first layer's output: compared across variants (random SwiGLU layers shrink x to exact
        zeros within ~6 layers, so the last layer's output would compare 0 with 0)."""
        x = self.x
        first: torch.Tensor | None = None
        for w_in, w_o, w_gu, w_down in self.layers:
            if ours:
                h = gemv_triton(x, w_in)[:, :HIDDEN]
                h = gemv_triton(h, w_o)
                h = gemv_triton(h, w_gu)
                x = swiglu_gemv_triton(h, w_down)
            else:
                h = F.linear(x, w_in)[:, :HIDDEN]
                h = F.linear(h, w_o)
                h = F.linear(h, w_gu)
                x = F.linear(kernels.swiglu(h), w_down)
            first = x if first is None else first
        assert first is not None
        return first


def replay_us(g: torch.cuda.CUDAGraph, n: int = 20) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("PDL needs compute capability 9.0 or newer")
    copy = copy_gbps()
    chain = Chain()
    variants: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
    variants["cublas"] = capture_graph(lambda: chain.step(False))
    saved = triton_gemv.GEMV["PDL"]
    try:
        triton_gemv.GEMV["PDL"] = 0
        variants["triton"] = capture_graph(lambda: chain.step(True))
        triton_gemv.GEMV["PDL"] = 1
        variants["triton_pdl"] = capture_graph(lambda: chain.step(True))
    finally:
        triton_gemv.GEMV["PDL"] = saved
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (g, _) in variants.items():
            times[name].append(replay_us(g))
    ref = variants["cublas"][1].double()
    floor_us = chain.weight_bytes / copy / 1e3
    rows = []
    for name, (_, out) in variants.items():
        us = statistics.median(times[name])
        err = float((out.double() - ref).norm() / ref.norm())
        rows.append({"variant": name, "us_per_step": us, "weight_gbps": chain.weight_bytes / us / 1e3,
                     "of_copy": chain.weight_bytes / us / 1e3 / copy, "per_round_us": times[name],
                     "rel_rms_vs_cublas": err})
        print(f"{name:11s} {us:8.1f} us/step  {chain.weight_bytes / us / 1e3:7.0f} GB/s  "
              f"{chain.weight_bytes / us / 1e3 / copy:5.1%} of copy  x{us / floor_us:.2f} floor  "
              f"rel-RMS vs cuBLAS {err:.1e}", flush=True)
    meta = {"benchmark": "bench_pdl_chain", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "copy_gbps": copy, "weight_bytes": chain.weight_bytes, "floor_us": floor_us, "layers": LAYERS,
            "gemv_config": dict(triton_gemv.GEMV), "command": " ".join(sys.argv)}
    print(json.dumps({k: v for k, v in meta.items() if k != "gemv_config"}))
    if args.out:
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
