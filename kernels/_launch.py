"""Low-overhead Triton launches for the serving hot path.

Triton's `kernel[grid](...)` binds and specialises every argument and looks the kernel up in its cache
on every call: tens of microseconds of Python per launch. After the first launch of a specialisation
(we key it ourselves: dtypes, constexprs, 16-byte alignment of the pointers) we call the compiled
kernel's launcher directly. Integer runtime arguments are marked do_not_specialize in the kernels so
their values never change the compiled code. If the installed Triton's launcher has another calling
convention, the first direct call raises and we fall back to the normal path for good.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ON = ("1", "true", "yes", "on")


def env_flag(name: str, default: bool) -> int:
    """A kernel switch from the environment: 1 if `name` is 1/true/yes/on, 0 if set to anything else,
    `default` if unset."""
    value = os.environ.get(name)
    return int(default) if value is None else int(value.lower() in _ON)


# Programmatic dependent launch (PDL) for the serving kernels (env GLA_PDL=0 turns it off).
# A kernel launched with it may start while the kernel before it in the stream still runs: it calls
# griddepcontrol.launch_dependents first (so the kernel after it may launch too), reads only weights,
# then griddepcontrol.wait (the previous grid has finished and its writes are visible) before it reads
# anything an earlier kernel wrote. Since every PDL kernel waits before it ends, a kernel that passed
# its wait sees every kernel before it finished. Used up to "max_rows" rows (sequences, tokens):
# on an H200 the batch-1 decode graph went 1.469 -> 1.366 ms with it on the GEMVs, norms and decode
# kernel (1.324 with the norm_gemv prologue), but 1.374 -> 1.398 ms with cuBLAS GEMMs between our
# kernels (benchmarks/results/small-steps-pdl-h200-run13.json), so it follows the GEMV route's rows.
# "fused": the norm, SwiGLU and decode kernels; the GEMVs have their own switch (triton_gemv.GEMV["PDL"],
# env GLA_GEMV_PDL, on with "fused" by default).
PDL: dict[str, int] = {"fused": env_flag("GLA_PDL", True),
                       "max_rows": int(os.environ.get("GLA_PDL_MAX_ROWS", "1"))}


def _stream_getter() -> Any:
    """The raw current-stream handle getter (what Triton's own launch path uses): a C call, where
    `torch.cuda.current_stream().cuda_stream` builds a Python Stream object every time."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return lambda device: torch.cuda.current_stream(device).cuda_stream
    return raw


_current_stream = _stream_getter()


class Launcher:
    """`Launcher(kernel)(grid, key, args, num_warps=.., num_stages=..)`; args = every kernel parameter
    in declaration order, constexprs included. key must capture everything that selects the compiled
    code and start with the CUDA device index (None disables the cache for this call, e.g. for
    misaligned inputs)."""

    fast_ok = not _INTERPRET

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.compiled: dict[tuple, Any] = {}

    def __call__(self, grid: tuple[int, ...], key: tuple | None, args: tuple, **opts: int) -> None:
        kernel = self.compiled.get(key) if key is not None else None
        if kernel is not None and Launcher.fast_ok:
            g = (*grid, 1, 1)
            try:
                kernel.run(g[0], g[1], g[2], _current_stream(key[0]), kernel.function,
                           kernel.packed_metadata, None, None, None, *args)
                return
            except (TypeError, AttributeError, ValueError):
                Launcher.fast_ok = False  # another Triton calling convention: launch normally below
        kernel = self.fn[grid](*args, **opts)
        if key is not None and Launcher.fast_ok and kernel is not None and hasattr(kernel, "function"):
            self.compiled[key] = kernel


@functools.cache
def _pdl_device_ok(device_type: str, index: int | None) -> bool:
    return device_type == "cuda" and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA device of compute capability 9.0 or newer (never in
    the interpreter)."""
    return not _INTERPRET and _pdl_device_ok(device.type, device.index)


def use_pdl(device: torch.device, switch: int, rows: int) -> bool:
    """Whether a kernel behind `switch` (a PDL entry or GEMV["PDL"]) over `rows` rows launches with PDL
    on this device."""
    return bool(switch) and rows <= PDL["max_rows"] and pdl_ok(device)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division. (`triton.cdiv` and `triton.next_power_of_2` are constexpr-function
    wrappers in recent Triton: microseconds per call on the per-layer launch path.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def aligned(*tensors: torch.Tensor) -> bool:
    """All data pointers 16-byte aligned, as Triton assumes when it specialises pointer arguments."""
    acc = 0
    for t in tensors:
        acc |= t.data_ptr()
    return acc % 16 == 0
