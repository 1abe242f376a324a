"""Shared test data: states shaped like `StatePool.read` output, fingerprints, tokens."""

from __future__ import annotations

import hashlib

import torch


def make_state(layers: int = 2, heads: int = 2, v: int = 8, k: int = 4, seed: int = 0,
               conv: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"layers.{i}.recurrent": torch.randn(heads, v, k, generator=g) for i in range(layers)}
    if conv:
        out |= {f"layers.{i}.conv": torch.randn(5, 3, generator=g).to(torch.bfloat16) for i in range(layers)}
    return out


def state_of_bytes(nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fp32 state of about `nbytes` split over 4 layers (for sized tests)."""
    per_layer = nbytes // 4 // 4
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.recurrent": torch.randn(per_layer, generator=g) for i in range(4)}


def fp(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=32).digest()


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
