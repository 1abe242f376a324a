"""The PyTorch forms (chunked, varlen pool, decode) against the token-by-token spec, in float64.

float64 makes the comparison exact up to reassociation, so the bound is tight: rel-RMS <= 1e-10
for outputs and states (measured ~1e-15; any algebra slip shows up as >= 1e-3).
"""

from __future__ import annotations

import pytest
import torch
from gla_testutils import assert_close, gla_inputs, random_state

from kernels import chunk_gla_prefill, chunk_gla_torch, fused_recurrent_gla_decode, naive_recurrent_gla
from kernels.decode_torch import rms_norm_swish_gate

F64_BOUND = 1e-10

CASES = [(T, H, K, V) for T in (1, 15, 63, 64, 65, 200) for (H, K, V) in ((2, 60, 60), (1, 32, 48))]


@pytest.mark.parametrize("n", [1, 16], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("use_h0", [False, True], ids=["h0none", "h0rand"])
@pytest.mark.parametrize("T,H,K,V", CASES, ids=[f"B2-T{T}-H{H}-K{K}-V{V}-f64" for T, H, K, V in CASES])
def test_chunk_torch_matches_naive(T: int, H: int, K: int, V: int, use_h0: bool, n: int) -> None:
    q, k, v, g = gla_inputs(2, T, H, K, V, n)
    h0 = random_state(2, H, V, K) if use_h0 else None
    ref_o, ref_s = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, s = chunk_gla_torch(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float64 and s is not None
    assert_close(o, ref_o, F64_BOUND, "o")
    assert_close(s, ref_s, F64_BOUND, "state")


def test_chunk_torch_long_strong_gates_stay_finite() -> None:
    """4K tokens with strong decay: a cumulative (not chunk-local) exponent would underflow/overflow."""
    q, k, v, g = gla_inputs(1, 4096, 1, 16, 16, 1, dtype=torch.float32)
    g = g * 20  # decays down to exp(-100) per step
    o, s = chunk_gla_torch(q, k, v, g, output_final_state=True)
    ref_o, ref_s = naive_recurrent_gla(*(x.double() for x in (q, k, v, g)), output_final_state=True)
    assert torch.isfinite(o).all() and s is not None and torch.isfinite(s).all()
    assert_close(o, ref_o.float(), 1e-5, "o")
    assert_close(s, ref_s.float(), 1e-5, "state")


def test_chunk_torch_float32_and_bf16_dtypes() -> None:
    q, k, v, g = gla_inputs(1, 130, 2, 32, 32, 16, dtype=torch.bfloat16)
    o, s = chunk_gla_torch(q, k, v, g, output_final_state=True)
    ref_o, ref_s = naive_recurrent_gla(*(x.double() for x in (q, k, v, g)), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s is not None and s.dtype == torch.float32
    assert_close(o, ref_o, 5e-3, "o bf16")
    assert_close(s, ref_s, 1e-5, "state")


def test_chunk_torch_is_differentiable() -> None:
    q, k, v, g = (x.requires_grad_() for x in gla_inputs(1, 70, 1, 8, 8, 1))
    h0 = random_state(1, 1, 8, 8).requires_grad_()
    o, s = chunk_gla_torch(q, k, v, g, initial_state=h0, output_final_state=True)
    (o.sum() + s.sum()).backward()
    ref_grads = [x.grad.clone() for x in (q, k, v, g, h0)]
    for x in (q, k, v, g, h0):
        x.grad = None
    o2, s2 = naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    (o2.sum() + s2.sum()).backward()
    for name, got, x in zip("qkvgh", ref_grads, (q, k, v, g, h0), strict=True):
        assert torch.isfinite(got).all(), name
        assert_close(got, x.grad, F64_BOUND, f"d{name}")


LENS = [[1, 15, 64, 65, 130], [200], [3, 1, 63]]


@pytest.mark.parametrize("use_mask", [False, True], ids=["allcont", "mixedfresh"])
@pytest.mark.parametrize("lens", LENS, ids=["-".join(map(str, x)) for x in LENS])
def test_prefill_pool_matches_per_sequence_naive(lens: list[int], use_mask: bool) -> None:
    H, K, V, S = 2, 24, 40, 9
    T = sum(lens)
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 4))  # packed [T, H, D]
    pool = random_state(S, H, V, K)
    pool_before = pool.clone()
    slots = torch.tensor([7, 2, 5, 0, 8][: len(lens)], dtype=torch.int32)
    mask = torch.tensor([i % 2 == 0 for i in range(len(lens))]) if use_mask else None
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ckpt = torch.tensor(sorted({0, T - 1, lens[0] - 1, T // 2, min(T - 1, 64), min(T - 1, 70)}))
    o, states = chunk_gla_prefill(q, k, v, g, cu, pool, slots, initial_state_mask=mask,
                                  checkpoint_positions=ckpt)
    assert o.shape == (T, H, V)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        fresh = mask is not None and not bool(mask[n])
        h0 = None if fresh else pool_before[slots[n].item()].unsqueeze(0)
        ref_o, ref_s = naive_recurrent_gla(q[None, a:b], k[None, a:b], v[None, a:b], g[None, a:b],
                                           initial_state=h0, output_final_state=True)
        assert_close(o[a:b], ref_o[0], F64_BOUND, f"o seq{n}")
        assert_close(pool[slots[n].item()], ref_s[0], F64_BOUND, f"state seq{n}")
        for m, p in enumerate(ckpt.tolist()):
            if a <= p < b:
                _, ref_c = naive_recurrent_gla(q[None, a:p + 1], k[None, a:p + 1], v[None, a:p + 1],
                                               g[None, a:p + 1], initial_state=h0, output_final_state=True)
                assert_close(states[m], ref_c[0], F64_BOUND, f"checkpoint {p}")
    untouched = sorted(set(range(S)) - set(slots.tolist()))
    assert torch.equal(pool[untouched], pool_before[untouched])


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "normgate"])
def test_decode_torch_matches_naive_and_leaves_other_slots(gated: bool) -> None:
    B, H, K, V, S = 3, 2, 20, 36, 6
    q, k, v, g = (x[:, 0] for x in gla_inputs(B, 1, H, K, V, 1))
    pool = random_state(S, H, V, K)
    before = pool.clone()
    slots = torch.tensor([4, 0, 3], dtype=torch.int32)
    gate = torch.randn(B, H, V, dtype=torch.float64) if gated else None
    w = torch.rand(V, dtype=torch.float64) + 0.5 if gated else None
    o = fused_recurrent_gla_decode(q, k, v, g, pool, slots, gate=gate, norm_weight=w)
    ref_o, ref_s = naive_recurrent_gla(q[:, None], k[:, None], v[:, None], g[:, None],
                                       initial_state=before[slots.long()], output_final_state=True)
    ref_o = ref_o[:, 0]
    if gated:
        ref_o = rms_norm_swish_gate(ref_o, gate, w)
    assert_close(o, ref_o, F64_BOUND, "o")
    assert_close(pool[slots.long()], ref_s, F64_BOUND, "state")
    assert torch.equal(pool[[1, 2, 5]], before[[1, 2, 5]])


def test_rms_norm_swish_gate_formula() -> None:
    o = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    gate = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    out = rms_norm_swish_gate(o, gate, torch.tensor([1.0, 0.5], dtype=torch.float64), eps=0.0)
    rms = (12.5) ** 0.5
    expected = torch.tensor([[0.0, 4.0 / rms * 0.5 * 2.0 * torch.sigmoid(torch.tensor(2.0)).item()]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected)
