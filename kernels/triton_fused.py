"""Triton kernels that fuse the small elementwise ops around a GLA layer's GEMMs.

At batch 1 a decode step is bound by kernel launches, not bytes: each op below replaces several
PyTorch kernels (RMSNorm alone was eight). All math is fp32, results are stored in the activation
dtype at the same points the unfused PyTorch code rounds (kernels/fused_torch.py is the reference).
  - _rms_norm_kernel: [residual add +] RMSNorm [x weight] [x swish(gate)], one program per row.
  - _swiglu_kernel: swish(gate) * up from the fused gate|up GEMM output.
  - _gla_prep_kernel: splits the fused q|k|v|g|lowrank GEMM output into contiguous per-head q, k, v,
    gate, repeats kv heads for GQA, and computes the log-gate (second low-rank projection + bias,
    logsigmoid / normalizer, clamp) in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import PDL, Launcher, aligned, cdiv, next_pow2, use_pdl


@triton.jit
def _rms_norm_kernel(x, r, z, w, y, s, eps, D: tl.constexpr, BD: tl.constexpr, HAS_RES: tl.constexpr,
                     ROUND_SUM: tl.constexpr, HAS_GATE: tl.constexpr, HAS_W: tl.constexpr,
                     USE_GDC: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if HAS_W:  # a weight: safe to read before the previous grid has finished (kernels/_launch.py PDL)
        b_w = tl.load(w + o_d, mask=m_d, other=0.).to(tl.float32)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    b_s = tl.load(x + row * D + o_d, mask=m_d, other=0.).to(tl.float32)
    if HAS_RES:
        b_s += tl.load(r + row * D + o_d, mask=m_d, other=0.).to(tl.float32)
        if ROUND_SUM:  # a plain `residual + x` in the activation dtype, then the norm of that
            b_s = b_s.to(s.dtype.element_ty).to(tl.float32)
        tl.store(s + row * D + o_d, b_s.to(s.dtype.element_ty), mask=m_d)
    b_y = b_s * tl.rsqrt(tl.sum(b_s * b_s, axis=0) / D + eps)
    if HAS_W:
        b_y = b_y * b_w
    if HAS_GATE:
        b_z = tl.load(z + row * D + o_d, mask=m_d, other=0.).to(tl.float32)
        b_y = b_y * (b_z * tl.sigmoid(b_z))
    tl.store(y + row * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


@triton.jit
def _swiglu_kernel(x, y, NI: tl.constexpr, BI: tl.constexpr, USE_GDC: tl.constexpr = False):
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    o_i = tl.program_id(1) * BI + tl.arange(0, BI)
    m_i = o_i < NI
    b_g = tl.load(x + row * 2 * NI + o_i, mask=m_i, other=0.).to(tl.float32)
    b_u = tl.load(x + row * 2 * NI + NI + o_i, mask=m_i, other=0.).to(tl.float32)
    tl.store(y + row * NI + o_i, (b_g * tl.sigmoid(b_g) * b_u).to(y.dtype.element_ty), mask=m_i)


@triton.jit
def log_gate(b_z, dtype: tl.constexpr, normalizer, clamp_min, HAS_CLAMP: tl.constexpr):
    """fp32 pre-activations z of the log-gate (the second low-rank projection + bias) -> the gate as
    the unfused model computes it: z rounded like the Linear's output, logsigmoid rounded, divided by
    the normalizer, clamped (callers round the result to `dtype` where they store it)."""
    b_z = b_z.to(dtype).to(tl.float32)
    # logsigmoid(z) = min(z, 0) - log1p(exp(-|z|)); a series for tiny e keeps log1p's accuracy
    e = tl.exp(-tl.abs(b_z))
    b_a = tl.minimum(b_z, 0.) - tl.where(e < 1e-4, e * (1. - 0.5 * e), tl.log(1. + e))
    b_a = b_a.to(dtype).to(tl.float32) / normalizer
    if HAS_CLAMP:
        b_a = tl.maximum(b_a, clamp_min)
    return b_a


@triton.jit(do_not_specialize=["sq", "sk", "sv", "sg", "sl"])
def _gla_prep_kernel(qs, ks, vs, gs, ls, w1, b1, q, k, v, gk, gate, sq, sk, sv, sg, sl, normalizer, clamp_min,
                     H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, R: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr, HAS_GATE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr):
    i_m = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_kv = i_h // G
    row = i_m * H + i_h
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    tl.store(q + row * K + o_k, tl.load(qs + i_m * sq + i_h * K + o_k, mask=m_k), mask=m_k)
    tl.store(k + row * K + o_k, tl.load(ks + i_m * sk + i_kv * K + o_k, mask=m_k), mask=m_k)
    tl.store(v + row * V + o_v, tl.load(vs + i_m * sv + i_kv * V + o_v, mask=m_v), mask=m_v)
    if HAS_GATE:
        tl.store(gate + row * V + o_v, tl.load(gs + i_m * sg + i_h * V + o_v, mask=m_v), mask=m_v)
    # log-gate: z = W1[kv head rows] @ lowrank + b1, rounded like the Linear's output
    o_r = tl.arange(0, BR)
    m_r = o_r < R
    b_l = tl.load(ls + i_m * sl + o_r, mask=m_r, other=0.).to(tl.float32)
    b_w = tl.load(w1 + (i_kv * K + o_k)[:, None] * R + o_r[None, :], mask=m_k[:, None] & m_r[None, :],
                  other=0.).to(tl.float32)
    b_z = tl.sum(b_w * b_l[None, :], axis=1)
    if HAS_BIAS:
        b_z += tl.load(b1 + i_kv * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_a = log_gate(b_z, gk.dtype.element_ty, normalizer, clamp_min, HAS_CLAMP)
    tl.store(gk + row * K + o_k, b_a.to(gk.dtype.element_ty), mask=m_k)


_norm = Launcher(_rms_norm_kernel)
_swiglu = Launcher(_swiglu_kernel)
_prep = Launcher(_gla_prep_kernel)


def _pdl(gdc: bool) -> dict[str, bool]:
    """The launch option of a kernel built with USE_GDC (Triton compiles launch_pdl into the kernel)."""
    return {"launch_pdl": True} if gdc else {}


def _warps(block: int) -> int:
    return min(8, max(1, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _rms_norm_launch(x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None,
                     weight: torch.Tensor | None, eps: float, round_sum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x = _rows(x)
    y = torch.empty_like(x)
    r = _rows(residual) if residual is not None else x
    s = torch.empty_like(r) if residual is not None else y
    z = _rows(gate) if gate is not None else x
    w = weight if weight is not None else x
    BD = next_pow2(D)
    rows = x.numel() // D
    gdc = use_pdl(x.device, PDL["fused"], rows)
    flags = (residual is not None, round_sum, gate is not None, weight is not None, gdc)
    key = (x.device.index, x.dtype, r.dtype, z.dtype, w.dtype, D, *flags) if aligned(x, r, z, w, y, s) else None
    if rows:
        _norm((rows,), key, (x, r, z, w, y, s, eps, D, BD, *flags), num_warps=_warps(BD), **_pdl(gdc))
    return y, s


def rms_norm_gate_triton(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    """Triton form of `kernels.fused_torch.rms_norm_gate_torch` (same arguments and returns)."""
    return _rms_norm_launch(x, None, gate, weight, eps, False)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                        round_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton form of `kernels.fused_torch.add_rms_norm_torch` (same arguments and returns)."""
    return _rms_norm_launch(x, residual, None, weight, eps, round_sum)


