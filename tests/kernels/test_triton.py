"""Triton kernels against the float64 spec (kernels/naive.py) on the same rounded inputs.

Runs on CUDA when present, else under TRITON_INTERPRET=1 on the CPU (small shapes: the interpreter
is slow). Bounds, rel-RMS (and max|d|/max|ref| <= 2x): CPU interpreter fp32 1e-5 (exact fp32 dots);
GPU fp32 5e-3 (a bound from when fp32 dots ran in TF32; they are exact fp32 now, not yet re-measured
on a GPU); bf16 5e-3 for o and state; decode 1e-5 in fp32,
bf16 output 5e-3 with its fp32 state at 1e-5. The CPU cases use fp16 for half precision: the Triton
3.9 interpreter's bf16 tl.dot returns garbage (a bare 16x16 bf16 dot is off by 1e10).
"""

from __future__ import annotations

import pytest
import torch
from gla_testutils import assert_close, gla_inputs, random_state

from kernels import chunk_gla_torch, naive_recurrent_gla, rms_norm_swish_gate

triton = pytest.importorskip("triton")
from kernels import triton_chunk  # noqa: E402
from kernels.triton_chunk import chunk_gla_prefill_triton  # noqa: E402
from kernels.triton_recurrent import fused_recurrent_gla_decode_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def prefill_bound(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 5e-3 if ON_GPU else 1e-5
    return 5e-3


def _params(small: list[tuple], gpu: list[tuple], name) -> list:  # type: ignore[no-untyped-def]
    """Small cases run everywhere (interpreter included); `gpu` cases only under the gpu marker."""
    return [pytest.param(*c, id=name(c)) for c in small] + [
        pytest.param(*c, id=name(c), marks=pytest.mark.gpu) for c in gpu]


# (T, H, K, V, n, use_h0, dtype)
PREFILL_SMALL = [(T, 1, 60, 60, n, h0, "f32") for T in (1, 15, 63, 64, 65) for n in (1, 16)
                 for h0 in (False, True)]
PREFILL_SMALL += [(65, 1, 128, 128, 16, True, "f32"), (130, 2, 32, 48, 1, True, "f16"),
                  (1000, 1, 16, 16, 1, True, "f32"), (1000, 1, 16, 16, 16, False, "f32")]
PREFILL_GPU = [(T, 4, K, V, n, h0, dt) for T in (1, 15, 63, 64, 65, 1000)
               for (K, V) in ((60, 60), (128, 256), (256, 512))
               for n in (1, 16) for h0 in (False, True) for dt in ("f32", "bf16")]
PREFILL_GPU += [(2000, 4, 256, 512, 16, True, "f16"), (4096, 4, 256, 512, 1, True, "bf16")]


def _prefill_id(c: tuple) -> str:
    T, H, K, V, n, h0, dt = c
    return f"T{T}-H{H}-K{K}-V{V}-n{n}-{'h0' if h0 else 'noh0'}-{dt}"


@pytest.mark.parametrize("T,H,K,V,n,use_h0,dt", _params(PREFILL_SMALL, PREFILL_GPU, _prefill_id))
def test_prefill_matches_naive(T: int, H: int, K: int, V: int, n: int, use_h0: bool, dt: str,
                               nan_poison: None) -> None:
    dtype = DTYPES[dt]
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, n, dtype=dtype, device=DEV))
    pool = random_state(4, H, V, K, dtype=torch.float32, device=DEV)
    pool[0] = float("nan")  # a fresh slot's garbage must never be read
    before = pool.clone()
    slots = torch.tensor([0 if not use_h0 else 2], dtype=torch.int32, device=DEV)
    mask = torch.tensor([use_h0], device=DEV)
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots, initial_state_mask=mask)
    h0 = before[slots.long()].double() if use_h0 else None
    ref_o, ref_s = naive_recurrent_gla(*(x[None].double() for x in (q, k, v, g)), initial_state=h0,
                                       output_final_state=True)
    assert o.dtype == dtype
    bound = prefill_bound(dtype)
    assert_close(o, ref_o[0], bound, "o")
    assert_close(pool[slots.long()], ref_s, bound, "state")
    others = [i for i in range(4) if i != slots.item()]
    assert torch.equal(pool[others].nan_to_num(7.0), before[others].nan_to_num(7.0))


