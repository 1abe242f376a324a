"""The small-batch GEMVs (kernels/triton_gemv.py) against a float64 reference.

Small odd shapes (N, K not multiples of the tiles) run under TRITON_INTERPRET=1 on the CPU, on both
inner paths (FMA, dot) with and without split-K; the gpu-marked cases use the gla-1.3B decode shapes.
The reference is float64 math on the same (rounded) inputs, rounding the SwiGLU product to the input
dtype where the kernel and the unfused model round it. Bounds (rel-RMS, and max|d|/max|ref| <= 2x):
fp32 1e-5; bf16 5e-3 (one rounding of the output; the interpreter rounds bf16 toward zero, about 2x
the error of the GPU's round-to-nearest). Outputs and split-K partials are allocated NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gla_testutils import assert_close
from sm90 import build_for_sm90, has_gdc

import kernels
from kernels.fused_torch import gemv_torch, swiglu_gemv_torch

triton = pytest.importorskip("triton")
from kernels import triton_gemv  # noqa: E402
from kernels.triton_gemv import gemv_triton, swiglu_gemv_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
BOUND = {"f32": 1e-5, "bf16": 5e-3}

# Paths, as config overrides. Small K tiles on the CPU so every case loops over K and masks a tail.
SMALL_TILES = {"BLOCK_N": 16, "BLOCK_K": 64, "DOT_BLOCK_N": 16, "DOT_BLOCK_K": 64}
PATHS = {
    "fma": {"DOT_MIN_M": triton_gemv.MAX_ROWS + 1},  # FMA for every M
    "dot": {"DOT_MIN_M": 1},  # tl.dot for every M, M = 1 included
}
SPLITS = {"nosplit": {"SPLIT_K": 1}, "split3": {"SPLIT_K": 3}}

# (M, N, K): M in {1, 3, 16}, N in {1, 37, 300}, K in {60, 257, 1000}; every value at least twice.
SHAPES = [(1, 1, 60), (1, 37, 257), (1, 300, 1000), (3, 37, 1000), (3, 300, 60), (16, 1, 257), (16, 300, 257)]
SWIGLU_SHAPES = [(1, 37, 257), (3, 300, 60), (16, 1, 1000)]
GPU_SHAPES = {  # gla-1.3B: fused q|k|v|g|gk_proj.0, o_proj, gate|up; down_proj (swiglu) separately
    "in_proj": (6160, 2048), "o_proj": (2048, 2048), "gate_up": (11264, 2048)}


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=DEV)


def round_as_kernel(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to dtype where the kernel rounds: to nearest on a GPU, but the Triton interpreter's
    fp32 -> bf16 conversion truncates (rounds toward zero), so mirror that on the CPU."""
    if dtype == torch.bfloat16 and not ON_GPU:
        return (t.float().view(torch.int32) & -65536).view(torch.float32).double()
    return t.to(dtype).double()


