"""Triton GEMV for decode-sized batches: y[M, N] = x[M, K] @ W[N, K]^T, M <= 16.

At batch 1 a decode step's four GEMMs per layer only have to stream their weights once, but cuBLAS
picks GEMM tiles (and split-K plus a separate reduce) that read them at about half of the H200's copy
bandwidth (benchmarks/results/profile-model-h200.json, "decode-step-B1"). Here each program owns
BLOCK_N whole weight rows and walks K in wide contiguous loads, so every byte of W is read exactly
once, in order, with 16-byte vectors; x is tiny and comes from L2.
  - M == 1 (the FMA path): products accumulate elementwise in a [BLOCK_N, BLOCK_K] fp32 tile and are
    reduced across K once at the end, so the loop body is loads and FMAs only.
  - M >= DOT_MIN_M (the dot path): x is padded to 16 rows and each step is one tl.dot, which keeps
    the 16x larger FMA count off the CUDA cores and lets Triton pipeline the weight loads.
  - Split-K: when N has too few row blocks to fill the GPU (o_proj, down_proj: N = 2048), K is cut
    into SPLIT ranges over a second grid axis; the fp32 partials [SPLIT, M, N] are summed by a tiny
    second kernel. No atomics and no zero-fill, so it is deterministic and every launch is
    CUDA-graph capturable (shapes alone pick the grid and the buffers).
  - The SwiGLU prologue (down_proj): the input is the fused gate|up output h [M, 2I]; x = silu(gate)
    * up is formed while loading and rounded to h's dtype, where the separate SwiGLU kernel rounds
    it, so the result matches swiglu + GEMM and that kernel disappears.
Math is fp32 (fp32 inputs: exact IEEE products, no TF32); the output is in x's dtype.
The PyTorch forms are kernels/fused_torch.py `gemv_torch` / `swiglu_gemv_torch`.

On an H200 (docs/kernels.md, "Small-batch GEMV") it roughly matches cuBLAS per kernel at M = 1 and
loses at 4-16 rows; with the norm prologue (`norm_gemv_triton`) and programmatic dependent launch the
batch-1 decode step beats the cuBLAS one (1.32 vs 1.37 ms), so the model uses it for 1-row steps.
`benchmarks/bench_gemv.py` times it against cuBLAS and sweeps the settings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import _INTERPRET, PDL, Launcher, aligned, cdiv, env_flag, next_pow2, use_pdl

MAX_ROWS = 16  # the dot path pads x to 16 rows; larger batches are GEMMs, not GEMVs

# Tile choices: guesses, not yet swept on a GPU (`benchmarks/bench_gemv.py` sweeps them and prints overrides).
#   BLOCK_N, BLOCK_K, num_warps, num_stages: the M == 1 FMA path (a [BLOCK_N, BLOCK_K] fp32 accumulator).
#   DOT_*: the same for M >= DOT_MIN_M (tl.dot needs DOT_BLOCK_N >= 16). DOT_MIN_M = 17 turns it off.
#   Split-K: SPLIT_K > 0 forces that many K ranges; 0 picks the fewest that give TARGET_PROGRAMS
#   programs (2 per SM of an H200's 132), at most MAX_SPLIT. REDUCE_BLOCK: elements per reduce program.
# PDL (env GLA_GEMV_PDL; on with kernels/_launch.py PDL["fused"]): programmatic dependent launch. A
#   GEMV's weights do not depend on the kernel before it, so each program loads its first weight tile,
#   lets the next kernel launch, and only then waits for the previous grid (griddepcontrol.wait)
#   before it reads x. Used for the rows PDL["max_rows"] allows (docs/kernels.md has the numbers).
GEMV: dict[str, int] = {
    "BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1,
    "DOT_MIN_M": 2, "DOT_BLOCK_N": 32, "DOT_BLOCK_K": 256, "DOT_num_warps": 4, "DOT_num_stages": 3,
    "SPLIT_K": 0, "TARGET_PROGRAMS": 264, "MAX_SPLIT": 8, "REDUCE_BLOCK": 1024,
    "PDL": env_flag("GLA_GEMV_PDL", bool(PDL["fused"])),
}


@triton.jit
def _load_sum(x, r, o_m, m_m, o_k, m_k, SX: tl.constexpr, NORM: tl.constexpr, EVEN_K: tl.constexpr):
    """The norm prologue's input rows o_m, columns o_k, fp32: x, or x + residual (NORM 2; rounded to the
    residual's dtype first with NORM 3, a plain `residual + x`). Both have rows of SX elements."""
    mask = m_m[:, None] if EVEN_K else m_m[:, None] & m_k[None, :]
    off = o_m.to(tl.int64)[:, None] * SX + o_k[None, :]
    b_s = tl.load(x + off, mask=mask, other=0., eviction_policy="evict_last").to(tl.float32)
    if NORM >= 2:
        b_s += tl.load(r + off, mask=mask, other=0., eviction_policy="evict_last").to(tl.float32)
        if NORM == 3:
            b_s = b_s.to(r.dtype.element_ty).to(tl.float32)
    return b_s