VARLEN = [([1, 15, 64, 65, 130], 1, 32, 32, None), ([70, 1, 200], 1, 32, 32, 64)]
VARLEN_GPU = [([3000, 1, 64, 700, 5], 4, 256, 512, None), ([2048] * 8, 4, 128, 256, None),
              ([1000, 9000], 4, 256, 512, 1024)]


@pytest.mark.parametrize("lens,H,K,V,seg", _params(
    VARLEN, VARLEN_GPU, lambda c: f"lens{'-'.join(map(str, c[0][:5]))}-H{c[1]}-K{c[2]}-V{c[3]}-seg{c[4]}"))
def test_prefill_varlen_equals_per_sequence(lens: list[int], H: int, K: int, V: int, seg: int | None,
                                            nan_poison: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packed batch (with some sequences starting fresh) == each sequence run alone == the spec."""
    if seg:  # the same arithmetic needs the same score kernel too: a short sequence alone would take
        # the split-K prep (scores summed with atomics, in another order) where the batch does not
        monkeypatch.setitem(triton_chunk.PREP, "SPLIT_MAX_PROGRAMS", 0)
    T, N = sum(lens), len(lens)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 4, dtype=dtype, device=DEV))
    pool = random_state(N + 2, H, V, K, dtype=torch.float32, device=DEV)
    slots = torch.arange(N, dtype=torch.int32, device=DEV).flip(0) + 1
    mask = torch.tensor([i % 3 != 1 for i in range(N)], device=DEV)
    pool[slots[~mask].long()] = float("nan")
    before = pool.clone()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots, initial_state_mask=mask, seg_len=seg)
    bound = prefill_bound(dtype)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        alone = before.clone()
        one = torch.tensor([0, b - a], dtype=torch.int32, device=DEV)
        o1 = chunk_gla_prefill_triton(q[a:b], k[a:b], v[a:b], g[a:b], one, alone, slots[i:i + 1],
                                      initial_state_mask=mask[i:i + 1], seg_len=seg)
        same = 1e-6 if seg else bound  # a forced segment length makes the two runs the same arithmetic
        assert_close(o[a:b], o1, same, f"o seq{i} packed vs alone")
        assert_close(pool[slots[i].long()], alone[slots[i].long()], same, f"state seq{i} packed vs alone")
        h0 = before[slots[i].long()][None].double() if bool(mask[i]) else None
        ref_o, ref_s = naive_recurrent_gla(*(x[None, a:b].double() for x in (q, k, v, g)),
                                           initial_state=h0, output_final_state=True)
        assert_close(o[a:b], ref_o[0], bound, f"o seq{i}")
        assert_close(pool[slots[i].long()], ref_s[0], bound, f"state seq{i}")
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[N + 1], before[N + 1])


@pytest.mark.parametrize("seg", [None, 64], ids=["seg-auto", "seg64"])
def test_prefill_checkpoint_states(seg: int | None, nan_poison: None) -> None:
    lens, H, K, V = [70, 1, 200], 1, 32, 32
    T = sum(lens)
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 2, dtype=torch.float32, device=DEV))
    pool = random_state(3, H, V, K, dtype=torch.float32, device=DEV)
    before = pool.clone()
    slots = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    mask = torch.tensor([True, False, True], device=DEV)
    cu = torch.tensor([0, 70, 71, 271], dtype=torch.int32, device=DEV)
    pos = torch.tensor([0, 63, 64, 69, 70, 71, 134, 135, 200, 270], device=DEV)
    o, states = chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots, initial_state_mask=mask,
                                         checkpoint_positions=pos, seg_len=seg)
    for m, p in enumerate(pos.tolist()):
        n = int(torch.searchsorted(cu[1:], torch.tensor(p, device=DEV), right=True))
        a = cu[n].item()
        h0 = before[n][None].double() if bool(mask[n]) else None
        _, ref = naive_recurrent_gla(*(x[None, a:p + 1].double() for x in (q, k, v, g)), initial_state=h0,
                                     output_final_state=True)
        assert_close(states[m], ref[0], prefill_bound(torch.float32), f"checkpoint {p}")
    # the last token of a sequence is its final state
    assert_close(states[-1], pool[2], 1e-6, "checkpoint at end == final state")


# (B, H, K, V, gated, dtype)
DECODE_SMALL = [(1, 2, 60, 60, False, "f32"), (3, 2, 60, 60, True, "f32"), (3, 1, 128, 128, False, "f32"),
                (2, 2, 32, 48, True, "f16")]
DECODE_GPU = [(B, 4, K, V, gated, dt) for B in (1, 8, 64, 256) for (K, V) in ((128, 256), (256, 512))
              for gated in (False, True) for dt in ("f32", "bf16")]


@pytest.mark.parametrize("B,H,K,V,gated,dt", _params(
    DECODE_SMALL, DECODE_GPU, lambda c: f"B{c[0]}-H{c[1]}-K{c[2]}-V{c[3]}-{'gate' if c[4] else 'plain'}-{c[5]}"))
def test_decode_matches_naive_in_place(B: int, H: int, K: int, V: int, gated: bool, dt: str,
                                       nan_poison: None) -> None:
    dtype = DTYPES[dt]
    S = 2 * B + 3
    pool = random_state(S, H, V, K, dtype=torch.float32, device=DEV)
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(B))[:B].to(torch.int32).to(DEV)
    for step in range(2):  # twice: the fused gate's counters must stay in phase across calls
        q, k, v, g = (x[:, 0] for x in gla_inputs(B, 1, H, K, V, 1, dtype=dtype, device=DEV, seed=step))
        gate = torch.randn(B, H, V, device=DEV).to(dtype) if gated else None
        w = (torch.rand(V, device=DEV) + 0.5).to(dtype) if gated else None
        before = pool.clone()
        o = fused_recurrent_gla_decode_triton(q, k, v, g, pool, slots, gate=gate, norm_weight=w)
        ref_o, ref_s = naive_recurrent_gla(*(x[:, None].double() for x in (q, k, v, g)),
                                           initial_state=before[slots.long()].double(), output_final_state=True)
        ref_o = ref_o[:, 0].to(dtype).double()  # the kernel rounds o to the model dtype before the gate
        if gated:
            ref_o = rms_norm_swish_gate(ref_o, gate.double(), w.double())
        assert o.dtype == dtype
        assert_close(o, ref_o, 1e-5 if dtype == torch.float32 else 5e-3, f"o step{step}")
        assert_close(pool[slots.long()], ref_s, 1e-5, f"state step{step}")
        others = sorted(set(range(S)) - set(slots.tolist()))
        assert torch.equal(pool[others], before[others]), "decode touched another slot"


@pytest.mark.gpu
@pytest.mark.slow
def test_prefill_256k_tokens_strong_gates_stable() -> None:
    """256K tokens in one sequence, gates down to about -30 per step: finite and equal to the
    chunked float64 form (itself tested against the spec)."""
    T, H, K, V = 262144, 1, 64, 64
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 1, dtype=torch.bfloat16, device=DEV))
    g = (g.float() * torch.rand(T, H, K, device=DEV) * 10).to(torch.bfloat16)
    pool = random_state(1, H, V, K, dtype=torch.float32, device=DEV)
    h0 = pool.clone()
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, torch.zeros(1, dtype=torch.int32, device=DEV))
    ref_o, ref_s = chunk_gla_torch(*(x[None].double() for x in (q, k, v, g)), initial_state=h0.double(),
                                   output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(pool).all()
    assert_close(o, ref_o[0], 5e-3, "o")
    assert_close(pool, ref_s, 5e-3, "state")


@pytest.mark.gpu
def test_prefill_split_and_unsplit_prep_share_one_process() -> None:
    """A short prompt (split prep: A in fp32) and a long one (A in bf16) at the same shape, in either
    order, through the compiled-kernel cache: the cache key must tell the two _output kernels apart
    (a shared entry read bf16 A as fp32 and faulted when a graphed-prefill warm-up ran both)."""
    from kernels import triton_chunk

    H, K, V = 4, 256, 512
    for T in (64, 2048, 64, 2048):
        assert (T == 64) == ((T // 64 + 1) * H <= triton_chunk.PREP["SPLIT_MAX_PROGRAMS"])
        q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 16, dtype=torch.bfloat16, device=DEV))
        pool = random_state(2, H, V, K, dtype=torch.float32, device=DEV)
        h0 = pool.clone()
        cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
        o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, torch.ones(1, dtype=torch.int32, device=DEV),
                                     initial_state_mask=torch.ones(1, dtype=torch.bool, device=DEV))
        ref_o, ref_s = chunk_gla_torch(*(x[None].double() for x in (q, k, v, g)),
                                       initial_state=h0[1:2].double(), output_final_state=True)
        assert_close(o, ref_o[0], 5e-3, f"o T={T}")
        assert_close(pool[1:2], ref_s, 5e-3, f"state T={T}")
        assert torch.equal(pool[0], h0[0]), "another slot changed"


PREP_VARIANTS = [(32, 0, False), (16, 4, False), (32, 8, False), (64, 8, False), (32, 0, True), (16, 4, True)]


@pytest.mark.parametrize("bkc,bkd,split", PREP_VARIANTS,
                         ids=[f"BKC{c}-BKD{d}{'-split' if s else ''}" for c, d, s in PREP_VARIANTS])
def test_prefill_prep_variants_match_naive(bkc: int, bkd: int, split: bool, nan_poison: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prep setting the benchmark may choose (key block BKC; diagonal blocks by gathered-row
    steps, BKD=0, or by a broadcast over BKD channels; one program per key block with atomic sums
    of A) computes the spec: varlen with a chunk boundary inside and a 1-token sequence, K not a
    multiple of the blocks, strong gates (n=1)."""
    from kernels import triton_chunk

    monkeypatch.setitem(triton_chunk.PREP, "BKC", bkc)
    monkeypatch.setitem(triton_chunk.PREP, "BKD", bkd)
    monkeypatch.setitem(triton_chunk.PREP, "SPLIT_MAX_PROGRAMS", 10**9 if split else 0)
    lens, H, K, V = [130, 1, 65], 2, 60, 40
    T = sum(lens)
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 1, dtype=torch.float32, device=DEV))
    pool = random_state(3, H, V, K, dtype=torch.float32, device=DEV)
    h0 = pool.clone()
    cu = torch.tensor([0, 130, 131, 196], dtype=torch.int32, device=DEV)
    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEV)
    o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots, initial_state_mask=torch.ones(3, dtype=torch.bool,
                                                                                           device=DEV))
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        s = slots[i].item()
        ref_o, ref_s = naive_recurrent_gla(*(x[None, a:b].double() for x in (q, k, v, g)),
                                           initial_state=h0[s:s + 1].double(), output_final_state=True)
        assert_close(o[a:b], ref_o[0], prefill_bound(torch.float32), f"o[{i}]")
        assert_close(pool[s:s + 1], ref_s, prefill_bound(torch.float32), f"state[{i}]")


