"""The CUDA dispatch guard: a Triton variant that fails to build falls back to PyTorch, bad input does not."""

from __future__ import annotations

import pytest

from kernels import _Guarded


def test_failing_kernel_falls_back_once_per_variant() -> None:
    calls: list[str] = []

    def fast(x: int) -> int:
        calls.append("fast")
        if x < 0:
            raise RuntimeError("no kernel image for this GPU")
        return x + 1

    def slow(x: int) -> int:
        calls.append("slow")
        return x + 1

    guard = _Guarded("op", fast, slow, (RuntimeError,))
    with pytest.warns(RuntimeWarning, match="using PyTorch"):
        assert guard((True,), -1) == 0
    assert guard((True,), 5) == 6  # this variant now goes straight to PyTorch
    assert guard((False,), 5) == 6  # another variant still tries Triton first
    assert calls == ["fast", "slow", "slow", "fast"]


def test_bad_input_is_not_swallowed() -> None:
    def fast(x: int) -> int:
        raise ValueError("q, k, v, g and state_pool must be contiguous")

    guard = _Guarded("op", fast, lambda x: x, (RuntimeError,))
    with pytest.raises(ValueError, match="contiguous"):
        guard((True,), 1)
    with pytest.raises(ValueError):
        guard((True,), 1)  # still not cached as a fallback
