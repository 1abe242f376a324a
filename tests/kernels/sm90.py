"""Builds Triton kernels for sm_90 (H100/H200) with the real compiler on a machine without a GPU.

The interpreter runs the kernels but never compiles them, so the tests that must see what ptxas
makes of them (registers, spills, PTX instructions) build them here, in a child process without
TRITON_INTERPRET, with 16-byte-aligned pointers as at run time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# A case: [module, kernel name, {arg: type} for runtime args, {arg: value} for constexprs, compile options].
Case = list[Any]
PTX_MARKERS = ("griddepcontrol.wait", "griddepcontrol.launch_dependents")
GDC_MARKERS = PTX_MARKERS  # programmatic dependent launch


def has_gdc(built: dict[str, Any]) -> bool:
    """Both PDL instructions are in the kernel's PTX."""
    return all(built["ptx"][m] for m in GDC_MARKERS)

_BUILD = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton, triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
markers = json.loads(sys.argv[2])
out = []
for mod, name, sig, consts, opts in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(mod), name)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature={**sig, **dict.fromkeys(consts, "constexpr")}, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    out.append({"kernel": name, "regs": int(m.group(1)), "stack": int(m.group(2)),
                "ptx": {s: s in k.asm["ptx"] for s in markers}})
print(json.dumps(out))
"""


def build_for_sm90(cases: list[Case], timeout_s: float = 600) -> list[dict[str, Any]]:
    """One result per case: kernel, regs, stack (bytes of spills per thread), ptx markers found.
    Skips the calling test when this machine's Triton has no CUDA toolchain."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _BUILD, json.dumps(cases), json.dumps(PTX_MARKERS)],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2],
                       timeout=timeout_s)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()
                              or "ImportError" in r.stderr or "FileNotFoundError" in r.stderr):
        pytest.skip(f"cannot compile for sm_90 here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    built = json.loads(r.stdout.strip().splitlines()[-1])
    assert [b["kernel"] for b in built] == [c[1] for c in cases]
    return built