def swiglu_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton form of `kernels.fused_torch.swiglu_torch`: x [..., 2I] with contiguous rows."""
    NI = x.shape[-1] // 2
    x = _rows(x)
    y = torch.empty(*x.shape[:-1], NI, dtype=x.dtype, device=x.device)
    rows = x.numel() // (2 * NI)
    BI = min(1024, next_pow2(NI))
    gdc = use_pdl(x.device, PDL["fused"], rows)
    key = (x.device.index, x.dtype, NI, BI, gdc) if aligned(x, y) else None
    if rows:
        _swiglu((rows, cdiv(NI, BI)), key, (x, y, NI, BI, gdc), num_warps=4, **_pdl(gdc))
    return y


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """A [M, C] tensor whose rows may be strided (a slice of a wider GEMM output) but whose columns are not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def gla_prep_triton(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton form of `kernels.fused_torch.gla_prep_torch` (same arguments and returns), one launch."""
    q, k, v, lowrank = (_row_major(t) for t in (q, k, v, lowrank))
    gs = _row_major(gate) if gate is not None else q
    M, H, K, V = q.shape[0], num_heads, head_k_dim, head_v_dim
    G = H // (k.shape[-1] // K)
    R = lowrank.shape[-1]
    dev, dt = q.device, q.dtype
    qo = torch.empty(M, H, K, dtype=dt, device=dev)
    ko = torch.empty(M, H, K, dtype=k.dtype, device=dev)
    gko = torch.empty(M, H, K, dtype=lowrank.dtype, device=dev)
    vo = torch.empty(M, H, V, dtype=v.dtype, device=dev)
    go = torch.empty(M, H, V, dtype=gs.dtype, device=dev) if gate is not None else None
    w1 = gk_weight.contiguous()
    b1 = gk_bias if gk_bias is not None else w1
    BK, BV, BR = next_pow2(K), next_pow2(V), next_pow2(R)
    flags = (gate is not None, gk_bias is not None, clamp_min is not None)
    ptrs = (q, k, v, gs, lowrank, w1, b1, qo, ko, vo, gko, go if go is not None else qo)
    key = (dev.index, dt, k.dtype, v.dtype, gs.dtype, lowrank.dtype, w1.dtype, b1.dtype, H, G, K, V, R,
           *flags) if aligned(*ptrs) else None
    if M:
        _prep((M, H), key, (*ptrs, q.stride(0), k.stride(0), v.stride(0), gs.stride(0), lowrank.stride(0),
                            float(normalizer), float(clamp_min or 0.), H, G, K, V, R, BK, BV, BR, *flags),
              num_warps=_warps(max(BK, BV) * 2))
    return qo, ko, vo, gko, go
