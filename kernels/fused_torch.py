"""PyTorch forms of the fused layer ops (the CPU path, and the reference the Triton kernels are tested against).

Each mirrors, operation for operation, the unfused code in model/layers.py it replaces, so a fused
model on the CPU computes what the unfused one does. Math runs in float32 (float64 when an input is
float64, for test references) and results are stored in the activation dtype, like fla's fused modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.naive import compute_dtype


def _norm(s: torch.Tensor, weight: torch.Tensor | None, eps: float, gate: torch.Tensor | None) -> torch.Tensor:
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(s.dtype)
    if gate is not None:
        y = y * F.silu(gate.to(s.dtype))
    return y


def rms_norm_gate_torch(
    x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm over the last dim of x, times weight, times swish(gate) when given; in x.dtype."""
    dt = compute_dtype(x, gate, weight)
    return _norm(x.to(dt), weight, eps, gate).to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float, round_sum: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) in x.dtype, the sum in residual.dtype).

    round_sum=False: the sum is formed in fp32 and normalised unrounded (fla's fused prenorm, `mlp_norm`).
    round_sum=True: the sum is first rounded to residual.dtype, as a plain `residual + x` followed by
    a norm computes it (the block's post-MLP residual add feeding the next layer's `attn_norm`).
    """
    dt = compute_dtype(x, residual, weight)
    if round_sum:
        h = residual + x
        return _norm(h.to(dt), weight, eps, None).to(h.dtype), h
    s = x.to(dt) + residual.to(dt)
    return _norm(s, weight, eps, None).to(x.dtype), s.to(residual.dtype)


def swiglu_torch(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = gate | up -> swish(gate) * up computed in fp32, stored in x.dtype."""
    dt = compute_dtype(x)
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.to(dt)) * up.to(dt)).to(x.dtype)


def gla_prep_torch(
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
    """Flat projections [M, C] (strided slices of one fused GEMM are fine) -> kernel-ready tensors.

    Returns contiguous q, k, gk [M, H, K], v [M, H, V] and gate [M, H, V] (or None), kv heads
    repeated to H heads (query head h reads kv head h // G). The log-gate is the second low-rank
    projection of `lowrank` [M, R], then logsigmoid / normalizer (+ clamp_min), in the activation dtype.
    """
    M = q.shape[0]
    gk = F.logsigmoid(F.linear(lowrank, gk_weight, gk_bias)) / normalizer
    if clamp_min is not None:
        gk = gk.clamp_min(clamp_min)
    hkv = k.shape[-1] // head_k_dim
    q = q.reshape(M, num_heads, head_k_dim)
    k = k.reshape(M, hkv, head_k_dim)
    v = v.reshape(M, hkv, head_v_dim)
    gk = gk.view(M, hkv, head_k_dim)
    if num_heads != hkv:
        groups = num_heads // hkv
        k, v, gk = (t.repeat_interleave(groups, dim=1) for t in (k, v, gk))
    gate = gate.reshape(M, num_heads, head_v_dim).contiguous() if gate is not None else None
    return q.contiguous(), k.contiguous(), v.contiguous(), gk.contiguous(), gate


def gemv_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T in x.dtype: the plain `F.linear` (no bias) that `gemv` replaces."""
    return F.linear(x, weight)


def swiglu_gemv_torch(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h [..., 2I] = gate | up -> swiglu (rounded to h.dtype) @ weight [N, I]^T: the MLP's SwiGLU + down_proj."""
    return F.linear(swiglu_torch(h), weight)


def norm_gemv_torch(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float, round_sum: bool,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pre-norm then a projection: (`add_rms_norm` (or `rms_norm_gate` without a residual) of x,
    then @ weight [N, K]^T, the sum or None): what `norm_gemv` fuses into one kernel."""
    if residual is None:
        return F.linear(rms_norm_gate_torch(x, None, norm_weight, eps), weight), None
    y, s = add_rms_norm_torch(x, residual, norm_weight, eps, round_sum)
    return F.linear(y, weight), s
