"""The serving interface: resume == replay, varlen == per-sequence, slots stay isolated (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from model import GLAConfig, StatePool, state_bytes_per_sequence
from tests.model.conftest import VOCAB, tiny_model

# fp32 model, fp32 state: prefill (chunked form) and decode (recurrence) only differ by rounding.
TOL = 2e-4

VARIANTS = {
    "plain": {},
    "shortconv-gqa": {"use_short_conv": True, "num_kv_heads": 2},
    "no-gate-featuremap-clamp": {"use_output_gate": False, "feature_map": "relu", "clamp_min": -0.05},
}


def i32(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_prefill_then_decode_equals_full_forward(variant: str) -> None:
    model = tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(1))
    full = model(ids[None]).logits[0].detach()
    pool = StatePool(model.config, num_slots=3)
    slot = i32(1)
    # prompt split over two prefill steps (the engine's token budget), then token-by-token decode
    model.prefill(ids[:50], i32(0, 50), pool, slot, torch.tensor([False]))
    last = model.prefill(ids[50:70], i32(0, 20), pool, slot, torch.tensor([True]))
    assert rel(last[0], full[69]) < TOL
    for t in range(70, 90):
        logits = model.decode(ids[t : t + 1], pool, slot)
        assert rel(logits[0], full[t]) < TOL, t


def test_varlen_batch_equals_each_sequence_alone() -> None:
    model = tiny_model(use_short_conv=True)
    gen = torch.Generator().manual_seed(2)
    lens = [1, 17, 70, 3]
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lens]
    # sequences 1 and 3 continue from a state built by an earlier prefix
    prefixes = {1: torch.randint(0, VOCAB, (9,), generator=gen), 3: torch.randint(0, VOCAB, (66,), generator=gen)}
    slots = i32(4, 0, 2, 5)
    pool = StatePool(model.config, num_slots=6)
    pool.recurrent[0].normal_()  # garbage in slots that start from zeros must be ignored
    for n, pre in prefixes.items():
        model.prefill(pre, i32(0, len(pre)), pool, slots[n : n + 1])
    mask = torch.tensor([n in prefixes for n in range(4)])
    cu = i32(*[0] + list(torch.tensor(lens).cumsum(0).tolist()))
    batch = model.prefill(torch.cat(seqs), cu, pool, slots, mask)
    for n, s in enumerate(seqs):
        full_ids = torch.cat([prefixes[n], s]) if n in prefixes else s
        ref = model(full_ids[None]).logits[0, -1].detach()
        assert rel(batch[n], ref) < TOL, n


def test_decode_leaves_other_slots_untouched() -> None:
    model = tiny_model(use_short_conv=True)
    pool = StatePool(model.config, num_slots=4)
    for t in pool.recurrent + (pool.conv or []):
        t.normal_()
    before = {s: pool.read(s) for s in range(4)}
    model.decode(torch.tensor([5, 7]), pool, i32(2, 0))
    for s in (1, 3):
        after = pool.read(s)
        assert all(torch.equal(after[k], before[s][k]) for k in after)
    assert not torch.equal(pool.read(2)["layers.0.recurrent"], before[2]["layers.0.recurrent"])


def test_snapshot_round_trip_resumes_identically() -> None:
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(3))
    pool = StatePool(model.config, num_slots=2)
    model.prefill(ids[:30], i32(0, 30), pool, i32(0))
    pool.write(1, pool.read(0))
    a = model.decode(ids[30:31], pool, i32(0))
    b = model.decode(ids[30:31], pool, i32(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing"):
        pool.write(1, {"layers.0.recurrent": pool.read(0)["layers.0.recurrent"]})


def test_state_bytes_per_sequence_matches_the_published_models() -> None:
    gla_13b = GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24)
    gla_340m = GLAConfig(hidden_size=1024, num_heads=4, num_hidden_layers=24, tie_word_embeddings=True)
    assert state_bytes_per_sequence(gla_13b) == 48 * 2**20
    assert state_bytes_per_sequence(gla_340m) == 12 * 2**20
    assert gla_13b.mlp_intermediate_size == 5632 and gla_340m.mlp_intermediate_size == 2816


def test_bad_cu_seqlens_is_rejected() -> None:
    model = tiny_model()
    pool = StatePool(model.config, num_slots=2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.prefill(torch.tensor([1, 2, 3]), i32(0, 2, 1, 3), pool, i32(0, 1))  # decreasing
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.prefill(torch.tensor([1, 2, 3]), i32(0, 2, 2, 3), pool, i32(0, 1))  # 3 sequences, 2 slots
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.prefill(torch.tensor([1, 2, 3]), i32(0, 2, 4), pool, i32(0, 1))  # past the tokens


def test_prefill_checkpoint_states_equal_prefilling_the_prefix_alone() -> None:
    """The states `prefill` returns at packed positions are those of the prefix up to them."""
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, VOCAB, (n,), generator=g) for n in (70, 40))
    pool = StatePool(model.config, num_slots=4)
    logits, states = model.prefill(torch.cat([a, b]), i32(0, 70, 110), pool, i32(0, 1),
                                   checkpoint_positions=[68, 70 + 9])
    assert logits.shape[0] == 2 and len(states) == 2
    for (seq, n), got in zip(((a, 69), (b, 10)), states, strict=True):
        ref = StatePool(model.config, num_slots=1)
        model.prefill(seq[:n], i32(0, n), ref, i32(0))
        want = ref.read(0)
        assert set(got) == set(want)
        for name, t in want.items():
            assert rel(got[name], t) < TOL, name


def test_prefill_checkpoints_are_refused_with_short_conv() -> None:
    model = tiny_model(use_short_conv=True)
    pool = StatePool(model.config, num_slots=1)
    with pytest.raises(ValueError, match="use_short_conv"):
        model.prefill(torch.arange(5), i32(0, 5), pool, i32(0), checkpoint_positions=[2])


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
)
def test_pool_write_widens_a_bf16_stored_state_and_refuses_narrowing(device: str) -> None:
    model = tiny_model(use_short_conv=True)
    pool = StatePool(model.config, num_slots=2, device=device)
    gen = torch.Generator().manual_seed(3)
    exact = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in pool.read(0).items()}
    narrow = {k: v.to(torch.bfloat16) for k, v in exact.items()}
    if device == "cuda":
        narrow = {k: v.pin_memory() for k, v in narrow.items()}
    pool.write(1, narrow)
    back = pool.read(1)
    for name, t in exact.items():
        assert back[name].dtype == t.dtype
        torch.testing.assert_close(back[name].cpu(), narrow[name].cpu().to(t.dtype), rtol=0, atol=0)
    wide = {k: v.to(torch.float64) for k, v in exact.items()}
    with pytest.raises(ValueError, match="expected"):
        pool.write(1, wide)  # a wider copy would be rounded silently: refused


@pytest.mark.gpu
@pytest.mark.parametrize("T", [40, 200], ids=["T40-token-by-token", "T200-chunked"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_inference_forward_on_cuda_equals_the_autograd_forward(variant: str, T: int) -> None:
    """Without grad, forward on CUDA runs the serving kernels (fla's rounding points in bf16); with
    grad it runs the PyTorch form. fp32: the same logits; bf16: both within rounding of fp32."""
    model = tiny_model(**VARIANTS[variant]).cuda()
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T)).cuda()
    with torch.enable_grad():
        ref = model(ids).logits.detach()
    with torch.no_grad():
        fast = model(ids).logits
    assert torch.isfinite(fast).all()
    assert rel(fast, ref) < 1e-5
    half = tiny_model(**VARIANTS[variant]).cuda().to(torch.bfloat16)
    with torch.no_grad():
        bf = half(ids).logits.float()
    assert rel(bf, ref) < 3e-2  # bf16 rounding of a tiny random model (fla's own: 1.9e-2, fla_parity.py)