# (B, H, G, K, V, bias, clamp, dtype): prep fused into the decode kernel, from strided projection columns
DECODE_PROJ_SMALL = [(1, 2, 1, 60, 60, True, None, "f32"), (3, 4, 2, 32, 48, False, -0.5, "f32"),
                     (2, 2, 1, 32, 48, True, None, "f16")]
DECODE_PROJ_GPU = [(B, 4, G, 256, 512, True, None, dt) for B in (1, 64) for G in (1, 2) for dt in ("f32", "bf16")]


@pytest.mark.parametrize("B,H,G,K,V,bias,clamp,dt", _params(
    DECODE_PROJ_SMALL, DECODE_PROJ_GPU,
    lambda c: f"B{c[0]}-H{c[1]}-G{c[2]}-K{c[3]}-V{c[4]}-{'bias' if c[5] else 'nobias'}-clamp{c[6]}-{c[7]}"))
def test_decode_proj_matches_naive_in_place(B: int, H: int, G: int, K: int, V: int, bias: bool,
                                            clamp: float | None, dt: str, nan_poison: None) -> None:
    """gla_decode_proj == gla_prep + decode: log-gate from the low-rank columns, GQA heads, the norm x
    swish gate, all read from column slices of one wide projection output (as the fused GEMM gives)."""
    from kernels.triton_recurrent import gla_decode_proj_triton

    dtype = DTYPES[dt]
    hkv, R = H // G, 16
    S = 2 * B + 3
    pool = random_state(S, H, V, K, dtype=torch.float32, device=DEV)
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(B))[:B].to(torch.int32).to(DEV)
    gen = torch.Generator().manual_seed(B * 10 + G)
    widths = [H * K, hkv * K, hkv * V, H * V, R]
    y = torch.randn(B, sum(widths) + 8, generator=gen, dtype=torch.float64)  # 8 spare columns: strided rows
    w1 = torch.randn(hkv * K, R, generator=gen, dtype=torch.float64) / 4
    b1 = torch.randn(hkv * K, generator=gen, dtype=torch.float64) if bias else None
    w = torch.rand(V, generator=gen, dtype=torch.float64) + 0.5
    y, w1, w = y.to(dtype).to(DEV), w1.to(dtype).to(DEV), w.to(dtype).to(DEV)
    b1 = b1.to(dtype).to(DEV) if b1 is not None else None
    q, k, v, gate, low = y[:, :sum(widths)].split(widths, dim=-1)
    for step in range(2):  # twice: the fused gate's counters must stay in phase across calls
        before = pool.clone()
        o = gla_decode_proj_triton(q, k, v, gate, low, w1, b1, H, K, V, 16.0, clamp, pool, slots, norm_weight=w)
        # float64 reference from the same rounded inputs (the log-gate rounded like the model's)
        gk = torch.nn.functional.logsigmoid(torch.nn.functional.linear(low, w1, b1)) / 16.0
        if clamp is not None:
            gk = gk.clamp_min(clamp)
        rep = (lambda t, d: t.reshape(B, hkv, d).repeat_interleave(G, dim=1).double())
        qh = q.reshape(B, H, K).double()
        ref_o, ref_s = naive_recurrent_gla(qh[:, None], rep(k, K)[:, None], rep(v, V)[:, None],
                                           rep(gk, K)[:, None], initial_state=before[slots.long()].double(),
                                           output_final_state=True)
        ref_o = rms_norm_swish_gate(ref_o[:, 0].to(dtype).double(), gate.reshape(B, H, V).double(), w.double())
        assert o.dtype == dtype and o.shape == (B, H, V)
        assert_close(o, ref_o, 1e-5 if dtype == torch.float32 else 5e-3, f"o step{step}")
        assert_close(pool[slots.long()], ref_s, 1e-5 if dtype == torch.float32 else 5e-3, f"state step{step}")
        others = sorted(set(range(S)) - set(slots.tolist()))
        assert torch.equal(pool[others], before[others]), "decode touched another slot"


