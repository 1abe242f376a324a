"""GLA building blocks with fla-hub parameter names: RMSNorm, GatedMLP, ShortConvolution, GLA attention.

Numerics follow fla 0.6.0 (../shared/spec/gla.md §2-3): fused residual add in fp32 with the norm
taken from the unrounded sum, log-gate logsigmoid(z)/16 in the activation dtype, per-head RMSNorm x
swish output gate in fp32. The recurrence itself runs in `kernels/` (PyTorch on the CPU, Triton on
CUDA); this file only shapes tensors for it. Each attention layer has three entry points that share
projections and the output gate: `forward` (padded batch, used for training and full forwards),
`prefill` (packed varlen batch with pool state) and `decode` (one token per sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from model.config import GATE_LOGIT_NORMALIZER, GATE_LOW_RANK_DIM, GLAConfig

ACT2FN = {
    "swish": F.silu,
    "silu": F.silu,
    "relu": F.relu,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


def activation(name: str):
    if name not in ACT2FN:
        raise ValueError(f"unsupported activation / feature_map {name!r}; known: {sorted(ACT2FN)}")
    return ACT2FN[name]


class RMSNorm(nn.Module):
    """RMSNorm with fla's optional fused residual: the sum is formed and normalised in fp32."""

    def __init__(self, dim: int, eps: float, affine: bool = True, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype)) if affine else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        s = x.float() if residual is None else x.float() + residual.float()
        y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        y = y.to(x.dtype)
        if residual is None:
            return y
        return y, s.to(residual.dtype)


