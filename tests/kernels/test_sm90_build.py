"""The prefill and decode kernels built for an H100/H200 (sm_90) by the real compiler, on a CPU.

Under TRITON_INTERPRET the kernels run but are never compiled, so an edit that only the GPU compiler
rejects (a layout it cannot lower, a dtype mix in a dot) or that blows up register use would first
show on the GPU. This builds each kernel of the serving paths at the gla-1.3B and 340M shapes with
the launch configs the wrappers use, 16-byte-aligned pointers as at run time, in a process without
TRITON_INTERPRET, and reads registers and stack from the cubin.

Spills: at the 1.3B shape the output kernel holds a [64, 256] fp32 state tile in 4 warps and sits
at 255 registers (Triton 3.9 spilled 24 bytes, 144 with the split-K prep's fp32 A, and 504 with
fp32 inputs). The fp32 tiles spilled up to 13 KB per thread before this test existed
(`triton_chunk.FP32_TILES`). The bound is a guard against that class of regression, with room for
the compiler version CI happens to install, not a claim of zero spills.
"""

from __future__ import annotations

import pytest
from sm90 import GDC_MARKERS, build_for_sm90, has_gdc

from kernels import triton_chunk, triton_recurrent

MAX_STACK_BYTES = 4096

def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def prefill_cases(dt: str, K: int, V: int, split: bool = False) -> list[list]:
    """The four chunked-prefill kernels as `chunk_gla_prefill_triton` launches them."""
    torch_dt = {"bf16": "bfloat16", "fp32": "float32"}[dt]
    import torch

    cfg = triton_chunk.config(K, getattr(torch, torch_dt))
    prep = triton_chunk.prep_config(getattr(torch, torch_dt))
    P, A = "*" + dt, ("*fp32" if split or dt == "fp32" else "*" + dt)
    prec = "ieee" if dt == "fp32" else "tf32"
    prec_a = prec if dt == "fp32" else triton_chunk.A_PRECISION["half"]
    BK = max(16, _pow2(K))
    BV = min(cfg["BV"], max(16, _pow2(V)))
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    m = "kernels.triton_chunk"
    pool = {"pool": "*fp32", "slots": "*i32", "h0_mask": "*i32"}
    return [
        [m, "_prep_kernel", {"q": P, "k": P, "g": P, "A": A, "qg": P, "kd": P, "gl": "*fp32", "cu": "*i32",
                             "N": "i32", "scale": "fp32"},
         {"H": 4, "K": K, "BKC": min(prep["BKC"], BK), "BT": 64, "BC": 16, "BKD": prep["BKD"], "PREC": prec_a,
          "SPLIT": split}, {"num_warps": prep["num_warps"]}],
        [m, "_state_kernel", {"k": P, "v": P, "g": P, "kd": P, "gl": "*fp32", **pool, "W": "*fp32", "Wd": "*fp32",
                              "out": "*fp32", "pos": "*i32", "cu": "*i32", "N": "i32", "SEG": "i32"},
         {"H": 4, "K": K, "V": V, "BK": BK, "BV": BV, "BT": 64, "IS_CKPT": False, "HAS_MASK": True, "PREC": prec},
         opts],
        [m, "_scan_kernel", {**pool, "W": "*fp32", "Wd": "*fp32", "cu": "*i32", "SEG": "i32"},
         {"H": 4, "K": K, "V": V, "BLOCK": 2048, "HAS_MASK": True}, {"num_warps": 8}],
        [m, "_output_kernel", {"qg": P, "kd": P, "v": P, "gl": "*fp32", "A": A, "o": P, **pool, "W": "*fp32",
                               "cu": "*i32", "N": "i32", "SEG": "i32", "scale": "fp32"},
         {"H": 4, "K": K, "V": V, "BK": BK, "BV": BV, "BT": 64, "MULTI_SEG": True, "HAS_MASK": True, "PREC": prec},
         opts],
    ]


