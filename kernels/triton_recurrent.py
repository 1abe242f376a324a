"""Triton fused recurrent GLA decode: one token per sequence, state updated in place in the pool.

S = diag(exp(g)) S + k v^T, o = S^T q * scale; state V-first [S, H, V, K] float32, rows by int32 slot.
One program per (V-tile, sequence*head) reads its [BV, K] state tile once, decays it, adds the outer
product, writes it back and reads out o: the step is one pass over the state, so it is memory-bound.
With `gate`, the per-head RMSNorm(o) * weight * swish(gate) (spec section 2 step 10) is fused too: every
V-tile program stores its raw o tile and bumps a per-(sequence, head) counter; the program that
completes the row (counter % NV == NV - 1) normalises it. The counters are never reset: each call adds
exactly NV (a power of two) per row, so they stay multiples of NV, also across int32 wrap-around.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import PDL, Launcher, aligned, cdiv, next_pow2, use_pdl
from kernels.triton_fused import log_gate

# State elements per program (4K fp32 = 16 KB read and written) and warps; the benchmark sweeps them.
# H200 sweep (benchmarks/results/kernels-h200-run1.json): 4096 elements on 2 warps was best at B=1, 64, 256.
DECODE: dict[str, int] = {"TILE_ELEMS": 4096, "num_warps": 2}
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


@triton.jit(do_not_specialize=["sq", "sk", "sv", "sz", "sl"])
def _decode_kernel(q, k, v, g, pool, slots, o, o_raw, gate, weight, counter, lowrank, w1, b1,
                   sq, sk, sv, sz, sl, scale, eps, normalizer, clamp_min,
                   H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, R: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, BVF: tl.constexpr,
                   BR: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, PREP: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr, USE_GDC: tl.constexpr = False):
    """q, k, v, gate rows at batch strides sq, sk, sv, sz (head h reads kv head h // G). With PREP
    they are column slices of the fused input projection and the log-gate is computed here from its
    low-rank part (lowrank rows at stride sl, w1 [H/G * K, R], b1) as `gla_prep` would; else g is
    the log-gate [B, H, K]. USE_GDC: launched with PDL (kernels/_launch.py); everything but the weights
    (w1, b1) is read after the wait, the state included (a graph may run prefill kernels first)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_kv = i_h // G
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    if PREP:  # the gate's low-rank weights first: they are not written by any kernel
        o_r = tl.arange(0, BR)
        m_r = o_r < R
        b_w = tl.load(w1 + (i_kv * K + o_k)[:, None] * R + o_r[None, :], mask=m_k[:, None] & m_r[None, :],
                      other=0.).to(tl.float32)
        if HAS_BIAS:
            b_b1 = tl.load(b1 + i_kv * K + o_k, mask=m_k, other=0.).to(tl.float32)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    slot = tl.load(slots + i_b).to(tl.int64)
    p_h = pool + (slot * H + i_h) * V * K + o_v[:, None] * K + o_k[None, :]
    m_h = m_v[:, None] & m_k[None, :]
    b_h = tl.load(p_h, mask=m_h, other=0., eviction_policy="evict_first")
    row = i_bh.to(tl.int64)
    b_q = tl.load(q + i_b * sq + i_h * K + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_k = tl.load(k + i_b * sk + i_kv * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + i_b * sv + i_kv * V + o_v, mask=m_v, other=0.).to(tl.float32)
    if PREP:
        b_l = tl.load(lowrank + i_b * sl + o_r, mask=m_r, other=0.).to(tl.float32)
        b_pre = tl.sum(b_w * b_l[None, :], axis=1)
        if HAS_BIAS:
            b_pre += b_b1
        b_g = log_gate(b_pre, lowrank.dtype.element_ty, normalizer, clamp_min, HAS_CLAMP)
        b_g = b_g.to(lowrank.dtype.element_ty).to(tl.float32)
    else:
        b_g = tl.load(g + row * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_h = b_h * tl.exp(b_g)[None, :] + b_v[:, None] * b_k[None, :]
    tl.store(p_h, b_h, mask=m_h, eviction_policy="evict_first")
    b_o = tl.sum(b_h * b_q[None, :], axis=1)  # [BV]
    if not HAS_GATE:
        tl.store(o + row * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    else:
        # the o of a bf16 model is rounded before the norm, as the unfused path does
        b_o = b_o.to(o.dtype.element_ty).to(tl.float32)
        tl.store(o_raw + row * V + o_v, b_o, mask=m_v)
        tl.debug_barrier()  # every thread's o_raw store happens before the release below
        ticket = tl.atomic_add(counter + i_bh, 1, sem="acq_rel")
        if (ticket & (NV - 1)) == NV - 1:
            tl.debug_barrier()
            o_f = tl.arange(0, BVF)
            m_f = o_f < V
            b_x = tl.load(o_raw + row * V + o_f, mask=m_f, other=0., cache_modifier=".cg")
            b_y = b_x * tl.rsqrt(tl.sum(b_x * b_x, axis=0) / V + eps)
            if HAS_WEIGHT:
                b_y *= tl.load(weight + o_f, mask=m_f, other=0.).to(tl.float32)
            b_gt = tl.load(gate + i_b * sz + i_h * V + o_f, mask=m_f, other=0.).to(tl.float32)
            b_y = b_y * b_gt * tl.sigmoid(b_gt)
            tl.store(o + row * V + o_f, b_y.to(o.dtype.element_ty), mask=m_f)


_decode = Launcher(_decode_kernel)


def _counters(device: torch.device, nv: int, rows: int) -> torch.Tensor:
    """Per-(device, NV) ticket counters; allocate on an eager warm-up call, before graph capture."""
    buf = _COUNTERS.get((device, nv))
    if buf is None or buf.numel() < rows:
        buf = torch.zeros(max(rows, 4096), dtype=torch.int32, device=device)
        _COUNTERS[(device, nv)] = buf
    return buf


def _launch_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, strides: tuple[int, ...],
                   prep: tuple | None, B: int, H: int, G: int, K: int, V: int, state_pool: torch.Tensor,
                   state_slots: torch.Tensor, scale: float | None, gate: torch.Tensor | None,
                   norm_weight: torch.Tensor | None, norm_eps: float) -> torch.Tensor:
    """One launch of `_decode_kernel`; `prep` = (lowrank, w1, b1 or None, normalizer, clamp_min or None)
    computes the log-gate in the kernel (then g is unused)."""
    if scale is None:
        scale = K**-0.5
    BK = next_pow2(K)
    BV = min(next_pow2(V), max(16, DECODE["TILE_ELEMS"] // BK))
    nw = DECODE["num_warps"]
    NV = next_pow2(cdiv(V, BV))
    o = torch.empty(B, H, V, dtype=v.dtype, device=v.device)
    has_gate = gate is not None
    o_raw = torch.empty(B, H, V, dtype=torch.float32, device=v.device) if has_gate else o
    counter = _counters(v.device, NV, B * H) if has_gate else o
    weight = norm_weight if norm_weight is not None else o
    z = gate if has_gate else o
    if prep is not None:
        lowrank, w1, b1, normalizer, clamp_min = prep
        R = w1.shape[-1]
        flags = (True, b1 is not None, clamp_min is not None)
        b1 = b1 if b1 is not None else w1
        sl = lowrank.stride(0)
    else:
        lowrank = w1 = b1 = g
        R, sl, normalizer, clamp_min, flags = 1, 0, 1.0, None, (False, False, False)
    ptrs = (q, k, v, g, state_pool, state_slots, o, o_raw, z, weight, counter, lowrank, w1, b1)
    gdc = use_pdl(v.device, PDL["fused"], B)
    key = (v.device.index, *(t.dtype for t in ptrs), H, G, K, V, R, BV, nw, has_gate, norm_weight is not None,
           *flags, gdc) if aligned(*ptrs) else None
    _decode((NV, B * H), key, (*ptrs, *strides, sl, scale, norm_eps, float(normalizer), float(clamp_min or 0.),
                               H, G, K, V, R, BK, BV, NV, next_pow2(V), next_pow2(R), has_gate,
                               norm_weight is not None, *flags, gdc), num_warps=nw,
            **({"launch_pdl": True} if gdc else {}))
    return o


def fused_recurrent_gla_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """The Triton implementation of `kernels.fused_recurrent_gla_decode` (same arguments and returns).

    Kept to a few attribute reads and one launch: the engine calls it once per layer per step.
    Inputs must be contiguous and state_pool float32 [S, H, V, K]; these are not re-checked here.
    """
    B, H, K = q.shape
    V = v.shape[-1]
    strides = (H * K, H * K, H * V, H * V)
    return _launch_decode(q, k, v, g, strides, None, B, H, 1, K, V, state_pool, state_slots, scale, gate,
                          norm_weight, norm_eps)


def gla_decode_proj_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    lowrank: torch.Tensor,
    gk_weight: torch.Tensor,
    gk_bias: torch.Tensor | None,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    normalizer: float,
    clamp_min: float | None,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """The Triton implementation of `kernels.gla_decode_proj`: `gla_prep` and the decode step in one
    launch, reading q, k, v, gate and the low-rank gate input straight from the fused projection.

    q [B, H*K], k [B, Hkv*K], v [B, Hkv*V], gate [B, H*V] (or None), lowrank [B, R]: row-major with
    unit column stride (column slices of one GEMM output are fine).
    """
    B = q.shape[0]
    H, K, V = num_heads, head_k_dim, head_v_dim
    G = H // (k.shape[-1] // K)
    for t in (q, k, v, lowrank) + ((gate,) if gate is not None else ()):
        if t.stride(-1) != 1:
            raise ValueError("gla_decode_proj needs unit column strides")
    strides = (q.stride(0), k.stride(0), v.stride(0), gate.stride(0) if gate is not None else 0)
    w1 = gk_weight if gk_weight.is_contiguous() else gk_weight.contiguous()
    return _launch_decode(q, k, v, q, strides, (lowrank, w1, gk_bias, normalizer, clamp_min), B, H, G, K, V,
                          state_pool, state_slots, scale, gate, norm_weight, norm_eps)


# Short prefill: the recurrence token by token, state in registers, for packed sequences of a few
# tokens (a resumed turn's new tokens). The chunked kernels' fixed per-program latency (a chunk's
# prep is ~10-80 us whatever its length; small-steps-h200 run) dominates there.


# SHORT: the short kernel's V tile (state elements per program) and warps. Each token waits on the last
# one's state update and readout (a cross-thread sum over K), so smaller tiles (more programs, fewer
# elements per thread) cut the time per token; loading the inputs 2-3 tokens ahead instead of 1 did
# not help. `bench_resume_prefill.py` on an H200, 17 / 64 tokens at the 1.3B shape: 4096 elements, 2
# warps (the decode kernel's tile, used before) 16.9 / 56.2 us; 1024, 2 warps 10.7 / 32.8 us; 2048,
# 1 warp 10.8 / 32.8; 256, 1 warp 18.6 / 63.8 (resume-prefill-sweep-h200-run9.json).
SHORT: dict[str, int] = {"TILE_ELEMS": 1024, "num_warps": 2}


@triton.jit
def _short_token(q, k, v, g, t, eos, H: tl.constexpr, i_h, o_k, m_k, o_v, m_v, K: tl.constexpr,
                 V: tl.constexpr):
    """Token t's q, k, g [BK] and v [BV] in fp32 (zeros past the sequence's end)."""
    mk = m_k & (o_k * 0 + t < eos)
    mv = m_v & (o_v * 0 + t < eos)
    b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=mk, other=0.).to(tl.float32)
    b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=mk, other=0.).to(tl.float32)
    b_g = tl.load(g + (t * H + i_h) * K + o_k, mask=mk, other=0.).to(tl.float32)
    b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=mv, other=0.).to(tl.float32)
    return b_q, b_k, b_g, b_v


@triton.jit(do_not_specialize=["scale"])
def _short_prefill_kernel(q, k, v, g, pool, slots, h0_mask, cu, o, scale, H: tl.constexpr, K: tl.constexpr,
                          V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr):
    """Program (V-tile, sequence*head): S from the pool (or zeros), then per token t of the sequence
    S = diag(exp(g_t)) S + k_t v_t^T, o_t = S^T q_t * scale; S back to the pool. A negative slot is
    padding: its o rows are zeroed and nothing else is read or written. Token t+1's inputs are loaded
    while token t is computed: they do not depend on the state."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    slot = tl.load(slots + i_n).to(tl.int64)
    if slot < 0:
        for t in range(bos, eos):
            tl.store(o + (t * H + i_h) * V + o_v, tl.zeros([BV], dtype=tl.float32).to(o.dtype.element_ty), mask=m_v)
        return
    m_h = m_v[:, None] & m_k[None, :]
    p_h = pool + (slot * H + i_h) * V * K + o_v[:, None] * K + o_k[None, :]
    m_pool = m_h
    if HAS_MASK:  # scalar conditions are broadcast explicitly (the interpreter needs it)
        m_pool = m_h & (tl.load(h0_mask + i_n + 0 * (o_v[:, None] + o_k[None, :])) != 0)
    b_q, b_k, b_g, b_v = _short_token(q, k, v, g, bos, eos, H, i_h, o_k, m_k, o_v, m_v, K, V)
    b_h = tl.load(p_h, mask=m_pool, other=0.)
    for t in range(bos, eos):
        n_q, n_k, n_g, n_v = _short_token(q, k, v, g, t + 1, eos, H, i_h, o_k, m_k, o_v, m_v, K, V)
        b_h = b_h * tl.exp(b_g)[None, :] + b_v[:, None] * b_k[None, :]
        b_o = tl.sum(b_h * (b_q * scale)[None, :], axis=1)
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        b_q, b_k, b_g, b_v = n_q, n_k, n_g, n_v
    tl.store(p_h, b_h, mask=m_h)


_short = Launcher(_short_prefill_kernel)


def short_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    initial_state_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`kernels.chunk_gla_prefill` (no checkpoints) as a token-by-token recurrence: one launch, any
    lengths, fastest when every sequence is short. Inputs contiguous, state_pool float32 [S, H, V, K]."""
    T, H, K = q.shape
    V = v.shape[-1]
    N = state_slots.shape[0]
    if scale is None:
        scale = K**-0.5
    BK = next_pow2(K)
    BV = min(next_pow2(V), max(1, SHORT["TILE_ELEMS"] // BK))
    nw = SHORT["num_warps"]
    has_mask = initial_state_mask is not None
    h0 = initial_state_mask if has_mask else state_slots
    o = torch.empty(T, H, V, dtype=v.dtype, device=v.device)
    ptrs = (q, k, v, g, state_pool, state_slots, h0, cu_seqlens, o)
    key = (v.device.index, *(t.dtype for t in ptrs), H, K, V, BV, has_mask, nw) if aligned(*ptrs) else None
    if N:
        _short((cdiv(V, BV), N * H), key, (*ptrs, scale, H, K, V, BK, BV, has_mask), num_warps=nw)
    return o