class GatedMLP(nn.Module):
    def __init__(self, config: GLAConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.mlp_intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fla's fused swiglu: act(gate) * up in fp32, stored in the input dtype, then down_proj
        h = self.act(self.gate_proj(x).float()) * self.up_proj(x).float()
        return self.down_proj(h.to(x.dtype))


class ShortConvolution(nn.Module):
    """Depthwise causal conv + SiLU; the weight is named like fla's nn.Conv1d subclass ([C, 1, W])."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, C] one sequence, tail [C, W-1] (or None = zeros) -> (y [T, C], new tail [C, W-1])."""
        W = self.weight.shape[-1]
        if tail is None:
            tail = x.new_zeros(x.shape[1], W - 1, dtype=torch.float32)
        full = torch.cat([tail.float(), x.float().t()], dim=1)  # [C, W-1+T]
        y = F.conv1d(full.unsqueeze(0), self.weight.float(), groups=x.shape[1])[0]  # [C, T]
        return F.silu(y).t().to(x.dtype), full[:, full.shape[1] - (W - 1) :]

    def step(self, x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """One token per sequence: x [B, C], tail [B, C, W-1] updated in place -> y [B, C]."""
        window = torch.cat([tail.float(), x.float().unsqueeze(-1)], dim=-1)  # [B, C, W]
        y = (window * self.weight[:, 0, :].float()).sum(-1)
        tail.copy_(window[..., 1:])
        return F.silu(y).to(x.dtype)


class GatedLinearAttention(nn.Module):
    def __init__(self, config: GLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.n_kv_heads
        self.num_groups = self.num_heads // self.num_kv_heads
        self.head_k_dim = config.head_k_dim
        self.head_v_dim = config.head_v_dim
        self.scale = self.head_k_dim**-0.5
        self.clamp_min = config.clamp_min
        self.feature_map = activation(config.feature_map) if config.feature_map is not None else None
        self.use_output_gate = config.use_output_gate
        self.gate_act = activation(config.hidden_act)
        d, kd, vd, g = config.hidden_size, config.key_dim, config.value_dim, self.num_groups
        self.key_dim_kv, self.value_dim_kv = kd // g, vd // g

        self.q_proj = nn.Linear(d, kd, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim_kv, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim_kv, bias=False)
        if self.use_output_gate:
            self.g_proj = nn.Linear(d, vd, bias=False)
        self.use_short_conv = config.use_short_conv
        if self.use_short_conv:
            self.q_conv1d = ShortConvolution(kd, config.conv_size)
            self.k_conv1d = ShortConvolution(self.key_dim_kv, config.conv_size)
            self.v_conv1d = ShortConvolution(self.value_dim_kv, config.conv_size)
        self.gk_proj = nn.Sequential(
            nn.Linear(d, GATE_LOW_RANK_DIM, bias=False), nn.Linear(GATE_LOW_RANK_DIM, self.key_dim_kv, bias=True)
        )
        self.o_proj = nn.Linear(vd, d, bias=False)
        affine = bool(config.elementwise_affine)
        # fla's parameter name depends on whether the fused norm+swish-gate module is used (spec §2)
        self.fused_gate_norm = config.hidden_act == "swish" and config.fuse_norm and self.use_output_gate
        norm = RMSNorm(self.head_v_dim, config.norm_eps, affine, dtype=torch.float32)
        if self.fused_gate_norm:
            self.g_norm_swish_gate = norm
        else:
            self.g_norm = norm

    # ---- shared pieces --------------------------------------------------------------------------
    def _conv_splits(self) -> list[int]:
        return [self.q_proj.out_features, self.key_dim_kv, self.value_dim_kv]

    def _heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat projections [..., C] -> q, k, g [..., H, K] and v [..., H, V] with kv heads expanded."""
        lead = q.shape[:-1]
        gk = F.logsigmoid(self.gk_proj(x)) / GATE_LOGIT_NORMALIZER
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        q = q.view(*lead, self.num_heads, self.head_k_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_k_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_v_dim)
        gk = gk.view(*lead, self.num_kv_heads, self.head_k_dim)
        if self.feature_map is not None:
            q, k = self.feature_map(q), self.feature_map(k)
        if self.num_groups > 1:
            # query head h reads kv head h // G (consecutive repeats, spec §2 step 5)
            k = k.repeat_interleave(self.num_groups, dim=-2)
            v = v.repeat_interleave(self.num_groups, dim=-2)
            gk = gk.repeat_interleave(self.num_groups, dim=-2)
        return q.contiguous(), k.contiguous(), v.contiguous(), gk.contiguous()

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [..., H, V] -> per-head RMSNorm (x swish gate) -> o_proj [..., d]."""
        norm = self.g_norm_swish_gate if self.fused_gate_norm else self.g_norm
        y = norm(o.float())
        if self.use_output_gate:
            g = self.g_proj(x).view(*o.shape).float()
            y = y * self.gate_act(g)
        return self.o_proj(y.to(x.dtype).flatten(-2))

    # ---- entry points ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Padded batch x [B, T, d] from a zero state (training and full-sequence forwards)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q = torch.stack([self.q_conv1d(s, None)[0] for s in q])
            k = torch.stack([self.k_conv1d(s, None)[0] for s in k])
            v = torch.stack([self.v_conv1d(s, None)[0] for s in v])
        q, k, v, gk = self._heads(q, k, v, x)
        o, _ = kernels.chunk_gla_torch(q, k, v, gk, scale=self.scale)
        return self._output(o, x)

    def prefill(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cu_seqlens_cpu: list[int],
        recurrent: torch.Tensor,
        conv: torch.Tensor | None,
        slots: torch.Tensor,
        initial_state_mask: torch.Tensor | None,
        conv_meta: tuple[list[int], list[bool]] | None,
    ) -> torch.Tensor:
        """Packed x [T, d]; states read from / written to `recurrent` [S, H, V, K] at `slots` [N].

        `conv_meta` is (slots, initial_state_mask) as host lists, given when the short-conv tails
        are used, so the per-sequence conv loop never reads device tensors.
        """
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            assert conv is not None and conv_meta is not None
            q, k, v = self._conv_varlen(q, k, v, cu_seqlens_cpu, conv, *conv_meta)
        q, k, v, gk = self._heads(q, k, v, x)
        o = kernels.chunk_gla_prefill(
            q, k, v, gk, cu_seqlens, recurrent, slots, scale=self.scale, initial_state_mask=initial_state_mask
        )
        return self._output(o, x)

    def _conv_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu: list[int],
        conv: torch.Tensor,
        slots: list[int],
        mask: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        splits = self._conv_splits()
        outs: list[list[torch.Tensor]] = [[], [], []]
        for n in range(len(cu) - 1):
            s, e, slot = cu[n], cu[n + 1], slots[n]
            tails = conv[slot].split(splits, dim=0) if mask[n] else (None, None, None)
            new_tails = []
            for j, (mod, t) in enumerate(((self.q_conv1d, q), (self.k_conv1d, k), (self.v_conv1d, v))):
                y, tail = mod(t[s:e], tails[j])
                outs[j].append(y)
                new_tails.append(tail)
            conv[slot].copy_(torch.cat(new_tails, dim=0))
        return torch.cat(outs[0]), torch.cat(outs[1]), torch.cat(outs[2])

    def decode(
        self, x: torch.Tensor, recurrent: torch.Tensor, conv: torch.Tensor | None, slots: torch.Tensor
    ) -> torch.Tensor:
        """One token per sequence: x [B, d]; states at `slots` [B] updated in place."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            assert conv is not None
            tails = conv[slots]  # [B, C, W-1] gathered copy
            tq, tk, tv = tails.split(self._conv_splits(), dim=1)
            tq, tk, tv = tq.contiguous(), tk.contiguous(), tv.contiguous()
            q, k, v = self.q_conv1d.step(q, tq), self.k_conv1d.step(k, tk), self.v_conv1d.step(v, tv)
            conv[slots] = torch.cat([tq, tk, tv], dim=1)
        q, k, v, gk = self._heads(q, k, v, x)
        o = kernels.fused_recurrent_gla_decode(q, k, v, gk, recurrent, slots, scale=self.scale)
        return self._output(o, x)


class GLABlock(nn.Module):
    def __init__(self, config: GLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = GatedLinearAttention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = GatedMLP(config)

    def residual_mlp(self, a: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h, residual = self.mlp_norm(a, residual)
        return residual + self.mlp(h)
