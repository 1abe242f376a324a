"""Kernel-test fixtures: NaN-poisoned allocations."""

from __future__ import annotations

import os

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


# Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when kernels.triton_* is
# first imported; without a GPU the Triton tests can only run interpreted, so say so before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
