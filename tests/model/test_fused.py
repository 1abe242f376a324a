"""fuse_for_inference: same logits and states as the unfused model, same checkpoint, no extra memory.

CPU fp32 runs the PyTorch forms of the fused ops, which repeat the unfused arithmetic; the only
difference is one wide GEMM instead of several narrow ones, so prefill/decode agree to 1e-5 (rel).
One test swaps in the Triton kernels (under the interpreter on the CPU) for the whole model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import kernels
from model import GLAForCausalLM, StatePool, load_checkpoint
from tests.model.conftest import VOCAB, tiny_model

TOL = 1e-5
VARIANTS = {
    "plain": {},
    "shortconv-gqa": {"use_short_conv": True, "num_kv_heads": 2},
    "no-gate-featuremap-clamp": {"use_output_gate": False, "feature_map": "relu", "clamp_min": -0.05},
    "tied-no-affine": {"tie_word_embeddings": True, "elementwise_affine": False},
    "gelu-unfused-norm": {"hidden_act": "gelu", "fuse_norm": False},
}


def i32(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_serving(model: GLAForCausalLM, ids: torch.Tensor) -> tuple[list[torch.Tensor], StatePool]:
    """Two packed sequences (one resumed from a state), then four decode steps of both."""
    pool = model.new_state_pool(3)
    outs = [model.prefill(ids[:20], i32(0, 20), pool, i32(2))]
    outs.append(model.prefill(ids[20:50], i32(0, 9, 30), pool, i32(0, 2), torch.tensor([False, True])))
    for t in range(50, 54):
        outs.append(model.decode(ids[t : t + 2], pool, i32(0, 2).to(ids.device)))
    return outs, pool


def assert_same(a: tuple[list[torch.Tensor], StatePool], b: tuple[list[torch.Tensor], StatePool],
                tol: float) -> None:
    for i, (x, y) in enumerate(zip(a[0], b[0], strict=True)):
        assert rel(x, y) < tol, f"step {i}: {rel(x, y):.2e}"
    for (name, x), (_, y) in zip(a[1]._tensors(), b[1]._tensors(), strict=True):
        assert rel(x, y) < tol, name


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_fused_model_matches_unfused(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(5))
    ref = run_serving(model, ids)
    fused = copy.deepcopy(model).fuse_for_inference()
    assert all(layer.attn.fused_in.valid() and layer.mlp.fused.valid() for layer in fused.model.layers)
    assert_same(run_serving(fused, ids), ref, TOL)
    full = model(ids[None, :20]).logits[0, -1].detach()  # forward (no fusion) agrees with serving
    assert rel(ref[0][0][0], full) < 2e-4


def test_fusing_keeps_the_checkpoint_and_shares_memory(tmp_path: Path) -> None:
    model = tiny_model(use_short_conv=True, num_kv_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_for_inference()
    attn, mlp = model.model.layers[0].attn, model.model.layers[0].mlp
    first = (attn.fused_in, attn.fused_conv, mlp.fused)
    model.fuse_for_inference()  # idempotent: the same fused tensors, nothing re-concatenated
    assert (attn.fused_in, attn.fused_conv, mlp.fused) == first
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    storage = attn.fused_in.weight.untyped_storage().data_ptr()
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.g_proj.weight, attn.gk_proj[0].weight):
        assert p.untyped_storage().data_ptr() == storage and p.is_contiguous()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.fused.weight.untyped_storage().data_ptr()
    # an in-place update of a parameter reaches the fused weight (load_state_dict does this)
    model.load_state_dict({k: v + 1 if k.endswith("attn.k_proj.weight") else v for k, v in before.items()})
    assert torch.equal(attn.fused_in.weight[attn.fused_in.splits[0]:][: attn.k_proj.out_features], before[
        "model.layers.0.attn.k_proj.weight"] + 1)
    model.save_pretrained(str(tmp_path))
    loaded = load_checkpoint(tmp_path)  # the loader returns a fused model
    assert loaded.model.layers[1].attn.fused_in is not None and loaded.model.layers[1].attn.fused_in.valid()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_dtype_move_unfuses_safely_and_training_still_works() -> None:
    model = tiny_model(use_short_conv=True).fuse_for_inference()
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(6))
    ref = run_serving(model, ids)
    model = model.double()
    assert not model.model.layers[0].attn.fused_in.valid()  # falls back to separate GEMMs
    moved = run_serving(model, ids)
    assert_same(moved, ref, 1e-5)
    model.fuse_for_inference()
    assert model.model.layers[0].attn.fused_in.valid() and model.model.layers[0].attn.fused_in.weight.dtype == \
        torch.float64
    assert_same(run_serving(model, ids), moved, 1e-6)  # the unfused MLP computes swish in fp32, fused in fp64
    model.train()
    loss = model(ids[None], labels=ids[None]).loss
    loss.backward()  # gradients reach the parameters (views of the fused tensors)
    assert model.model.layers[0].attn.q_proj.weight.grad is not None
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["plain", "shortconv-gqa", "no-gate-featuremap-clamp"])
def test_fused_model_on_the_triton_kernels(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole serving path with every Triton kernel swapped in (interpreted on the CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter (CUDA: test_fused_cuda_model_matches_cpu)")
    pytest.importorskip("triton")
    from kernels import triton_fused as tf
    from kernels.triton_chunk import chunk_gla_prefill_triton
    from kernels.triton_recurrent import (
        fused_recurrent_gla_decode_triton,
        gla_decode_proj_triton,
        short_prefill_triton,
    )

    def prefill(*args, short=False, checkpoint_positions=None, **kw):  # kernels.chunk_gla_prefill's dispatch
        if short and checkpoint_positions is None:
            return short_prefill_triton(*args, **kw)
        return chunk_gla_prefill_triton(*args, checkpoint_positions=checkpoint_positions, **kw)

    model = tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(7))
    ref = run_serving(model, ids)
    for name, fn in {"add_rms_norm": tf.add_rms_norm_triton, "rms_norm_gate": tf.rms_norm_gate_triton,
                     "swiglu": tf.swiglu_triton, "gla_prep": tf.gla_prep_triton, "chunk_gla_prefill": prefill,
                     "fused_recurrent_gla_decode": fused_recurrent_gla_decode_triton,
                     "gla_decode_proj": gla_decode_proj_triton}.items():
        monkeypatch.setattr(kernels, name, fn)
    fused = copy.deepcopy(model).fuse_for_inference()
    for short_max in (kernels.SHORT_PREFILL_MAX, 0):  # the 60-token prompt: token by token, then chunked
        monkeypatch.setattr(kernels, "SHORT_PREFILL_MAX", short_max)
        assert_same(run_serving(fused, ids), ref, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_fused_cuda_model_matches_cpu(variant: str) -> None:
    """CUDA (Triton kernels, fused) vs the CPU PyTorch model, fp32: TF32 GEMMs/dots bound it to ~1e-3."""
    model = tiny_model(**VARIANTS[variant], hidden_size=512, num_hidden_layers=4)
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(8))
    ref = run_serving(model, ids)
    gpu = copy.deepcopy(model).cuda().fuse_for_inference()
    out, pool = run_serving(gpu, ids.cuda())
    for i, (x, y) in enumerate(zip(out, ref[0], strict=True)):
        assert rel(x.cpu(), y) < 5e-3, f"step {i}"


def _gla13b(layers: int) -> GLAForCausalLM:
    """gla-1.3B shapes (hidden 2048, 4 heads, K 256, V 512, MLP 5632), random bf16 weights, on CUDA."""
    from model import GLAConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GLAForCausalLM(GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=layers))
    return model.to(torch.bfloat16).eval().fuse_for_inference()


def _cuda_kernels(fn) -> int:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@pytest.mark.gpu
def test_decode_launches_few_kernels_per_layer() -> None:
    """The point of the fusion: 8 ops per layer in a decode step (was ~45). Prints the counts (-s)."""
    counts = {}
    ids, slots = torch.tensor([5], device="cuda"), torch.tensor([0], dtype=torch.int32, device="cuda")
    for layers in (1, 3):
        model = _gla13b(layers)
        pool = model.new_state_pool(2)
        counts[layers] = _cuda_kernels(lambda m=model, p=pool: m.decode(ids, p, slots))
    per_layer = (counts[3] - counts[1]) / 2
    print(f"decode kernels: 1 layer {counts[1]}, 3 layers {counts[3]}, per layer {per_layer}")
    assert per_layer <= 12, counts  # 8 ops; cuBLAS may add a split-K reduce to some of the 4 GEMMs


@pytest.mark.gpu
def test_graphed_decode_of_the_fused_model_matches_eager_and_unfused() -> None:
    from model.cuda_graph import GraphedDecoder

    model = _gla13b(2)
    pool = model.new_state_pool(4)
    for t in pool.recurrent:
        t.normal_(0, 0.1)
    eager_pool, unfused_pool = model.new_state_pool(4), model.new_state_pool(4)
    for dst in (eager_pool, unfused_pool):  # a pool holds a lock: copied by value, not deepcopy
        for a, b in zip(dst.recurrent, pool.recurrent, strict=True):
            a.copy_(b)
    unfused = copy.deepcopy(model)  # deepcopy breaks the views: separate GEMMs, same weights
    assert not unfused.model.layers[0].attn.fused_in.valid()
    dec = GraphedDecoder(model, pool, scratch_slot=3, max_batch=4, buckets=[1, 2, 4])
    ids = torch.tensor([11, 7, 3], device="cuda")
    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device="cuda")
    for step in range(3):
        g = dec(ids + step, slots)
        e = model.decode(ids + step, eager_pool, slots)
        u = unfused.decode(ids + step, unfused_pool, slots)
        assert rel(g, e) < 1e-3, f"graph vs eager, step {step}"
        assert rel(u, e) < 2e-2, f"fused vs unfused (bf16 GEMM order), step {step}: {rel(u, e):.2e}"
    assert rel(pool.recurrent[1][:3], eager_pool.recurrent[1][:3]) < 1e-3