def swiglu_ref(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """float64 of swiglu rounded to h.dtype (as the kernel and the unfused MLP round it), then the GEMM."""
    gate, up = h.double().chunk(2, dim=-1)
    return round_as_kernel(F.silu(gate) * up, h.dtype) @ weight.double().T


def _ids(case: tuple) -> str:  # type: ignore[type-arg]
    return "M{}-N{}-K{}".format(*case)


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Apply GEMV config overrides for one test (restored afterwards)."""
    def apply(*overrides: dict[str, int]) -> None:
        for o in overrides:
            for k, v in o.items():
                monkeypatch.setitem(triton_gemv.GEMV, k, v)
    return apply


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[_ids(c) for c in SHAPES])
def test_gemv(M: int, N: int, K: int, dt: str, path: str, split: str, config, nan_poison: None) -> None:  # type: ignore[no-untyped-def]
    config(SMALL_TILES, PATHS[path], SPLITS[split])
    dtype = DTYPES[dt]
    x, w = randn(M, K, dtype=dtype, seed=M * 7 + K), randn(N, K, dtype=dtype, seed=N, scale=0.05)
    y = gemv_triton(x, w)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, x.double() @ w.double().T, BOUND[dt], "y")


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("M,N,K", SWIGLU_SHAPES, ids=[_ids(c) for c in SWIGLU_SHAPES])
def test_swiglu_gemv(M: int, N: int, K: int, dt: str, path: str, split: str, config,  # type: ignore[no-untyped-def]
                     nan_poison: None) -> None:
    config(SMALL_TILES, PATHS[path], SPLITS[split])
    dtype = DTYPES[dt]
    h, w = randn(M, 2 * K, dtype=dtype, seed=K, scale=2.0), randn(N, K, dtype=dtype, seed=N + 1, scale=0.05)
    y = swiglu_gemv_triton(h, w)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, swiglu_ref(h, w), BOUND[dt], "y")


def test_split_plan_fills_the_gpu_only_when_n_is_small() -> None:
    """The default config splits K for N = 2048 (o_proj, down_proj) and not for the wide projections."""
    assert triton_gemv.plan(1, 2048, 2048)["SPLIT"] > 1
    assert triton_gemv.plan(1, 2048, 5632)["SPLIT"] > 1
    assert triton_gemv.plan(1, 11264, 2048)["SPLIT"] == 1
    for M, N, K in [(1, 2048, 5632), (16, 6160, 2048), (3, 37, 257), (1, 1, 60)]:
        p = triton_gemv.plan(M, N, K)
        assert (p["SPLIT"] - 1) * p["KS"] < K <= p["SPLIT"] * p["KS"] and p["KS"] % p["BK"] == 0  # no empty range


def test_leading_dims_strided_rows_and_too_many_rows(config, nan_poison: None) -> None:  # type: ignore[no-untyped-def]
    config(SMALL_TILES)
    wide = randn(2, 3, 150, dtype=torch.float32, seed=3)
    x = wide[..., 10:110]  # rows strided by 150, like a column slice of a wider GEMM output
    w = randn(37, 100, dtype=torch.float32, seed=4)
    y = gemv_triton(x, w)
    assert y.shape == (2, 3, 37)
    assert_close(y, x.double() @ w.double().T, 1e-5, "y")
    with pytest.raises(ValueError, match="at most 16"):
        gemv_triton(randn(17, 100, dtype=torch.float32, seed=5), w)
    with pytest.raises(ValueError, match="does not match"):
        swiglu_gemv_triton(x, w)


def test_public_ops_on_the_cpu_are_the_pytorch_forms() -> None:
    x, w = randn(3, 40, dtype=torch.float32, seed=6).cpu(), randn(5, 20, dtype=torch.float32, seed=7).cpu()
    assert torch.equal(kernels.swiglu_gemv(x, w), swiglu_gemv_torch(x, w))
    assert torch.equal(kernels.gemv(x[:, :20], w), gemv_torch(x[:, :20], w))
    assert torch.equal(kernels.swiglu_gemv(x, w), F.linear(kernels.swiglu(x), w))


# ---- gla-1.3B decode shapes on a GPU -----------------------------------------------------------
GPU_CASES = [pytest.param(name, M, dt, pdl, id=f"{name}-M{M}-{dt}{'-pdl' if pdl else ''}", marks=pytest.mark.gpu)
             for name in (*GPU_SHAPES, "down_swiglu") for M in (1, 4, 16) for dt in DTYPES for pdl in (0, 1)]


@pytest.mark.parametrize("name,M,dt,pdl", GPU_CASES)
def test_gemv_at_gla13b_sizes(name: str, M: int, dt: str, pdl: int, config, nan_poison: None) -> None:  # type: ignore[no-untyped-def]
    """pdl: launched with programmatic dependent launch (GEMV["PDL"]; the first weight tile is
    loaded before the wait for the previous grid), on GPUs that have it."""
    if not ON_GPU:
        pytest.skip("needs CUDA")
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    config({"PDL": pdl})
    dtype = DTYPES[dt]
    if name == "down_swiglu":
        h, w = randn(M, 2 * 5632, dtype=dtype, seed=1, scale=2.0), randn(2048, 5632, dtype=dtype, seed=2, scale=0.02)
        y, ref, torch_y = swiglu_gemv_triton(h, w), swiglu_ref(h, w), swiglu_gemv_torch(h, w)
        assert torch.equal(kernels.swiglu_gemv(h, w), y)  # the public op dispatches to the kernel
    else:
        N, K = GPU_SHAPES[name]
        x, w = randn(M, K, dtype=dtype, seed=3), randn(N, K, dtype=dtype, seed=4, scale=0.02)
        y, ref, torch_y = gemv_triton(x, w), x.double() @ w.double().T, gemv_torch(x, w)
        assert torch.equal(kernels.gemv(x, w), y)
    assert y.dtype == dtype
    assert_close(y, ref, BOUND[dt], "ours")
    if dtype == torch.bfloat16:  # cuBLAS rounds the same way: both one bf16 rounding from the truth
        assert_close(torch_y, ref, BOUND[dt], "torch")



# ---- compile for an H100/H200 without one: the interpreter never builds the kernel -------------
def _gemv_case(M: int, N: int, K: int, swiglu: bool, dt: str, gdc: bool, norm: int = 0) -> list:
    p = triton_gemv.plan(M, N, K)
    consts = {"SX": 2 * K if swiglu else K, "N": N, "K": K, "KS": p["KS"], "BM": p["BM"], "BN": p["BN"],
              "BK": p["BK"], "SPLIT": p["SPLIT"], "SWIGLU": swiglu, "DOT": bool(p["dot"]), "IEEE": dt == "fp32",
              "EVEN_N": N % p["BN"] == 0, "EVEN_K": p["KS"] * p["SPLIT"] == K, "USE_GDC": gdc, "NORM": norm,
              "HAS_NW": norm > 0}
    sig = {"x": "*" + dt, "w": "*" + dt, "y": "*" + dt, "part": "*fp32", "r": "*" + dt, "nw": "*" + dt,
           "s": "*" + dt, "M": "i32", "eps": "fp32"}
    return ["kernels.triton_gemv", "_gemv_kernel", sig, consts,
            {"num_warps": p["num_warps"], "num_stages": p["num_stages"], "launch_pdl": gdc}]


def test_compiles_for_sm90_without_spills() -> None:
    """The real compiler (ptxas, sm_90) at the 1.3B shapes with the default config, with and without
    programmatic dependent launch: the interpreter runs the kernels but never builds them."""
    cases = [(1, 6160, 2048, False, "bf16", False), (16, 2048, 2048, False, "bf16", False),
             (1, 2048, 5632, True, "bf16", False), (4, 2048, 5632, True, "fp32", False),
             (3, 11264, 2048, False, "bf16", False),
             # programmatic dependent launch (GEMV["PDL"]): the M = 1 path with its prefetched tile
             (1, 6160, 2048, False, "bf16", True), (1, 2048, 5632, True, "bf16", True),
             (16, 2048, 2048, False, "bf16", True),
             # the norm prologue (norm_gemv): in_proj after the round_sum add, gate|up after mlp_norm
             (1, 6160, 2048, False, "bf16", True, 3), (1, 11264, 2048, False, "bf16", True, 2),
             (1, 6160, 2048, False, "bf16", False, 1), (4, 11264, 2048, False, "bf16", False, 2)]
    results = build_for_sm90([_gemv_case(*c) for c in cases])
    for c, r in zip(cases, results, strict=True):
        if c[5]:  # the PDL variant really waits for the previous grid (and lets the next one launch)
            assert has_gdc(r), (c, r)
    assert all(c["stack"] == 0 and c["regs"] <= 255 for c in results), results  # no spills


# ---- the RMSNorm prologue (norm_gemv): the pre-norm of a decode step's in_proj and gate|up ----------
NORM_MODES = {"rms": (False, False), "add": (True, False), "add-round": (True, True)}
NORM_SHAPES = [(1, 37, 257), (3, 300, 60), (16, 1, 1000)]


def norm_ref(x: torch.Tensor, r: torch.Tensor | None, nw: torch.Tensor | None, eps: float, round_sum: bool,
             w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float64 norm of the (fp32, or rounded with round_sum) sum, rounded to x's dtype where the kernel
    rounds it, then the GEMM; and the sum rounded to the residual's dtype."""
    s = x.double() if r is None else x.double() + r.double()
    if r is not None:
        s32 = x.float() + r.float()  # the kernel's fp32 sum (exact for these dtypes)
        s = round_as_kernel(s32, r.dtype) if round_sum else s32.double()
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if nw is not None:
        y = y * nw.double()
    return round_as_kernel(y, x.dtype) @ w.double().T, (None if r is None else round_as_kernel(s32, r.dtype))


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("mode", list(NORM_MODES))
@pytest.mark.parametrize("M,N,K", NORM_SHAPES, ids=[_ids(c) for c in NORM_SHAPES])
def test_norm_gemv(M: int, N: int, K: int, mode: str, dt: str, path: str, split: str, config,  # type: ignore[no-untyped-def]
                   nan_poison: None) -> None:
    """Against the norm then the GEMM in float64; the sum (the next residual) exactly as the norm
    kernel stores it. Every program recomputes the whole rows' RMS, whatever its K range (split)."""
    config(SMALL_TILES, PATHS[path], SPLITS[split])
    dtype = DTYPES[dt]
    has_res, round_sum = NORM_MODES[mode]
    x = randn(M, K, dtype=dtype, seed=K + M, scale=3.0)
    r = randn(M, K, dtype=dtype, seed=K + 1) if has_res else None
    nw = randn(K, dtype=dtype, seed=2, scale=0.5) + 1 if M != 3 else None  # M = 3: no norm weight
    w = randn(N, K, dtype=dtype, seed=N, scale=0.05)
    y, s = triton_gemv.norm_gemv_triton(x, r, nw, 1e-6, round_sum, w)
    ref_y, ref_s = norm_ref(x, r, nw, 1e-6, round_sum, w)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, ref_y, BOUND[dt], "y")
    if has_res:
        assert s is not None and s.dtype == dtype and torch.equal(s.double(), ref_s)
    else:
        assert s is None


def test_norm_gemv_public_op_on_the_cpu_is_norm_then_linear() -> None:
    x, r = randn(2, 3, 40, dtype=torch.float32, seed=8).cpu(), randn(2, 3, 40, dtype=torch.float32, seed=9).cpu()
    nw, w = randn(40, dtype=torch.float32, seed=10).cpu(), randn(7, 40, dtype=torch.float32, seed=11).cpu()
    y, s = kernels.norm_gemv(x, r, nw, 1e-5, True, w)
    n, h = kernels.add_rms_norm(x, r, nw, 1e-5, round_sum=True)
    assert torch.equal(y, F.linear(n, w)) and torch.equal(s, h)
    y1, s1 = kernels.norm_gemv(x, None, nw, 1e-5, False, w)
    assert s1 is None and torch.equal(y1, F.linear(kernels.rms_norm_gate(x, None, nw, 1e-5), w))
