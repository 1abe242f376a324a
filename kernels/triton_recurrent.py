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

from kernels._launch import Launcher, aligned, cdiv, next_pow2

# State elements per program (4K fp32 = 16 KB read and written) and warps; the benchmark sweeps them.
# H200 sweep (benchmarks/results/kernels-h200-run1.json): 4096 elements on 2 warps was best at B=1, 64, 256.
DECODE: dict[str, int] = {"TILE_ELEMS": 4096, "num_warps": 2}
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


@triton.jit
def _decode_kernel(q, k, v, g, pool, slots, o, o_raw, gate, weight, counter, scale, eps,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, NV: tl.constexpr, BVF: tl.constexpr, HAS_GATE: tl.constexpr,
                   HAS_WEIGHT: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    slot = tl.load(slots + i_b).to(tl.int64)
    p_h = pool + (slot * H + i_h) * V * K + o_v[:, None] * K + o_k[None, :]
    m_h = m_v[:, None] & m_k[None, :]
    b_h = tl.load(p_h, mask=m_h, other=0., eviction_policy="evict_first")
    row = i_bh.to(tl.int64)
    b_q = tl.load(q + row * K + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_k = tl.load(k + row * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_g = tl.load(g + row * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + row * V + o_v, mask=m_v, other=0.).to(tl.float32)
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
            b_z = tl.load(gate + row * V + o_f, mask=m_f, other=0.).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
            tl.store(o + row * V + o_f, b_y.to(o.dtype.element_ty), mask=m_f)


_decode = Launcher(_decode_kernel)


def _counters(device: torch.device, nv: int, rows: int) -> torch.Tensor:
    """Per-(device, NV) ticket counters; allocate on an eager warm-up call, before graph capture."""
    buf = _COUNTERS.get((device, nv))
    if buf is None or buf.numel() < rows:
        buf = torch.zeros(max(rows, 4096), dtype=torch.int32, device=device)
        _COUNTERS[(device, nv)] = buf
    return buf


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
    if scale is None:
        scale = K**-0.5
    BK = next_pow2(K)
    BV = min(next_pow2(V), max(16, DECODE["TILE_ELEMS"] // BK))
    nw = DECODE["num_warps"]
    NV = next_pow2(cdiv(V, BV))
    o = torch.empty(B, H, V, dtype=v.dtype, device=v.device)
    if gate is None:
        key = (v.device.index, q.dtype, v.dtype, g.dtype, state_slots.dtype, H, K, V, BV, nw)
        if not aligned(q, k, v, g, state_pool, state_slots):
            key = None
        _decode((NV, B * H), key, (q, k, v, g, state_pool, state_slots, o, o, o, o, o, scale, norm_eps,
                                   H, K, V, BK, BV, NV, 16, False, False), num_warps=nw)
        return o
    o_raw = torch.empty(B, H, V, dtype=torch.float32, device=v.device)
    counter = _counters(v.device, NV, B * H)
    weight = o if norm_weight is None else norm_weight
    key = (v.device.index, q.dtype, v.dtype, g.dtype, state_slots.dtype, gate.dtype, weight.dtype, H, K, V, BV,
           norm_weight is None, nw)
    if not aligned(q, k, v, g, state_pool, state_slots, gate, weight):
        key = None
    _decode((NV, B * H), key, (q, k, v, g, state_pool, state_slots, o, o_raw, gate, weight, counter, scale,
                               norm_eps, H, K, V, BK, BV, NV, next_pow2(V), True,
                               norm_weight is not None), num_warps=nw)
    return o
