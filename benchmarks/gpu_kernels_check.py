"""Our Triton kernels vs fla-core (chunk_gla / fused_recurrent_gla, state_v_first=True) vs the float64
spec, on the same inputs, on a CUDA GPU. Prints a table and writes JSON.

    python benchmarks/gpu_kernels_check.py --out results.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kernels import naive_recurrent_gla
from kernels.triton_chunk import chunk_gla_prefill_triton
from kernels.triton_recurrent import fused_recurrent_gla_decode_triton


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(T: int, H: int, K: int, V: int, n: float, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(T, H, K, device="cuda", generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(T, H, V, device="cuda", generator=gen).to(dtype)
    g = (F.logsigmoid(torch.randn(T, H, K, device="cuda", generator=gen)) / n).to(dtype)
    return q, k, v, g


def check_prefill(lens: list[int], H: int, K: int, V: int, n: float, dtype: torch.dtype) -> dict:
    from fla.ops.gla import chunk_gla

    T, N = sum(lens), len(lens)
    q, k, v, g = inputs(T, H, K, V, n, dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    h0 = torch.randn(N, H, V, K, device="cuda")
    pool = h0.clone()
    slots = torch.arange(N, dtype=torch.int32, device="cuda")
    o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots)
    o_fla, s_fla = chunk_gla(q[None], k[None], v[None], g[None], initial_state=h0.clone(),
                             output_final_state=True, state_v_first=True, cu_seqlens=cu.long())
    o_ref, s_ref = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        ro, rs = naive_recurrent_gla(*(x[None, a:b].double() for x in (q, k, v, g)),
                                     initial_state=h0[i:i + 1].double(), output_final_state=True)
        o_ref.append(ro[0])
        s_ref.append(rs[0])
    ref_o, ref_s = torch.cat(o_ref), torch.stack(s_ref)
    return {"kernel": "prefill", "lens": lens, "H": H, "K": K, "V": V, "gate_n": n, "dtype": str(dtype),
            "ours_vs_ref_o": rel(o, ref_o), "ours_vs_ref_state": rel(pool, ref_s),
            "fla_vs_ref_o": rel(o_fla[0], ref_o), "fla_vs_ref_state": rel(s_fla, ref_s),
            "ours_vs_fla_o": rel(o, o_fla[0]), "ours_vs_fla_state": rel(pool, s_fla)}


def check_decode(B: int, H: int, K: int, V: int, dtype: torch.dtype) -> dict:
    from fla.ops.gla import fused_recurrent_gla

    q, k, v, g = inputs(B, H, K, V, 1, dtype, seed=1)
    h0 = torch.randn(B, H, V, K, device="cuda")
    pool = h0.clone()
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    o = fused_recurrent_gla_decode_triton(q, k, v, g, pool, slots)
    o_fla, s_fla = fused_recurrent_gla(q[:, None], k[:, None], v[:, None], gk=g[:, None],
                                       initial_state=h0.clone(), output_final_state=True, state_v_first=True)
    ro, rs = naive_recurrent_gla(*(x[:, None].double() for x in (q, k, v, g)), initial_state=h0.double(),
                                 output_final_state=True)
    return {"kernel": "decode", "B": B, "H": H, "K": K, "V": V, "dtype": str(dtype),
            "ours_vs_ref_o": rel(o, ro[:, 0]), "ours_vs_ref_state": rel(pool, rs),
            "fla_vs_ref_o": rel(o_fla[:, 0], ro[:, 0]), "fla_vs_ref_state": rel(s_fla, rs),
            "ours_vs_fla_o": rel(o, o_fla[:, 0]), "ours_vs_fla_state": rel(pool, s_fla)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for (K, V) in ((256, 512), (128, 256)):
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(check_prefill([1024, 1000, 15], 4, K, V, 16, dtype))
            rows.append(check_prefill([4096], 4, K, V, 1, dtype))
            rows.append(check_decode(64, 4, K, V, dtype))
    cols = ["ours_vs_ref_o", "ours_vs_ref_state", "fla_vs_ref_o", "fla_vs_ref_state", "ours_vs_fla_o",
            "ours_vs_fla_state"]
    print("kernel  shape            dtype     n  " + "  ".join(f"{c[:18]:>18}" for c in cols))
    for r in rows:
        shape = f"K{r['K']}V{r['V']} " + (f"T{sum(r['lens'])}" if "lens" in r else f"B{r['B']}")
        print(f"{r['kernel']:7} {shape:16} {r['dtype'][6:]:9} {r.get('gate_n', '-'):>2} "
              + "  ".join(f"{r[c]:18.2e}" for c in cols))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
