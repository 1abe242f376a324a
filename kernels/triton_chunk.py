"""Triton chunked GLA prefill over packed variable-length sequences, states read/written in a pool.

S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t * scale; state V-first [S, H, V, K] float32.

Design (ours): chunks of BT=64 tokens start at each sequence's first token; sequences are further cut
into segments of SEG tokens (a multiple of BT) so that even one long sequence fills the GPU.
  1. _prep_kernel      (chunk, head): chunk-local cumsum of g (fp32, log2 units), the causal score
                       matrix A (off-diagonal 16-blocks factorised around a reference row, diagonal
                       16-blocks pairwise: every exponent is a difference <= 0), q*exp(G) and
                       k*exp(G_last - G) in the dot dtype, and the chunk decay G_last.
  2. _state_kernel     (V-tile, head, segment): each segment's own final state from a zero start.
  3. _scan_kernel      (tile, sequence*head): entering state of every segment, from the pool.
  4. _output_kernel    (V-tile, head, segment): walks its segment's chunks with the state in registers,
                       o = scale*(q*exp(G)) S^T + A v; writes the last segment's state to the pool.
Steps 2-3 run only when some sequence spans more than one segment (known from shapes alone: T > SEG).
No host syncs: the (sequence, chunk) and (sequence, segment) of a program come from cu_seqlens on the
device. Sequence n owns index range [cu[n] // D + n, cu[n+1] // D + n + 1) for D = BT or SEG, an upper
bound of its chunk/segment count, so the grids are sized from T and N; spare programs exit at once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._launch import Launcher, aligned, cdiv, next_pow2

BT = 64  # chunk length
BC = 16  # diagonal sub-block length
LOG2E = 1.4426950408889634

# Tunables, keyed by head_k_dim: V tile of the sequential kernels, warps, pipeline depth, and the
# number of programs per SM that the segment length is chosen for. Values: the best of a sweep on an
# H100 (benchmarks/results/kernels-h100.json, "chosen"); the benchmark may override them.
CONFIGS: dict[int, dict[str, int]] = {
    64: {"BV": 64, "num_warps": 4, "num_stages": 2, "waves": 2},
    128: {"BV": 64, "num_warps": 4, "num_stages": 2, "waves": 2},
    256: {"BV": 64, "num_warps": 4, "num_stages": 1, "waves": 2},
}
# The prep kernel's key-channel block and warps (one setting for every head dim: its tiles are
# [BT, BKC] whatever K is).
# SPLIT_MAX_PROGRAMS: `bench_kernels.py --sweep-split` on an H200 chose 68 (chunks x heads): at the
# 1.3B shape T=512 94 -> 50 us, T=1024 108 -> 81 us; at T=2048 the split was slower (131 -> 137 us).
PREP: dict[str, int] = {"BKC": 32, "num_warps": 4, "BKD": 0, "SPLIT_MAX_PROGRAMS": 68}
# fp32 inputs (exact IEEE dots, which Triton lowers to FMAs, not tensor cores) need smaller tiles per
# thread. Built for sm_90 (tests/kernels/test_sm90_build.py, Triton 3.9), the 16-bit settings spilled
# 1.6 KB per thread in the prep, 0.8 KB in the state kernel and 13 KB in the output kernel at K=256;
# these spill 0 / 0 / 0.5 KB. Chosen from the compiler's report alone: not yet timed on a GPU.
PREP_FP32: dict[str, int] = {"BKC": 16, "num_warps": 8}
FP32_TILES: dict[str, int] = {"BV": 16, "num_warps": 8, "num_stages": 1}
# Precision of the prep kernel's off-diagonal score dots for 16-bit inputs (their operands are fp32
# products q*exp(G - r), k*exp(r - G)); fp32 inputs always get "ieee".
A_PRECISION: dict[str, str] = {"half": "tf32"}
MIN_SEG = 128
MAX_SEG = 8192


@triton.jit
def _count_le(x_ptr, y, N, D):
    """#{n < N : x[n] // D + n <= y}: with D = BT or SEG, the owner (plus one) of index y."""
    cnt = tl.full([], 0, tl.int32)
    for base in range(0, N, 128):
        o_n = base + tl.arange(0, 128)
        b_x = tl.load(x_ptr + o_n, mask=o_n < N, other=0).to(tl.int64)
        cnt += tl.sum(((b_x // D + o_n <= y) & (o_n < N)).to(tl.int32), 0)
    return cnt


@triton.jit
def _owner(cu, idx, N, D):
    """Sequence n whose index range [cu[n] // D + n, cu[n+1] // D + n + 1) holds idx."""
    return _count_le(cu, idx, N, D) - 1


@triton.jit
def _seq_of_token(cu, p, N):
    """Sequence n with cu[n] <= p < cu[n+1]: the number of sequence ends cu[m+1] <= p."""
    cnt = tl.full([], 0, tl.int32)
    for base in range(0, N, 128):
        o_n = base + tl.arange(0, 128)
        b_x = tl.load(cu + 1 + o_n, mask=o_n < N, other=0).to(tl.int64)
        cnt += tl.sum(((b_x <= p) & (o_n < N)).to(tl.int32), 0)
    return cnt


@triton.jit(do_not_specialize=["N"])
def _prep_kernel(q, k, g, A, qg, kd, gl, cu, N, scale,
                 H: tl.constexpr, K: tl.constexpr, BKC: tl.constexpr, BT: tl.constexpr,
                 BC: tl.constexpr, BKD: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Per (chunk, head), walking the key channels in blocks of BKC so every tile is [BT, BKC].

    Everything here is per key channel except the sum over channels that forms A, so the channel
    blocks only meet in two accumulators: the off-diagonal scores b_A [BT, BT] and the diagonal
    16-block columns b_D [BT, BC]. (Holding whole [BT, K] fp32 tiles spilled registers: at K=256
    this kernel took 78% of the prefill.) BKD > 0 computes the diagonal blocks as one broadcast
    [BT/BC, BC, BC, BKD] product per BKD channels instead of BC dependent gathered-row steps.
    SPLIT gives each key block its own program (grid axis 2), which adds its part of A into a
    zeroed fp32 A with atomics: K/BKC times the programs, for short inputs with few chunks.
    """
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n = _owner(cu, i_c, N, BT)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    t0 = bos + (i_c - (bos // BT + i_n)) * BT
    if t0 >= eos:
        return
    o_i = tl.arange(0, BT)
    o_t = t0 + o_i
    m_t = o_t < eos
    o_c = tl.arange(0, BC)
    o_jb = (o_i // BC) * BC
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_D = tl.zeros([BT, BC], dtype=tl.float32)  # b_D[i, jj] = A[i, o_jb[i] + jj]
    if SPLIT:
        k_lo = tl.program_id(2) * BKC
        k_hi = k_lo + BKC
    else:
        k_lo = 0
        k_hi = K
    for kb in range(k_lo, k_hi, BKC):
        o_k = kb + tl.arange(0, BKC)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = ((o_t * H + i_h) * K)[:, None] + o_k[None, :]  # [BT, BKC]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.).to(tl.float32)
        b_k = tl.load(k + p_tk, mask=m_tk, other=0.).to(tl.float32)
        b_g = tl.load(g + p_tk, mask=m_tk, other=0.).to(tl.float32) * 1.4426950408889634
        b_gc = tl.cumsum(b_g, axis=0)  # rows past the end add 0, so row BT-1 is the chunk total
        b_gl = tl.sum(tl.where((o_i == BT - 1)[:, None], b_gc, 0.), axis=0)  # [BKC]
        tl.store(qg + p_tk, (b_q * tl.exp2(b_gc)).to(qg.dtype.element_ty), mask=m_tk)
        tl.store(kd + p_tk, (b_k * tl.exp2(b_gl[None, :] - b_gc)).to(kd.dtype.element_ty), mask=m_tk)
        tl.store(gl + (i_c * H + i_h).to(tl.int64) * K + o_k, b_gl, mask=m_k)

        # Off-diagonal blocks: rows of block a against all earlier columns, around r = G[a*BC]:
        # q factor exp2(G_i - r) <= 1 for i in a, k factor exp2(r - G_j) <= 1 for j before a.
        for a in tl.static_range(1, BT // BC):
            in_a = (o_i >= a * BC) & (o_i < (a + 1) * BC)
            before = o_i < a * BC
            b_r = tl.sum(tl.where((o_i == a * BC)[:, None], b_gc, 0.), axis=0)
            # scale goes into the q factor before the dot, as fla's kernel does: the same TF32
            # operands, so a 16-bit model's scores round the same way in both
            b_qa = tl.where(in_a[:, None], b_q * tl.exp2(tl.where(in_a[:, None], b_gc - b_r[None, :], 0.)) * scale,
                            0.)
            b_ka = tl.where(before[:, None], b_k * tl.exp2(tl.where(before[:, None], b_r[None, :] - b_gc, 0.)), 0.)
            b_A += tl.dot(b_qa, tl.trans(b_ka), input_precision=PREC)

        if BKD == 0:
            # Diagonal blocks, exactly: pairwise exp2(G_i - G_j) per key channel for j <= i in one
            # 16-row block. Step jj handles column jj of every block: row i pairs with j = o_jb[i] + jj.
            b_gw = tl.reshape(tl.cumsum(tl.reshape(b_g, [BT // BC, BC, BKC]), axis=1), [BT, BKC])
            b_gj = b_gc - b_gw  # G just before row i's block; grows into G_j below
            for jj in range(BC):
                t_j = t0 + o_jb + jj
                m_j = (t_j < eos)[:, None] & m_k[None, :]
                p_j = ((t_j * H + i_h) * K)[:, None] + o_k[None, :]
                b_kj = tl.load(k + p_j, mask=m_j, other=0.).to(tl.float32)
                b_gj += tl.load(g + p_j, mask=m_j, other=0.).to(tl.float32) * 1.4426950408889634
                # j > i within the block gives min(., 0) = 0: garbage that the causal store mask drops
                b_col = tl.sum(b_q * b_kj * tl.exp2(tl.minimum(b_gc - b_gj, 0.)), axis=1)  # [BT]
                b_D += tl.where(o_c[None, :] == jj, b_col[:, None], 0.)
    if BKD > 0:
        # Diagonal blocks as a broadcast: [blocks, i, j, channels] with the block-local cumsum,
        # pairwise exp2(min(G_i - G_j, 0)); j > i is garbage the causal store mask drops.
        for kb in range(k_lo, k_hi, BKD):
            o_k = kb + tl.arange(0, BKD)
            m_tk = m_t[:, None] & (o_k < K)[None, :]
            p_tk = ((o_t * H + i_h) * K)[:, None] + o_k[None, :]
            b_q4 = tl.reshape(tl.load(q + p_tk, mask=m_tk, other=0.).to(tl.float32), [BT // BC, BC, BKD])
            b_k4 = tl.reshape(tl.load(k + p_tk, mask=m_tk, other=0.).to(tl.float32), [BT // BC, BC, BKD])
            b_g4 = tl.reshape(tl.load(g + p_tk, mask=m_tk, other=0.).to(tl.float32) * 1.4426950408889634,
                              [BT // BC, BC, BKD])
            b_w4 = tl.cumsum(b_g4, axis=1)
            b_e = tl.exp2(tl.minimum(b_w4[:, :, None, :] - b_w4[:, None, :, :], 0.))  # [BT/BC, BC, BC, BKD]
            b_D += tl.reshape(tl.sum(b_q4[:, :, None, :] * b_k4[:, None, :, :] * b_e, axis=3), [BT, BC])
    o_j = tl.arange(0, BT)
    for jj in tl.static_range(BC):
        b_col = tl.sum(tl.where(o_c[None, :] == jj, b_D, 0.), axis=1)
        b_A += tl.where(o_j[None, :] == (o_jb + jj)[:, None], b_col[:, None] * scale, 0.)
    p_A = A + ((o_t * H + i_h) * BT)[:, None] + o_j[None, :]
    m_A = m_t[:, None] & (o_j[None, :] <= o_i[:, None])
    if SPLIT:
        tl.atomic_add(p_A, b_A, mask=m_A, sem="relaxed")
    else:
        tl.store(p_A, b_A.to(A.dtype.element_ty), mask=m_A)


@triton.jit(do_not_specialize=["N", "SEG"])
def _state_kernel(k, v, g, kd, gl, pool, slots, h0_mask, W, Wd, out, pos, cu, N, SEG,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, BT: tl.constexpr, IS_CKPT: tl.constexpr, HAS_MASK: tl.constexpr,
                  PREC: tl.constexpr):
    """Segment-local final states (IS_CKPT=False) or the state after checkpoint token pos[i]."""
    i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_vk = m_v[:, None] & m_k[None, :]
    o_vk = o_v[:, None] * K + o_k[None, :]  # [BV, BK] offsets inside one [V, K] state
    o_i = tl.arange(0, BT)
    if IS_CKPT:
        p = tl.load(pos + i_s).to(tl.int64)
        i_n = _seq_of_token(cu, p, N)
        bos = tl.load(cu + i_n).to(tl.int64)
        j = (p - bos) // SEG
        start = bos + j * SEG
        end = p + 1
        seg_slot = bos // SEG + i_n + j
        slot = tl.load(slots + i_n).to(tl.int64)
        zero_vk = 0 * o_vk  # scalar conditions are broadcast explicitly (the interpreter needs it)
        m_pool = m_vk & (zero_vk + j == 0)
        if HAS_MASK:
            m_pool = m_pool & (tl.load(h0_mask + i_n + zero_vk) != 0)
        b_h = tl.load(pool + (slot * H + i_h) * V * K + o_vk, mask=m_pool, other=0.)
        b_h += tl.load(W + (seg_slot * H + i_h) * V * K + o_vk, mask=m_vk & (zero_vk + j > 0), other=0.)
        p_out = out + (i_s.to(tl.int64) * H + i_h) * V * K + o_vk
    else:
        i_n = _owner(cu, i_s, N, SEG)
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        start = bos + (i_s - (bos // SEG + i_n)) * SEG
        if start + SEG >= eos:  # the sequence's last segment (or a spare program): nobody needs it
            return
        end = start + SEG
        b_h = tl.zeros([BV, BK], dtype=tl.float32)
        b_d = tl.zeros([BK], dtype=tl.float32)
        p_out = W + (i_s.to(tl.int64) * H + i_h) * V * K + o_vk
    c_slot0 = bos // BT + i_n + (start - bos) // BT  # chunk index of the segment's first chunk
    for c in range(0, tl.cdiv(end - start, BT)):
        o_t = start + c * BT + o_i
        m_t = o_t < end
        p_tk = ((o_t * H + i_h) * K)[:, None] + o_k[None, :]
        b_v = tl.load(v + ((o_t * H + i_h) * V)[:, None] + o_v[None, :],
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        if IS_CKPT:  # the last chunk may stop mid-way: rebuild its decays from raw k, g
            b_k = tl.load(k + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
            b_g = tl.load(g + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.).to(tl.float32)
            b_gc = tl.cumsum(b_g * 1.4426950408889634, axis=0)
            b_gl = tl.sum(tl.where((o_i == BT - 1)[:, None], b_gc, 0.), axis=0)
            b_kd = (b_k * tl.exp2(b_gl[None, :] - b_gc)).to(kd.dtype.element_ty)
        else:
            b_kd = tl.load(kd + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.)
            b_gl = tl.load(gl + ((c_slot0 + c) * H + i_h) * K + o_k, mask=m_k, other=0.)
            b_d += b_gl
        b_h = b_h * tl.exp2(b_gl)[None, :] + tl.dot(tl.trans(b_v.to(b_kd.dtype)), b_kd, input_precision=PREC)
    tl.store(p_out, b_h, mask=m_vk)
    if not IS_CKPT:
        if i_v == 0:
            tl.store(Wd + (i_s.to(tl.int64) * H + i_h) * K + o_k, b_d, mask=m_k)


@triton.jit(do_not_specialize=["SEG"])
def _scan_kernel(pool, slots, h0_mask, W, Wd, cu, SEG,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_MASK: tl.constexpr):
    """W[segment] <- state entering it: S_0 = pool (or 0), S_{j+1} = exp2(Wd_j) * S_j + W_j."""
    i_b, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    nseg = tl.cdiv(eos - bos, SEG)
    base = bos // SEG + i_n
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < V * K
    o_k = o % K
    slot = tl.load(slots + i_n).to(tl.int64)
    m_pool = m & (0 * o + slot >= 0)
    if HAS_MASK:
        m_pool = m_pool & (tl.load(h0_mask + i_n + 0 * o) != 0)
    b_h = tl.load(pool + (slot * H + i_h) * V * K + o, mask=m_pool, other=0.)
    for j in range(0, nseg):
        p_w = W + ((base + j) * H + i_h) * V * K + o
        m_loc = m & (0 * o + j < nseg - 1)
        b_loc = tl.load(p_w, mask=m_loc, other=0.)
        b_d = tl.load(Wd + ((base + j) * H + i_h) * K + o_k, mask=m_loc, other=0.)
        tl.store(p_w, b_h, mask=m)
        b_h = b_h * tl.exp2(b_d) + b_loc


@triton.jit(do_not_specialize=["N", "SEG"])
def _output_kernel(qg, kd, v, gl, A, o, pool, slots, h0_mask, W, cu, N, SEG, scale,
                   H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, BT: tl.constexpr, MULTI_SEG: tl.constexpr,
                   HAS_MASK: tl.constexpr, PREC: tl.constexpr):
    i_v, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = _owner(cu, i_s, N, SEG)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    start = bos + (i_s - (bos // SEG + i_n)) * SEG
    if start >= eos:
        return
    end = tl.minimum(start + SEG, eos)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_vk = m_v[:, None] & m_k[None, :]
    o_vk = o_v[:, None] * K + o_k[None, :]
    slot = tl.load(slots + i_n).to(tl.int64)
    p_pool = pool + (slot * H + i_h) * V * K + o_vk
    if MULTI_SEG:
        b_h = tl.load(W + (i_s.to(tl.int64) * H + i_h) * V * K + o_vk, mask=m_vk, other=0.)
    else:
        m_pool = m_vk & (0 * o_vk + slot >= 0)  # a negative slot is padding: no state in, none out
        if HAS_MASK:
            m_pool = m_pool & (tl.load(h0_mask + i_n + 0 * o_vk) != 0)
        b_h = tl.load(p_pool, mask=m_pool, other=0.)
    o_i = tl.arange(0, BT)
    c_slot0 = bos // BT + i_n + (start - bos) // BT
    for c in range(0, tl.cdiv(end - start, BT)):
        o_t = start + c * BT + o_i
        m_t = o_t < end
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_tk = ((o_t * H + i_h) * K)[:, None] + o_k[None, :]
        p_tv = ((o_t * H + i_h) * V)[:, None] + o_v[None, :]
        b_qg = tl.load(qg + p_tk, mask=m_tk, other=0.)
        b_kd = tl.load(kd + p_tk, mask=m_tk, other=0.)
        b_v = tl.load(v + p_tv, mask=m_tv, other=0.).to(b_kd.dtype)
        b_A = tl.load(A + ((o_t * H + i_h) * BT)[:, None] + o_i[None, :],
                      mask=m_t[:, None] & (o_i[None, :] <= o_i[:, None]), other=0.)
        b_gl = tl.load(gl + ((c_slot0 + c) * H + i_h) * K + o_k, mask=m_k, other=0.)
        b_o = tl.dot(b_qg, tl.trans(b_h.to(b_qg.dtype)), input_precision=PREC) * scale
        b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
        tl.store(o + p_tv, b_o.to(o.dtype.element_ty), mask=m_tv)
        b_h = b_h * tl.exp2(b_gl)[None, :] + tl.dot(tl.trans(b_v), b_kd, input_precision=PREC)
    if end == eos:
        tl.store(p_pool, b_h, mask=m_vk & (0 * o_vk + slot >= 0))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _segment_len(T: int, H: int, NV: int, waves: int, device: torch.device) -> int:
    """Power-of-two segment length giving about `waves` programs per SM for the sequential kernels."""
    n_sm = _num_sms(device.index or 0) if device.type == "cuda" else 132
    want = max(1, waves * n_sm // (H * NV))  # segments wanted in total
    seg = next_pow2(max(1, -(-T // want)))
    return min(max(seg, MIN_SEG), MAX_SEG)


def config(K: int, dtype: torch.dtype) -> dict[str, int]:
    """Tunables of the state and output kernels for head_k_dim K and the input dtype."""
    cfg = CONFIGS.get(K) or CONFIGS[256 if K > 128 else 64]
    if dtype == torch.float32:
        cfg = {**cfg, **FP32_TILES, "BV": min(cfg["BV"], FP32_TILES["BV"])}
    return cfg


def prep_config(dtype: torch.dtype) -> dict[str, int]:
    """The prep kernel's key block and warps for the input dtype (the rest of PREP applies to all)."""
    return {**PREP, **PREP_FP32} if dtype == torch.float32 else PREP


_prep = Launcher(_prep_kernel)
_state = Launcher(_state_kernel)
_scan = Launcher(_scan_kernel)
_output = Launcher(_output_kernel)


def chunk_gla_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_slots: torch.Tensor,
    scale: float | None = None,
    initial_state_mask: torch.Tensor | None = None,
    checkpoint_positions: torch.Tensor | None = None,
    seg_len: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton implementation of `kernels.chunk_gla_prefill` (same arguments and returns).

    `seg_len` (a multiple of 64) overrides the segment length heuristic, for tests and tuning.
    Inputs must be contiguous; dots run in the input dtype (fp32 inputs: exact fp32, not TF32).
    """
    T, H, K = q.shape
    V = v.shape[-1]
    N = state_slots.shape[0]
    if k.shape != q.shape or g.shape != q.shape or v.shape[:2] != (T, H):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)} k {tuple(k.shape)} g {tuple(g.shape)} "
                         f"v {tuple(v.shape)}")
    if state_pool.dtype != torch.float32 or state_pool.shape[1:] != (H, V, K):
        raise ValueError(f"state_pool must be float32 [S, {H}, {V}, {K}], got {state_pool.dtype} "
                         f"{tuple(state_pool.shape)}")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and g.is_contiguous()
            and state_pool.is_contiguous()):
        raise ValueError("q, k, v, g and state_pool must be contiguous")
    if scale is None:
        scale = K**-0.5
    dt = q.dtype
    cfg = config(K, dt)
    BK = max(16, next_pow2(K))
    BV = min(cfg["BV"], max(16, next_pow2(V)))
    NV = cdiv(V, BV)
    seg = seg_len or _segment_len(T, H, NV, cfg["waves"], q.device)
    multi = T > seg
    has_mask = initial_state_mask is not None
    h0_mask = initial_state_mask if has_mask else state_slots
    dev = q.device
    n_chunks = T // BT + N
    prep = prep_config(dt)
    bkc = min(prep["BKC"], BK)
    # few chunks: one program per key block too, summing A with fp32 atomics (short prompts, where
    # chunks x heads alone would leave most SMs idle)
    split = BK > bkc and n_chunks * H <= prep["SPLIT_MAX_PROGRAMS"]
    A = torch.zeros(T, H, BT, dtype=torch.float32, device=dev) if split else torch.empty(T, H, BT, dtype=dt,
                                                                                          device=dev)
    qg = torch.empty(T, H, K, dtype=dt, device=dev)
    kd = torch.empty(T, H, K, dtype=dt, device=dev)
    gl = torch.empty(n_chunks, H, K, dtype=torch.float32, device=dev)
    o = torch.empty(T, H, V, dtype=v.dtype, device=dev)
    ok = aligned(q, k, v, g, cu_seqlens, state_pool, state_slots, h0_mask)
    # everything but the sizes that are runtime arguments selects the compiled code
    key = (dev.index, dt, v.dtype, g.dtype, H, K, V, BV, multi, has_mask, cu_seqlens.dtype,
           state_slots.dtype, h0_mask.dtype, cfg["num_warps"], cfg["num_stages"]) if ok else None
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    bkd = prep["BKD"]
    # fp32 inputs get exact fp32 dots: someone serving in fp32 asked for fp32 accuracy (TF32 put the
    # logits of a prefill + decode hand-off 7e-4 from fla's fp32 model; IEEE dots: 1e-6)
    prec = "ieee" if dt == torch.float32 else "tf32"
    grid = (n_chunks, H, cdiv(K, bkc)) if split else (n_chunks, H)
    prec_a = prec if dt == torch.float32 else A_PRECISION["half"]
    _prep(grid, key + (bkc, bkd, prep["num_warps"], split, prec_a) if key else None,
          (q, k, g, A, qg, kd, gl, cu_seqlens, N, scale, H, K, bkc, BT, BC, bkd, prec_a, split),
          num_warps=prep["num_warps"])
    n_segs = T // seg + N
    W = Wd = state_pool
    if multi:
        W = torch.empty(n_segs, H, V, K, dtype=torch.float32, device=dev)
        Wd = torch.empty(n_segs, H, K, dtype=torch.float32, device=dev)
        _state((NV, H, n_segs), key, (k, v, g, kd, gl, state_pool, state_slots, h0_mask, W, Wd, W,
                                      cu_seqlens, cu_seqlens, N, seg, H, K, V, BK, BV, BT, False,
                                      has_mask, prec), **opts)
        block = 2048
        _scan((cdiv(V * K, block), N * H), key, (state_pool, state_slots, h0_mask, W, Wd, cu_seqlens,
                                                        seg, H, K, V, block, has_mask), num_warps=8)
    states = None
    if checkpoint_positions is not None:
        M = checkpoint_positions.shape[0]
        states = torch.empty(M, H, V, K, dtype=torch.float32, device=dev)
        if M > 0:  # rare (state-cache snapshots): the normal launch path is fine here
            _state_kernel[(NV, H, M)](k, v, g, kd, gl, state_pool, state_slots, h0_mask, W, Wd, states,
                                      checkpoint_positions, cu_seqlens, N, seg, H=H, K=K, V=V, BK=BK,
                                      BV=BV, BT=BT, IS_CKPT=True, HAS_MASK=has_mask, PREC=prec, **opts)
    # A's dtype (fp32 when split, else the input dtype) is part of the compiled _output code
    okey = key + (split,) if key else None
    _output((NV, H, n_segs), okey, (qg, kd, v, gl, A, o, state_pool, state_slots, h0_mask, W, cu_seqlens, N,
                                   seg, scale, H, K, V, BK, BV, BT, multi, has_mask, prec), **opts)
    return o if states is None else (o, states)
