"""Shared helpers of the kernel tests: random GLA inputs (never zeros) and the error metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gla_inputs(
    B: int, T: int, H: int, K: int, V: int, n: float, dtype: torch.dtype = torch.float64,
    device: str = "cpu", seed: int = 42,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k [B,T,H,K] and v [B,T,H,V] ~ N(0,1); g = logsigmoid(N(0,1)) / n, all rounded to dtype."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)) / n
    return tuple(x.to(dtype=dtype, device=device) for x in (q, k, v, g))  # type: ignore[return-value]


def random_state(N: int, H: int, V: int, K: int, dtype: torch.dtype = torch.float64, seed: int = 7,
                 device: str = "cpu") -> torch.Tensor:
    """A random [N, H, V, K] state of realistic magnitude."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, H, V, K, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """fla's metric: ||out - ref||_2 / ||ref||_2, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, bound: float, what: str = "") -> None:
    """rel-RMS <= bound, max|d| / max|ref| <= 2 * bound, and no NaN (style.md section 4.5)."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_rms(out, ref)
    peak = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err <= bound, f"{what}: rel_rms {err:.3e} > {bound:.1e}"
    assert peak <= 2 * bound, f"{what}: max|d|/max|ref| {peak:.3e} > {2 * bound:.1e}"
