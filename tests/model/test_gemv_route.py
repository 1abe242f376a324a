"""kernels.GEMV_ROUTE: the serving GEMMs as Triton GEMVs at <= 16 tokens give the same logits and states.

With the switch on, the fused input projection, o_proj, gate|up and SwiGLU + down_proj of every
batch of at most 16 tokens go through `kernels.gemv` / `kernels.swiglu_gemv`. On the CPU those are
the PyTorch forms (so on == off exactly); one test swaps in the Triton kernels (interpreted) and
compares with the switch off, fp32, to 1e-5 (rel): only the summation order differs.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

import kernels
from model import GLAForCausalLM, StatePool
from tests.model.conftest import VOCAB, tiny_model
from tests.model.test_fused import i32, rel

TOL = 1e-5


def run(model: GLAForCausalLM, ids: torch.Tensor) -> tuple[list[torch.Tensor], StatePool]:
    """A 20-token prefill (GEMM), a 9-token resumed prefill (GEMV), decode steps at batch 2 and 1."""
    pool = model.new_state_pool(3)
    outs = [model.prefill(ids[:20], i32(0, 20), pool, i32(2))]
    outs.append(model.prefill(ids[20:29], i32(0, 4, 9), pool, i32(0, 2), torch.tensor([False, True])))
    for t in range(30, 33):
        outs.append(model.decode(ids[t : t + 2], pool, i32(0, 2)))
    outs.append(model.decode(ids[40:41], pool, i32(2)))
    return outs, pool


def assert_same(a: tuple[list[torch.Tensor], StatePool], b: tuple[list[torch.Tensor], StatePool],
                tol: float) -> None:
    """Like test_fused's, but inclusive: tol 0.0 asks for bit-identical results."""
    for i, (x, y) in enumerate(zip(a[0], b[0], strict=True)):
        assert rel(x, y) <= tol, f"step {i}: {rel(x, y):.2e}"
    for (name, x), (_, y) in zip(a[1]._tensors(), b[1]._tensors(), strict=True):
        assert rel(x, y) <= tol, name


def test_the_route_defaults_to_single_rows() -> None:
    """On by default for one row (batch-1 decode, where it measured faster), with the norm prologue."""
    if any(os.environ.get(v) for v in ("GLA_TRITON_GEMV", "GLA_GEMV_MAX_ROWS", "GLA_GEMV_PRENORM")):
        pytest.skip("the route is configured in this environment")
    assert kernels.GEMV_ROUTE["enabled"] is True and kernels.GEMV_ROUTE["max_rows"] == 1
    assert kernels.GEMV_ROUTE["prenorm"] is True
    assert kernels.use_prenorm(1) and not kernels.use_prenorm(2)