def decode_cases(dt: str, K: int, V: int, R: int = 16) -> list[list]:
    """The fused decode kernel with the norm x gate and the in-kernel log-gate (the model's path),
    and the token-by-token short prefill."""
    P = "*" + dt
    BK = _pow2(K)
    BV = min(_pow2(V), max(16, triton_recurrent.DECODE["TILE_ELEMS"] // BK))
    sig = {"q": P, "k": P, "v": P, "g": P, "pool": "*fp32", "slots": "*i32", "o": P, "o_raw": "*fp32", "gate": P,
           "weight": P, "counter": "*i32", "lowrank": P, "w1": P, "b1": P, "sq": "i32", "sk": "i32", "sv": "i32",
           "sz": "i32", "sl": "i32", "scale": "fp32", "eps": "fp32", "normalizer": "fp32", "clamp_min": "fp32"}
    consts = {"H": 4, "G": 1, "K": K, "V": V, "R": R, "BK": BK, "BV": BV, "NV": _pow2(-(-V // BV)), "BVF": _pow2(V),
              "BR": _pow2(R), "HAS_GATE": True, "HAS_WEIGHT": True, "PREP": True, "HAS_BIAS": False,
              "HAS_CLAMP": False, "USE_GDC": False}
    short = triton_recurrent.SHORT
    sbv = min(_pow2(V), max(1, short["TILE_ELEMS"] // BK))
    return [
        ["kernels.triton_recurrent", "_decode_kernel", sig, consts,
         {"num_warps": triton_recurrent.DECODE["num_warps"]}],
        ["kernels.triton_recurrent", "_short_prefill_kernel",
         {"q": P, "k": P, "v": P, "g": P, "pool": "*fp32", "slots": "*i32", "h0_mask": "*i32", "cu": "*i32", "o": P,
          "scale": "fp32"},
         {"H": 4, "K": K, "V": V, "BK": BK, "BV": sbv, "HAS_MASK": True}, {"num_warps": short["num_warps"]}],
    ]


SHAPES = {"gla-1.3B": (256, 512), "gla-340M": (128, 256)}
CASES = {
    **{f"prefill-{s}-bf16": prefill_cases("bf16", *kv) for s, kv in SHAPES.items()},
    "prefill-gla-1.3B-bf16-split": prefill_cases("bf16", *SHAPES["gla-1.3B"], split=True),
    "prefill-gla-1.3B-fp32": prefill_cases("fp32", *SHAPES["gla-1.3B"]),
    **{f"decode-{s}-bf16": decode_cases("bf16", *kv) for s, kv in SHAPES.items()},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_serving_kernels_build_for_sm90(case: str) -> None:
    built = build_for_sm90(CASES[case])
    print(case, [(b["kernel"], b["regs"], b["stack"]) for b in built])  # shown with -s (the GPU plan's host step)
    assert all(b["regs"] <= 255 and b["stack"] <= MAX_STACK_BYTES for b in built), built


def _fused_pdl_cases(gdc: bool) -> list[list]:
    """The decode step's small kernels as their wrappers launch them with kernels._launch.PDL on (off)."""
    dec = decode_cases("bf16", *SHAPES["gla-1.3B"])[0]
    dec = [*dec[:3], {**dec[3], "USE_GDC": gdc}, {**dec[4], "launch_pdl": gdc}]
    norm_sig = {"x": "*bf16", "r": "*bf16", "z": "*bf16", "w": "*bf16", "y": "*bf16", "s": "*bf16", "eps": "fp32"}
    norm = ["kernels.triton_fused", "_rms_norm_kernel", norm_sig,
            {"D": 2048, "BD": 2048, "HAS_RES": True, "ROUND_SUM": False, "HAS_GATE": False, "HAS_W": True,
             "USE_GDC": gdc}, {"num_warps": 8, "launch_pdl": gdc}]
    swiglu = ["kernels.triton_fused", "_swiglu_kernel", {"x": "*bf16", "y": "*bf16"},
              {"NI": 5632, "BI": 1024, "USE_GDC": gdc}, {"num_warps": 4, "launch_pdl": gdc}]
    return [dec, norm, swiglu]


@pytest.mark.slow
def test_pdl_variants_wait_for_the_previous_grid() -> None:
    """With PDL (kernels/_launch.py) each small kernel of the decode step lets the next one launch and
    waits for the previous grid; without it neither instruction is emitted (so the switch is real)."""
    on, off = build_for_sm90(_fused_pdl_cases(True)), build_for_sm90(_fused_pdl_cases(False))
    for b in on:
        assert has_gdc(b), b
        assert b["regs"] <= 255 and b["stack"] == 0, b
    for b in off:
        assert not any(b["ptx"][m] for m in GDC_MARKERS), b