# (lens, H, K, V, dtype): the token-by-token prefill (resumed turns) and padding sequences (slot < 0)
SHORT_SMALL = [([1, 17, 5, 64], 2, 60, 60, "f32"), ([3, 40], 1, 32, 48, "f16")]
SHORT_GPU = [([17, 1, 64, 3], 4, 256, 512, dt) for dt in ("f32", "bf16")] + [([200], 4, 128, 256, "bf16")]


@pytest.mark.parametrize("lens,H,K,V,dt", _params(
    SHORT_SMALL, SHORT_GPU, lambda c: f"lens{'-'.join(map(str, c[0]))}-H{c[1]}-K{c[2]}-V{c[3]}-{c[4]}"))
def test_short_prefill_matches_naive_and_skips_padding(lens: list[int], H: int, K: int, V: int, dt: str,
                                                       nan_poison: None) -> None:
    """Packed sequences, some from the pool's state and some fresh, plus padding sequences (negative
    slot, as CUDA-graph padding): real ones == the spec, padding o rows are zeros and no slot but the
    real ones changes (the padding's own state is never written anywhere)."""
    from kernels.triton_recurrent import short_prefill_triton

    dtype = DTYPES[dt]
    lens = [*lens, 2, 1]  # two padding sequences at the end
    T, N = sum(lens), len(lens)
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 4, dtype=dtype, device=DEV, seed=len(lens)))
    pool = random_state(N + 2, H, V, K, dtype=torch.float32, device=DEV)
    slots = torch.tensor([*range(1, N - 1), -1, -1], dtype=torch.int32, device=DEV)
    mask = torch.tensor([i % 2 == 0 and i < N - 2 for i in range(N)], device=DEV)
    pool[slots[: N - 2][~mask[: N - 2]].long()] = float("nan")  # fresh slots' garbage is never read
    before = pool.clone()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    o = short_prefill_triton(q, k, v, g, cu, pool, slots, initial_state_mask=mask)
    bound = 1e-5 if dtype == torch.float32 else 5e-3
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        if i >= N - 2:
            assert torch.equal(o[a:b], torch.zeros_like(o[a:b])), f"padding seq{i} o"
            continue
        h0 = before[slots[i].long()][None].double() if bool(mask[i]) else None
        ref_o, ref_s = naive_recurrent_gla(*(x[None, a:b].double() for x in (q, k, v, g)),
                                           initial_state=h0, output_final_state=True)
        assert_close(o[a:b], ref_o[0], bound, f"o seq{i}")
        assert_close(pool[slots[i].long()], ref_s[0], 1e-5, f"state seq{i}")
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[N - 1:], before[N - 1:]), "padding wrote a slot"