@pytest.fixture(autouse=True)
def sixteen_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests route every step of at most 16 rows (the default is batch-1 decode only)."""
    if request.node.name != "test_the_route_defaults_to_single_rows":
        monkeypatch.setitem(kernels.GEMV_ROUTE, "max_rows", 16)


def test_switch_on_the_cpu_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model().fuse_for_inference()
    ids = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(3))
    monkeypatch.setitem(kernels.GEMV_ROUTE, "enabled", False)
    off = run(model, ids)
    monkeypatch.setitem(kernels.GEMV_ROUTE, "enabled", True)
    assert_same(run(model, ids), off, 0.0)


@pytest.mark.parametrize("prenorm", [True, False], ids=["prenorm", "separate-norms"])
@pytest.mark.parametrize("variant", ["plain", "gelu-unfused-norm"])
def test_switch_on_through_the_triton_gemv(variant: str, prenorm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode and a short prefill with the Triton GEMVs (interpreted on the CPU) == the switch off.
    prenorm: attn_norm and mlp_norm run as the prologue of the in_proj and gate|up GEMVs (norm_gemv)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter (CUDA: test_switch_on_cuda_graphed_decode)")
    pytest.importorskip("triton")
    from kernels import triton_gemv as tg

    overrides = {"gelu-unfused-norm": {"hidden_act": "gelu", "fuse_norm": False}}.get(variant, {})
    model = tiny_model(**overrides).fuse_for_inference()
    ids = torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(4))
    monkeypatch.setitem(kernels.GEMV_ROUTE, "enabled", False)
    off = run(model, ids)
    calls: Counter[tuple[str, int]] = Counter()

    def counted(name: str, fn):  # type: ignore[no-untyped-def]
        def call(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            calls[name, x.numel() // x.shape[-1]] += 1
            return fn(x, w)
        return call

    def counted_norm(x: torch.Tensor, *args):  # type: ignore[no-untyped-def]
        calls["norm_gemv", x.numel() // x.shape[-1]] += 1
        return tg.norm_gemv_triton(x, *args)

    monkeypatch.setitem(kernels.GEMV_ROUTE, "enabled", True)
    monkeypatch.setitem(kernels.GEMV_ROUTE, "prenorm", prenorm)
    monkeypatch.setattr(kernels, "gemv", counted("gemv", tg.gemv_triton))
    monkeypatch.setattr(kernels, "norm_gemv", counted_norm)
    monkeypatch.setattr(kernels, "swiglu_gemv", counted("swiglu_gemv", tg.swiglu_gemv_triton))
    monkeypatch.setitem(tg.GEMV, "SPLIT_K", 2)  # the tiny model's K = 64: also exercise split-K
    monkeypatch.setitem(tg.GEMV, "BLOCK_K", 32)
    monkeypatch.setitem(tg.GEMV, "DOT_BLOCK_K", 32)
    assert_same(run(model, ids), off, TOL)
    layers = model.config.num_hidden_layers
    swiglu_layers = layers if variant == "plain" else 0  # gelu keeps the separate activation + down_proj
    # per layer and step: input projection, o_proj, gate|up (gemv, or norm_gemv for the first and
    # last with prenorm); down_proj (swiglu_gemv). Steps with <= 16 tokens: the 9-token prefill,
    # 3 decodes of 2, 1 decode of 1
    per, normed = (1, 2) if prenorm else (3, 0)
    assert calls["gemv", 9] == per * layers and calls["gemv", 2] == 3 * per * layers
    assert calls["gemv", 1] == per * layers
    assert calls["norm_gemv", 9] == normed * layers and calls["norm_gemv", 2] == 3 * normed * layers
    assert calls["norm_gemv", 1] == normed * layers
    assert calls["swiglu_gemv", 2] == 3 * swiglu_layers and calls["swiglu_gemv", 1] == swiglu_layers
    assert not any(rows > 16 for _, rows in calls)


@pytest.mark.gpu
def test_switch_on_cuda_graphed_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """gla-1.3B shapes, bf16, 2 layers: graphed decode with the GEMVs == eager decode with cuBLAS."""
    from model import GLAConfig
    from model.cuda_graph import GraphedDecoder

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GLAForCausalLM(GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=2))
    model = model.to(torch.bfloat16).eval().fuse_for_inference()
    pool, ref_pool = model.new_state_pool(4), model.new_state_pool(4)
    for a, b in zip(pool.recurrent, ref_pool.recurrent, strict=True):
        a.normal_(0, 0.1)
        b.copy_(a)
    ids = torch.tensor([11, 7, 3], device="cuda")
    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device="cuda")
    monkeypatch.setitem(kernels.GEMV_ROUTE, "enabled", False)
    refs = [model.decode(ids + step, ref_pool, slots) for step in range(3)]
    monkeypatch.setitem(kernels.GEMV_ROUTE, "enabled", True)
    dec = GraphedDecoder(model, pool, scratch_slot=3, max_batch=4, buckets=[1, 2, 4])
    for step in range(3):
        g = dec(ids + step, slots)
        assert rel(g.float(), refs[step].float()) < 2e-2, f"step {step}: {rel(g.float(), refs[step].float()):.2e}"
    assert rel(pool.recurrent[1][:3], ref_pool.recurrent[1][:3]) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("route", [False, True], ids=["cublas", "gemv"])
def test_pdl_graphed_decode_is_bit_identical(route: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch (kernels/_launch.py PDL, GEMV["PDL"]) only lets kernels start
    early; they wait for the previous grid before reading its results. So graphed and eager decode
    steps with it on equal the steps with it off bit for bit (gla-1.3B shapes, bf16, 4 layers, and a
    prefill kernel between steps that writes the pool the decode kernel then reads)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs compute capability 9.0")
    from kernels import _launch, triton_gemv
    from model import GLAConfig
    from model.cuda_graph import GraphedDecoder

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GLAForCausalLM(GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=4))
    model = model.to(torch.bfloat16).eval().fuse_for_inference()
    monkeypatch.setitem(kernels.GEMV_ROUTE, "enabled", route)
    ids = torch.randint(0, 1000, (64,), device="cuda")
    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device="cuda")

    monkeypatch.setitem(_launch.PDL, "max_rows", 16)  # PDL at these 3-sequence steps too

    def steps(pdl: int, graphed: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        monkeypatch.setitem(_launch.PDL, "fused", pdl)
        monkeypatch.setitem(triton_gemv.GEMV, "PDL", pdl)
        pool = model.new_state_pool(4)
        model.prefill(ids[:48], i32(0, 20, 37, 48), pool, slots.cpu())
        dec = GraphedDecoder(model, pool, scratch_slot=3, max_batch=4, buckets=[1, 2, 4]) if graphed else None
        outs = []
        for step in range(6):
            x = ids[48 + 2 * step : 51 + 2 * step]
            outs.append((dec(x, slots) if dec else model.decode(x, pool, slots)).clone())
            if step == 2:  # a prefill between steps: the decode kernel must see the state it wrote
                model.prefill(ids[:5], i32(0, 5), pool, slots[1:2].cpu(), torch.tensor([True]))
        torch.cuda.synchronize()
        return outs, pool.recurrent[0].clone()

    for graphed in (False, True):
        off, on = steps(0, graphed), steps(1, graphed)
        for i, (a, b) in enumerate(zip(off[0], on[0], strict=True)):
            assert torch.equal(a, b), f"graphed={graphed} step {i}: {rel(a.float(), b.float()):.2e}"
        assert torch.equal(off[1], on[1]), f"graphed={graphed}: states differ"
