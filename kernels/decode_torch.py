"""One-token GLA decode against a state pool, in plain PyTorch (the CPU path of the decode kernel).

S = diag(exp(g)) S + k v^T, o = S^T q * scale, state V-first [S, H, V, K] updated in place by slot.
Also holds the per-head RMSNorm * swish(gate) output gate (spec section 2 step 10) both paths share.
"""

from __future__ import annotations

import torch

from kernels.naive import compute_dtype


def rms_norm_swish_gate(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm over the last dim (V) of o, times weight, times gate * sigmoid(gate).

    Computed in float32 (float64 for float64 inputs) and returned in o.dtype, like fla's fused module.
    """
    dt = compute_dtype(o, gate, weight)
    x = o.to(dt)
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dt)
    gf = gate.to(dt)
    return (y * gf * torch.sigmoid(gf)).to(o.dtype)


def fused_recurrent_gla_decode_torch(
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
    """q,k,g [B, H, K]; v [B, H, V]; state_pool [S, H, V, K]; state_slots int [B] -> o [B, H, V].

    With gate [B, H, V] the output is rms_norm_swish_gate(o, gate, norm_weight, norm_eps).
    """
    K = q.shape[-1]
    if scale is None:
        scale = K**-0.5
    slots = state_slots.to(device=state_pool.device, dtype=torch.long)
    dt = compute_dtype(q, k, v, g, state_pool)
    state = state_pool[slots].to(dt)  # [B, H, V, K]
    state = state * g.to(dt).exp().unsqueeze(-2) + v.to(dt).unsqueeze(-1) * k.to(dt).unsqueeze(-2)
    o = (state @ (q.to(dt) * scale).unsqueeze(-1)).squeeze(-1)  # [B, H, V]
    state_pool[slots] = state.to(state_pool.dtype)
    o = o.to(v.dtype)
    if gate is not None:
        o = rms_norm_swish_gate(o, gate, norm_weight, norm_eps)
    return o