def test_chunked_prefill_padding_slot_writes_nothing(nan_poison: None) -> None:
    """The chunked kernels with a negative-slot padding sequence: the real sequence's o and state
    equal a run without it, and the pool is otherwise untouched."""
    H, K, V = 1, 32, 32
    lens = [70, 9]
    T = sum(lens)
    q, k, v, g = (x[0] for x in gla_inputs(1, T, H, K, V, 4, dtype=torch.float32, device=DEV))
    pool = random_state(3, H, V, K, dtype=torch.float32, device=DEV)
    before = pool.clone()
    cu = torch.tensor([0, 70, T], dtype=torch.int32, device=DEV)
    slots = torch.tensor([1, -1], dtype=torch.int32, device=DEV)
    mask = torch.tensor([True, False], device=DEV)
    o = chunk_gla_prefill_triton(q, k, v, g, cu, pool, slots, initial_state_mask=mask)
    alone = before.clone()
    o1 = chunk_gla_prefill_triton(q[:70], k[:70], v[:70], g[:70], cu[:2].clone(), alone, slots[:1].clone(),
                                  initial_state_mask=mask[:1].clone())
    assert_close(o[:70], o1, 1e-6, "o")
    assert_close(pool[1], alone[1], 1e-6, "state")
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[2], before[2]), "padding wrote a slot"


