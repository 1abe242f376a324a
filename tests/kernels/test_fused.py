"""The fused layer kernels (kernels/triton_fused.py) against their PyTorch forms (kernels/fused_torch.py).

Small shapes run under TRITON_INTERPRET=1 on the CPU; the gpu-marked cases use the gla-1.3B sizes.
References are the PyTorch forms in float64 on the same (rounded) inputs. Bounds (rel-RMS, and
max|d|/max|ref| <= 2x): fp32 1e-6 (the same fp32 ops; only the reduction order differs); fp16/bf16
outputs one rounding of the activation dtype, 4e-3 (bf16 ulp 2^-8 relative, rms well below).
Pure copies (q, k, v, gate of gla_prep) must be bit-exact. Outputs are allocated NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch
from gla_testutils import assert_close

from kernels.fused_torch import add_rms_norm_torch, gla_prep_torch, rms_norm_gate_torch, swiglu_torch

triton = pytest.importorskip("triton")
from kernels.triton_fused import (  # noqa: E402
    add_rms_norm_triton,
    gla_prep_triton,
    rms_norm_gate_triton,
    swiglu_triton,
)

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
HALF = "bf16" if ON_GPU else "f16"  # the interpreter's bf16 is emulated; fp16 exercises the same roundings


def bound(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 4e-3


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=DEV)


def _params(small: list[tuple], gpu: list[tuple]) -> list:  # type: ignore[type-arg]
    return [pytest.param(*c, id="-".join(map(str, c))) for c in small] + [
        pytest.param(*c, id="-".join(map(str, c)), marks=pytest.mark.gpu) for c in gpu]


NORM_SMALL = [(1, 64, "f32"), (5, 100, "f32"), (3, 300, HALF)]
NORM_GPU = [(M, D, dt) for M in (1, 64, 1024) for D in (512, 2048) for dt in ("f32", "bf16")]


@pytest.mark.parametrize("M,D,dt", _params(NORM_SMALL, NORM_GPU))
@pytest.mark.parametrize("round_sum", [False, True], ids=["fp32-sum", "rounded-sum"])
@pytest.mark.parametrize("affine", [True, False], ids=["w", "now"])
def test_add_rms_norm(M: int, D: int, dt: str, round_sum: bool, affine: bool, nan_poison: None) -> None:
    dtype = DTYPES[dt]
    x, r = randn(M, D, dtype=dtype, seed=1), randn(M, D, dtype=dtype, seed=2, scale=3.0)
    w = (randn(D, dtype=torch.float32, seed=3) * 0.1 + 1) if affine else None
    y, s = add_rms_norm_triton(x, r, w, 1e-6, round_sum)
    ry, rs = add_rms_norm_torch(x.double(), r.double(), None if w is None else w.double(), 1e-6)
    if round_sum:  # the reference rounds the sum where the kernel does
        rs = (r + x).double()
        ry = rms_norm_gate_torch(rs, None, None if w is None else w.double(), 1e-6)
    assert y.dtype == dtype and s.dtype == dtype
    assert_close(y, ry, bound(dtype), "y")
    assert_close(s, rs, bound(dtype), "sum")


@pytest.mark.parametrize("M,D,dt", _params(NORM_SMALL, NORM_GPU))
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "nogate"])
def test_rms_norm_gate(M: int, D: int, dt: str, gated: bool, nan_poison: None) -> None:
    dtype = DTYPES[dt]
    x = randn(M, 2, D, dtype=dtype, seed=4)  # per-head rows [M, H, V]
    z = randn(M, 2, D, dtype=dtype, seed=5) if gated else None
    w = randn(D, dtype=dtype, seed=6) * 0.1 + 1
    y = rms_norm_gate_triton(x, z, w, 1e-5)
    ref = rms_norm_gate_torch(x.double(), None if z is None else z.double(), w.double(), 1e-5)
    assert y.dtype == dtype
    assert_close(y, ref, bound(dtype), "y")


@pytest.mark.parametrize("M,NI,dt", _params([(1, 100, "f32"), (4, 1500, "f32"), (3, 70, HALF)],
                                             [(M, 5632, dt) for M in (1, 64, 1024) for dt in ("f32", "bf16")]))
def test_swiglu(M: int, NI: int, dt: str, nan_poison: None) -> None:
    dtype = DTYPES[dt]
    x = randn(M, 2 * NI, dtype=dtype, seed=7, scale=2.0)
    y = swiglu_triton(x)
    assert y.dtype == dtype
    assert_close(y, swiglu_torch(x.double()), bound(dtype), "swiglu")


PREP_SMALL = [(3, 2, 1, 60, 48, "f32"), (2, 4, 2, 32, 40, "f32"), (5, 2, 2, 16, 16, HALF)]
PREP_GPU = [(M, 4, G, 256, 512, dt) for M in (1, 64, 1024) for G in (1, 2) for dt in ("f32", "bf16")]


@pytest.mark.parametrize("M,H,G,K,V,dt", _params(PREP_SMALL, PREP_GPU))
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("clamp", [None, -0.05], ids=["noclamp", "clamp"])
def test_gla_prep(M: int, H: int, G: int, K: int, V: int, dt: str, gated: bool, clamp: float | None,
                  nan_poison: None) -> None:
    dtype = DTYPES[dt]
    hkv, R = H // G, 16
    widths = [H * K, hkv * K, hkv * V] + ([H * V] if gated else []) + [R]
    y = randn(M, sum(widths), dtype=dtype, seed=8)  # one fused GEMM's output: strided column slices
    parts = list(y.split(widths, dim=-1))
    q, k, v, lowrank = parts[0], parts[1], parts[2], parts[-1]
    gate = parts[3] if gated else None
    w1 = randn(hkv * K, R, dtype=dtype, seed=9, scale=0.5)
    b1 = randn(hkv * K, dtype=dtype, seed=10)
    out = gla_prep_triton(q, k, v, gate, lowrank, w1, b1, H, K, V, 16, clamp)
    ref = gla_prep_torch(q, k, v, gate, lowrank, w1, b1, H, K, V, 16, clamp)
    for name, a, b in zip(("q", "k", "v"), out[:3], ref[:3], strict=True):
        assert a.is_contiguous() and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: not a bit-exact copy"
    if gated:
        assert out[4] is not None and ref[4] is not None and torch.equal(out[4], ref[4]), "gate"
    else:
        assert out[4] is None
    # the log-gate against the float64 form on the same inputs, with the Linear's rounding applied
    z = torch.nn.functional.linear(lowrank.double(), w1.double(), b1.double()).to(dtype).double()
    ref_gk = (torch.nn.functional.logsigmoid(z).to(dtype).double() / 16).to(dtype).double()
    if clamp is not None:
        ref_gk = ref_gk.clamp_min(clamp)
    ref_gk = ref_gk.view(M, hkv, K).repeat_interleave(G, dim=1)
    assert out[3].dtype == dtype and out[3].is_contiguous()
    assert_close(out[3], ref_gk, bound(dtype), "gk")
    assert_close(out[3], ref[3], bound(dtype), "gk vs the PyTorch form")


def test_logsigmoid_keeps_tiny_tails() -> None:
    """For large z, logsigmoid(z) ~ -exp(-z): the kernel must not round it to 0 (log(1 + e) would)."""
    z = torch.tensor([[20.0, 30.0, -30.0, 0.0]], device=DEV)
    eye = torch.eye(4, device=DEV)
    q = torch.zeros(1, 4, device=DEV)
    gk = gla_prep_triton(q, q, q, None, z, eye, None, 1, 4, 4, 1.0, None)[3]
    ref = torch.nn.functional.logsigmoid(z.double())
    assert_close(gk.view(1, 4), ref, 1e-6, "logsigmoid")
    assert (gk[0, 0, :2] < 0).all()
