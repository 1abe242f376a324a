"""The spec: a plain-PyTorch, token-by-token GLA recurrence that every kernel is tested against.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = S_t^T (q_t * scale)

(K-first terms.) The state is stored V-first: ``state[b, h, j, i] = S[i, j]``, shape [B, H, V, K].
Computes in float64 when any input is float64 (the test reference), else in float32.
"""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32: the reference must not round."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def padded_batch_setup(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
) -> tuple[float, torch.Tensor]:
    """Validate [B, T, H, *] inputs; return (scale, initial state [B, H, V, K] in the compute dtype)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or g.shape != q.shape or v.shape[:3] != (B, T, H):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)} k {tuple(k.shape)} g {tuple(g.shape)} "
                         f"v {tuple(v.shape)}")
    dt = compute_dtype(q, k, v, g, initial_state)
    if initial_state is None:
        return (K**-0.5 if scale is None else scale), q.new_zeros(B, H, V, K, dtype=dt)
    if initial_state.shape != (B, H, V, K):
        raise ValueError(f"initial_state must be {(B, H, V, K)}, got {tuple(initial_state.shape)}")
    return (K**-0.5 if scale is None else scale), initial_state.to(dt)


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the GLA recurrence one token at a time.

    Args:
        q, k, g: [B, T, H, K]; g holds log-gates (<= 0, natural log).
        v: [B, T, H, V].
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: [B, H, V, K] or None (zeros).
        output_final_state: also return the state after the last token.

    Returns:
        (o [B, T, H, V] in v.dtype, final_state [B, H, V, K] in float32/float64 or None).

    Example:
        >>> q = k = g = torch.zeros(1, 3, 2, 4); v = torch.ones(1, 3, 2, 5)
        >>> o, s = naive_recurrent_gla(q, k, v, g, output_final_state=True)
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale, state = padded_batch_setup(q, k, v, g, scale, initial_state)
    out_dtype = v.dtype
    q, k, v, g = (x.to(state.dtype) for x in (q, k, v, g))
    outs = []
    for t in range(T):
        # [B, H, V, K]: decay each key column, then add the outer product v_t k_t^T.
        state = state * g[:, t].exp().unsqueeze(-2) + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhvk,bhk->bhv", state, q[:, t] * scale))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (state if output_final_state else None)