@triton.jit
def _row_rstd(x, r, o_m, m_m, eps, SX: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
              BM: tl.constexpr):
    """1 / RMS of each whole input row (all K columns, whatever the program's split range): [BM]."""
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK)
        b_s = _load_sum(x, r, o_m, m_m, o_k, o_k < K, SX, NORM, False)
        acc += b_s * b_s
    return tl.rsqrt(tl.sum(acc, axis=1) / K + eps)


@triton.jit
def _load_x(x, o_m, m_m, o_k, m_k, SX: tl.constexpr, K: tl.constexpr, SWIGLU: tl.constexpr,
            EVEN_K: tl.constexpr):
    """x rows o_m, columns o_k as fp32; with SWIGLU, silu(h[:, k]) * h[:, K + k] rounded to h's dtype."""
    p = x + o_m.to(tl.int64)[:, None] * SX + o_k[None, :]
    mask = m_m[:, None] if EVEN_K else m_m[:, None] & m_k[None, :]
    b_x = tl.load(p, mask=mask, other=0., eviction_policy="evict_last").to(tl.float32)
    if SWIGLU:
        b_u = tl.load(p + K, mask=mask, other=0., eviction_policy="evict_last").to(tl.float32)
        b_x = (b_x * tl.sigmoid(b_x) * b_u).to(x.dtype.element_ty).to(tl.float32)
    return b_x


@triton.jit
def _x_tile(x, r, nw, s, rstd, write_s, o_m, m_m, o_k, m_k, SX: tl.constexpr, K: tl.constexpr,
            SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr, HAS_NW: tl.constexpr):
    """The GEMV's input tile: `_load_x`, or with NORM the RMSNorm(x [+ residual]) * nw rounded to x's
    dtype (rstd [BM]: the rows' 1 / RMS) as the norm kernel stores it; write_s also stores the sum
    (the next residual, in the residual's dtype) into s."""
    if NORM:
        b_s = _load_sum(x, r, o_m, m_m, o_k, m_k, SX, NORM, EVEN_K)
        if NORM >= 2:
            if write_s:
                tl.store(s + o_m.to(tl.int64)[:, None] * SX + o_k[None, :], b_s.to(s.dtype.element_ty),
                         mask=m_m[:, None] & m_k[None, :])
        b_x = b_s * rstd[:, None]
        if HAS_NW:
            b_x = b_x * tl.load(nw + o_k, mask=m_k, other=0.).to(tl.float32)[None, :]
        return b_x.to(x.dtype.element_ty).to(tl.float32)
    else:
        return _load_x(x, o_m, m_m, o_k, m_k, SX, K, SWIGLU, EVEN_K)


