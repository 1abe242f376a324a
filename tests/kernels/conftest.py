"""Kernel-test fixtures: NaN-poisoned allocations."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def nan_poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torch.empty / empty_like return NaN so a kernel that skips a write cannot pass."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