@pytest.mark.parametrize("kind", ["chunked", "chunked-seg64", "short"])
def test_prefill_empty_sequences_pass_state_through(kind: str, nan_poison: None) -> None:
    """CUDA-graph padding is empty sequences (`model.cuda_graph.pad_layout`): the real sequences' o
    and states equal a run without them, an empty sequence in a real slot keeps that slot's state,
    and empty or spare-token padding in slot -1 writes nothing."""
    import functools

    from kernels.triton_recurrent import short_prefill_triton

    fn = {"chunked": chunk_gla_prefill_triton, "short": short_prefill_triton,
          "chunked-seg64": functools.partial(chunk_gla_prefill_triton, seg_len=64)}[kind]
    H, K, V = 1, 32, 16
    lens = [17, 70] if kind != "short" else [17, 9]
    T = sum(lens)
    q, k, v, g = (x[0] for x in gla_inputs(1, T + 5, H, K, V, 4, dtype=torch.float32, device=DEV, seed=3))
    pool = random_state(6, H, V, K, dtype=torch.float32, device=DEV)
    before = pool.clone()
    alone = before.clone()
    o1 = fn(q[:T], k[:T], v[:T], g[:T], torch.tensor([0, 17, T], dtype=torch.int32, device=DEV), alone,
            torch.tensor([1, 2], dtype=torch.int32, device=DEV),
            initial_state_mask=torch.tensor([True, False], device=DEV))
    # seq 1 empty in real slot 3 (continuing), then the real one, then empty padding and 5 spare tokens
    cu = torch.tensor([0, 17, 17, T, T, T + 5], dtype=torch.int32, device=DEV)
    slots = torch.tensor([1, 3, 2, -1, -1], dtype=torch.int32, device=DEV)
    mask = torch.tensor([True, True, False, False, False], device=DEV)
    o = fn(q, k, v, g, cu, pool, slots, initial_state_mask=mask)
    assert_close(o[:T], o1, 1e-6, "o")
    for s in (1, 2):
        assert_close(pool[s], alone[s], 1e-6, f"state slot {s}")
    for s in (0, 3, 4, 5):
        assert torch.equal(pool[s], before[s]), f"slot {s} changed"