@triton.jit
def _load_w(p_w, o_k, m_n, m_k, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_N and EVEN_K:
        b_w = tl.load(p_w + o_k[None, :], eviction_policy="evict_first")
    else:
        b_w = tl.load(p_w + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0., eviction_policy="evict_first")
    return b_w


@triton.jit(do_not_specialize=["M", "eps"])
def _gemv_kernel(x, w, y, part, r, nw, s, M, eps, SX: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                 KS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                 SWIGLU: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_K: tl.constexpr, USE_GDC: tl.constexpr, NORM: tl.constexpr, HAS_NW: tl.constexpr):
    """NORM (the norm prologue; 0 off): 1 RMSNorm(x), 2 RMSNorm(x + r) from the fp32 sum, 3 the sum
    rounded to r's dtype first; times nw with HAS_NW. With NORM >= 2 the programs of the first row
    block store the sum into s over their K range."""
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    p_w = w + o_n.to(tl.int64)[:, None] * K
    write_s = i_n == 0
    k0 = 0
    if DOT or BM > 1:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        if NORM:
            rstd = _row_rstd(x, r, o_m, m_m, eps, SX, K, BK, NORM, BM)
        else:
            rstd = tl.zeros([BM], dtype=tl.float32)
    else:  # M == 1: per-lane partial sums, reduced across K once after the loop
        if USE_GDC:
            # the first weight tile does not depend on the kernel before: load it, let the next
            # kernel launch, then wait for the previous grid's writes before reading x
            o_k = i_s * KS + tl.arange(0, BK)
            b_w = _load_w(p_w, o_k, m_n, o_k < K, EVEN_N, EVEN_K)
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
            if NORM:
                rstd = _row_rstd(x, r, o_m, m_m, eps, SX, K, BK, NORM, BM)
            else:
                rstd = tl.zeros([BM], dtype=tl.float32)
            acc1 = b_w.to(tl.float32) * _x_tile(x, r, nw, s, rstd, write_s, o_m, m_m, o_k, o_k < K, SX, K, SWIGLU,
                                                EVEN_K, NORM, HAS_NW)
            k0 = BK
        else:
            if NORM:
                rstd = _row_rstd(x, r, o_m, m_m, eps, SX, K, BK, NORM, BM)
            else:
                rstd = tl.zeros([BM], dtype=tl.float32)
            acc1 = tl.zeros([BN, BK], dtype=tl.float32)
    for kk in range(k0, KS, BK):
        o_k = i_s * KS + kk + tl.arange(0, BK)
        m_k = o_k < K
        b_w = _load_w(p_w, o_k, m_n, m_k, EVEN_N, EVEN_K)
        if DOT:
            b_x = _x_tile(x, r, nw, s, rstd, write_s, o_m, m_m, o_k, m_k, SX, K, SWIGLU, EVEN_K, NORM, HAS_NW)
            if IEEE:  # fp32 or mixed inputs (and the interpreter, whose half-precision dot is wrong)
                acc += tl.dot(b_x, tl.trans(b_w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(b_x.to(b_w.dtype), tl.trans(b_w))
        elif BM == 1:
            acc1 += b_w.to(tl.float32) * _x_tile(x, r, nw, s, rstd, write_s, o_m, m_m, o_k, m_k, SX, K, SWIGLU,
                                                 EVEN_K, NORM, HAS_NW)
        else:  # M rows against the same weight tile; each row's sum lands in its row of acc
            b_wf = b_w.to(tl.float32)
            for m in tl.static_range(BM):
                o_r = tl.arange(0, 1) + m
                rstd_m = tl.sum(tl.where(o_m == m, rstd, 0.), axis=0) + tl.zeros([1], dtype=tl.float32)
                b_xm = _x_tile(x, r, nw, s, rstd_m, write_s, o_r, o_r < M, o_k, m_k, SX, K, SWIGLU, EVEN_K, NORM,
                               HAS_NW)
                p = tl.sum(b_wf * b_xm, axis=1)
                acc = tl.where(o_m[:, None] == m, acc + p[None, :], acc)
    if not DOT and BM == 1:
        acc = tl.sum(acc1, axis=1)[None, :]
    mask = m_m[:, None] & m_n[None, :]
    if SPLIT == 1:
        tl.store(y + o_m[:, None] * N + o_n[None, :], acc.to(y.dtype.element_ty), mask=mask)
    else:
        tl.store(part + (i_s * M + o_m[:, None]) * N + o_n[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["MN"])
def _split_sum_kernel(part, y, MN, SPLIT: tl.constexpr, BR: tl.constexpr, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    o = tl.program_id(0) * BR + tl.arange(0, BR)
    m = o < MN
    acc = tl.zeros([BR], dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # a fixed order: the same sum every run
        acc += tl.load(part + s * MN + o, mask=m, other=0.)
    tl.store(y + o, acc.to(y.dtype.element_ty), mask=m)


_gemv = Launcher(_gemv_kernel)
_split_sum = Launcher(_split_sum_kernel)


def plan(M: int, N: int, K: int) -> dict[str, int]:
    """The launch settings for an [M, K] x [N, K]^T product under the current GEMV config."""
    c = GEMV
    dot = M >= c["DOT_MIN_M"]
    BN = max(16, c["DOT_BLOCK_N"]) if dot else c["BLOCK_N"]
    BK = c["DOT_BLOCK_K"] if dot else c["BLOCK_K"]
    BK = min(BK, max(16, next_pow2(K)))  # no K tile wider than K itself (small layers, tests)
    blocks, k_tiles = cdiv(N, BN), cdiv(K, BK)
    split = c["SPLIT_K"] or min(c["MAX_SPLIT"], max(1, c["TARGET_PROGRAMS"] // blocks))
    KS = cdiv(k_tiles, max(1, min(split, k_tiles))) * BK  # K range per split, whole tiles
    split = cdiv(K, KS)  # no empty ranges
    return {"dot": int(dot), "BM": 16 if dot else next_pow2(M), "BN": BN, "BK": BK, "SPLIT": split, "KS": KS,
            "num_warps": c["DOT_num_warps" if dot else "num_warps"],
            "num_stages": c["DOT_num_stages" if dot else "num_stages"]}


def _gemv_launch(x: torch.Tensor, weight: torch.Tensor, swiglu: bool,
                 norm: tuple[torch.Tensor | None, torch.Tensor | None, float, bool] | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """norm = (residual or None, norm weight or None, eps, round_sum): the RMSNorm prologue; then the
    result is (y, the sum x + residual in the residual's dtype, or None without a residual)."""
    N, K = weight.shape
    if x.shape[-1] != (2 * K if swiglu else K):
        raise ValueError(f"input {tuple(x.shape)} does not match weight {tuple(weight.shape)}"
                         f"{' (swiglu: input is gate|up, 2 * in_features)' if swiglu else ''}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"{M} rows: the GEMV takes at most {MAX_ROWS} (larger batches are GEMMs)")
    w = weight if weight.is_contiguous() else weight.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    res = s = nw = None
    mode, eps = 0, 0.0
    if norm is not None:
        res, nw, eps, round_sum = norm
        mode = 1 if res is None else 3 if round_sum else 2
        x2 = x2.contiguous()  # x, the residual and the sum share one row stride (SX = K)
        if res is not None:
            res = res.reshape(M, K).contiguous()
            s = torch.empty(M, K, dtype=res.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.view(*lead, N) if norm is None else (y.view(*lead, N), s.view(*lead, K) if s is not None else None)
    p = plan(M, N, K)
    part = torch.empty(p["SPLIT"], M, N, dtype=torch.float32, device=x.device) if p["SPLIT"] > 1 else y
    SX = x2.stride(0) if M > 1 else x2.shape[-1]
    ieee = _INTERPRET or x.dtype != w.dtype or x.dtype == torch.float32
    gdc = use_pdl(x.device, GEMV["PDL"], M)
    flags = (bool(swiglu), bool(p["dot"]), ieee, N % p["BN"] == 0, p["KS"] * p["SPLIT"] == K, gdc, mode,
             nw is not None)
    consts = (SX, N, K, p["KS"], p["BM"], p["BN"], p["BK"], p["SPLIT"], *flags)
    opts = {"num_warps": p["num_warps"], "num_stages": p["num_stages"]}
    pdl = {"launch_pdl": True} if gdc else {}
    r_, nw_, s_ = (res if res is not None else x2), (nw if nw is not None else x2), (s if s is not None else x2)
    key = ((x.device.index, x.dtype, w.dtype, r_.dtype, nw_.dtype, *consts, *opts.values())
           if aligned(x2, w, y, part, r_, nw_, s_) else None)
    _gemv((cdiv(N, p["BN"]), p["SPLIT"]), key, (x2, w, y, part, r_, nw_, s_, M, eps, *consts), **opts, **pdl)
    if p["SPLIT"] > 1:
        BR = GEMV["REDUCE_BLOCK"]
        rkey = (x.device.index, y.dtype, p["SPLIT"], BR, gdc) if aligned(part, y) else None
        _split_sum((cdiv(M * N, BR),), rkey, (part, y, M * N, p["SPLIT"], BR, gdc), num_warps=4, **pdl)
    if norm is not None:
        return y.view(*lead, N), (s.view(*lead, K) if s is not None else None)
    return y.view(*lead, N)


def norm_gemv_triton(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                     round_sum: bool, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton form of `kernels.fused_torch.norm_gemv_torch`: the RMSNorm (with the residual add before
    it) of `add_rms_norm` / `rms_norm_gate` as the GEMV's prologue, so the norm kernel disappears."""
    return _gemv_launch(x, weight, False, (residual, norm_weight, eps, round_sum))  # type: ignore[return-value]


def gemv_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton form of `kernels.fused_torch.gemv_torch`: x [..., K] (at most 16 rows) @ weight [N, K]^T."""
    return _gemv_launch(x, weight, False)


def swiglu_gemv_triton(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Triton form of `kernels.fused_torch.swiglu_gemv_torch`: h [..., 2I] = gate | up, weight [N, I]."""
    return _gemv_launch(h, weight, True)
