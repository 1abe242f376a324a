"""Chunked GLA in plain PyTorch: the CPU prefill path and a differentiable form for training.

Same recurrence as kernels/naive.py, S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t * scale,
state V-first [.., H, V, K]. Tokens are cut into chunks of BT=64 starting at each sequence's own first
token; the gate cumsum is taken within a chunk (float32, or float64 for float64 inputs) and every exp()
is of a difference <= 0, so any length is stable. No in-place ops on tensors that may need grad.
"""

from __future__ import annotations

import torch

from kernels.naive import compute_dtype, padded_batch_setup

BT = 64  # chunk length
BC = 16  # sub-chunk length of the exact (pairwise) diagonal blocks


def _exp_causal(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(diff) where mask, 0 elsewhere, without ever evaluating exp of a masked (positive) value."""
    return torch.where(mask, diff, torch.full_like(diff, float("-inf"))).exp()


def _intra_chunk_scores(qc: torch.Tensor, kc: torch.Tensor, gc: torch.Tensor) -> torch.Tensor:
    """A[i, j] = sum_c q_ic k_jc exp(G_ic - G_jc) for j <= i, else 0.

    qc, kc, gc: [..., BT, K] (gc = inclusive chunk-local cumsum). Returns [..., BT, BT].
    Diagonal BCxBC blocks use pairwise differences; an off-diagonal block row a is factorised around
    the reference r = G at a's first row: q factor exp(G_i - r) <= 1 and k factor exp(r - G_j) <= 1.
    """
    nc = BT // BC
    lead = qc.shape[:-2]
    K = qc.shape[-1]
    qs, ks, gs = (x.reshape(*lead, nc, BC, K) for x in (qc, kc, gc))
    tri = torch.ones(BC, BC, dtype=torch.bool, device=qc.device).tril()
    # [..., nc, BC(i), BC(j), K]
    decay = _exp_causal(gs.unsqueeze(-2) - gs.unsqueeze(-3), tri.unsqueeze(-1))
    diag = torch.einsum("...ik,...jk,...ijk->...ij", qs, ks, decay)  # [..., nc, BC, BC]
    rows = []
    for a in range(nc):
        parts = []
        if a > 0:
            ref = gs[..., a, :1, :]  # [..., 1, K]
            q_a = qs[..., a, :, :] * (gs[..., a, :, :] - ref).exp()
            k_pre = kc[..., : a * BC, :] * (ref - gc[..., : a * BC, :]).exp()
            parts.append(q_a @ k_pre.transpose(-1, -2))
        parts.append(diag[..., a, :, :])
        if a < nc - 1:
            parts.append(qc.new_zeros(*lead, BC, (nc - 1 - a) * BC))
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


def _chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Core on padded input. q,k,g [B, NT*BT, H, K], v [B, NT*BT, H, V], h0 [B, H, V, K], all in the
    compute dtype; padding rows must have k=v=g=0 so they leave the state unchanged.

    Returns (o [B, T, H, V], chunk_states [B, H, NT, V, K] = state entering each chunk, final [B, H, V, K],
    gc [B, H, NT, BT, K]).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    nt = T // BT
    # [B, T, H, D] -> [B, H, NT, BT, D]
    qc, kc, gch = (x.reshape(B, nt, BT, H, K).permute(0, 3, 1, 2, 4) for x in (q, k, g))
    vc = v.reshape(B, nt, BT, H, V).permute(0, 3, 1, 2, 4)
    gc = gch.cumsum(dim=-2)
    g_last = gc[..., -1:, :]  # [B, H, NT, 1, K]
    # Each chunk's own contribution to the state it hands on, and its total decay.
    k_to_end = kc * (g_last - gc).exp()
    contrib = vc.transpose(-1, -2) @ k_to_end  # [B, H, NT, V, K]
    decay = g_last.exp()  # [B, H, NT, 1, K]
    states = []
    state = h0
    for c in range(nt):
        states.append(state)
        state = state * decay[:, :, c] + contrib[:, :, c]
    chunk_states = torch.stack(states, dim=2)  # [B, H, NT, V, K]
    o_inter = (qc * gc.exp()) @ chunk_states.transpose(-1, -2)  # [B, H, NT, BT, V]
    o_intra = _intra_chunk_scores(qc, kc, gc) @ vc
    o = ((o_inter + o_intra) * scale).permute(0, 2, 3, 1, 4).reshape(B, T, H, V)
    return o, chunk_states, state, gc


def _pad_time(x: torch.Tensor, t_pad: int) -> torch.Tensor:
    """Zero-pad dim 1 of [B, T, H, D] to t_pad."""
    if x.shape[1] == t_pad:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], t_pad - x.shape[1], *x.shape[2:])], dim=1)


def chunk_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA on a padded batch; same contract as `naive_recurrent_gla`, differentiable.

    Args:
        q, k, g: [B, T, H, K], any T >= 1. v: [B, T, H, V].
        scale: defaults to K ** -0.5. initial_state: [B, H, V, K] or None.
        output_final_state: also return the final state.

    Returns:
        (o [B, T, H, V] in v.dtype, final_state [B, H, V, K] float32/float64 or None).

    Example:
        >>> o, s = chunk_gla_torch(q, k, v, g, output_final_state=True)
    """
    T = q.shape[1]
    scale, h0 = padded_batch_setup(q, k, v, g, scale, initial_state)
    dt = h0.dtype
    t_pad = -(-T // BT) * BT
    qp, kp, gp, vp = (_pad_time(x.to(dt), t_pad) for x in (q, k, g, v))
    o, _, final, _ = _chunk_forward(qp, kp, vp, gp, scale, h0)
    return o[:, :T].to(v.dtype), (final if output_final_state else None)


def chunk_gla_prefill_torch(
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen prefill against a state pool (the contract of `kernels.chunk_gla_prefill`).

    Sequences are gathered into a zero-padded [N, T_max] batch (padding leaves states unchanged),
    run through the chunked core, and scattered back. Final states are written to
    state_pool[state_slots] in place (under no_grad: the pool is a buffer, not a parameter).
    """
    K = q.shape[-1]
    N = state_slots.shape[0]
    if scale is None:
        scale = K**-0.5
    dev = q.device
    cu = cu_seqlens.to(device=dev, dtype=torch.long)
    slots = state_slots.to(device=dev, dtype=torch.long)
    lens = cu[1:] - cu[:-1]  # [N]
    t_max = int(lens.max()) if N > 0 else 0
    t_pad = max(BT, -(-t_max // BT) * BT)
    ar = torch.arange(t_pad, device=dev)
    valid = ar.unsqueeze(0) < lens.unsqueeze(1)  # [N, t_pad]
    idx = (cu[:-1].unsqueeze(1) + ar.unsqueeze(0)) * valid  # [N, t_pad], 0 past each end
    dt = compute_dtype(q, k, v, g, state_pool)
    keep = valid.unsqueeze(-1).unsqueeze(-1)

    def gather(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [N, t_pad, H, D], zeros past the end
        return torch.where(keep, x.to(dt)[idx], torch.zeros((), dtype=dt, device=dev))

    real = slots >= 0  # a negative slot is padding: no state in, none out
    h0 = torch.zeros(N, *state_pool.shape[1:], dtype=dt, device=dev)  # [N, H, V, K]
    h0[real] = state_pool[slots[real]].to(dt)
    if initial_state_mask is not None:
        h0 = torch.where(initial_state_mask.to(dev).view(N, 1, 1, 1), h0, torch.zeros_like(h0))
    o_pad, chunk_states, final, gc = _chunk_forward(gather(q), gather(k), gather(v), gather(g), scale, h0)
    o = o_pad[valid].to(v.dtype)  # row-major over (n, t) == packed order
    states = None
    if checkpoint_positions is not None:
        states = _states_at(checkpoint_positions.to(dev), cu, gather(k), gather(v), gc, chunk_states)
    with torch.no_grad():
        state_pool[slots[real]] = final[real].detach().to(state_pool.dtype)
    return o if states is None else (o, states)


def _states_at(
    positions: torch.Tensor,
    cu: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    gc: torch.Tensor,
    chunk_states: torch.Tensor,
) -> torch.Tensor:
    """State after consuming packed token p, for each p in positions [M] -> [M, H, V, K]."""
    seq = torch.searchsorted(cu[1:], positions, right=True)  # [M]
    t = positions - cu[seq]
    c, r = t // BT, t % BT
    # [M, H, BT, D] rows of the chunk holding p
    rows = c.unsqueeze(1) * BT + torch.arange(BT, device=cu.device).unsqueeze(0)  # [M, BT]
    k_ch = kp[seq.unsqueeze(1), rows].permute(0, 2, 1, 3)
    v_ch = vp[seq.unsqueeze(1), rows].permute(0, 2, 1, 3)
    g_ch = gc[seq, :, c]  # [M, H, BT, K]
    g_r = g_ch[torch.arange(len(r), device=cu.device), :, r].unsqueeze(-2)  # [M, H, 1, K]
    upto = (torch.arange(BT, device=cu.device).unsqueeze(0) <= r.unsqueeze(1)).view(-1, 1, BT, 1)
    k_dec = k_ch * _exp_causal(g_r - g_ch, upto)
    h_in = chunk_states[seq, :, c]  # [M, H, V, K]
    return h_in * g_r.exp() + v_ch.transpose(-1, -2) @ k_dec
