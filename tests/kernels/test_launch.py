"""`kernels._launch.Launcher`'s direct-launch path, with a stand-in for a compiled Triton kernel.

The direct path only runs on a GPU (the interpreter always takes Triton's own path), so this checks
its plumbing on the CPU: the first call compiles through `fn[grid]`, later calls go to the cached
kernel's `run` with the same arguments,
and a launcher with another calling convention falls back to `fn[grid]` for good.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kernels import _launch
from kernels._launch import Launcher


class FakeCompiled:
    function = 1234
    packed_metadata = ("meta",)

    def __init__(self, fail: bool = False) -> None:
        self.runs: list[tuple] = []
        self.fail = fail

    def run(self, *a: Any) -> None:
        if self.fail:
            raise TypeError("another calling convention")
        self.runs.append(a)


class FakeKernel:
    """`fn[grid](*args, **opts)` as Triton's JIT function: records the call, returns the compiled kernel."""

    def __init__(self, compiled: FakeCompiled) -> None:
        self.compiled = compiled
        self.jit_calls: list[tuple] = []

    def __getitem__(self, grid: tuple) -> Any:
        def call(*args: Any, **opts: Any) -> FakeCompiled:
            self.jit_calls.append((grid, args, opts))
            return self.compiled
        return call


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(Launcher, "fast_ok", True)
    monkeypatch.setattr(_launch, "_current_stream", lambda device: 777)
    yield


def test_cached_kernel_is_launched_directly_with_the_same_arguments(direct):
    compiled = FakeCompiled()
    fn = FakeKernel(compiled)
    launch = Launcher(fn)
    x, y = torch.randn(3, 5), torch.zeros(7, dtype=torch.int32)
    args = (x, y, 17, 0.5, True)
    launch((4, 2), (0, "key"), args, num_warps=4)
    assert len(fn.jit_calls) == 1 and fn.jit_calls[0][1] == args and compiled.runs == []
    launch((4, 2), (0, "key"), args, num_warps=4)
    assert len(fn.jit_calls) == 1  # the second launch skipped Triton's binding and cache lookup
    (run,) = compiled.runs
    assert run[:9] == (4, 2, 1, 777, 1234, ("meta",), None, None, None)
    passed = run[9:]
    assert passed[0] is x and passed[1] is y and passed[2:] == (17, 0.5, True)


def test_a_launcher_that_rejects_the_call_falls_back_for_good(direct):
    compiled = FakeCompiled(fail=True)
    fn = FakeKernel(compiled)
    launch = Launcher(fn)
    args = (torch.ones(2), 3)
    launch((1,), (0, "k"), args)
    launch((1,), (0, "k"), args)
    assert len(fn.jit_calls) == 2 and Launcher.fast_ok is False


def test_no_key_never_caches(direct):
    fn = FakeKernel(FakeCompiled())
    launch = Launcher(fn)
    for _ in range(3):
        launch((1,), None, (torch.ones(2),))
    assert len(fn.jit_calls) == 3 and launch.compiled == {}
