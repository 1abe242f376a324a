"""GLA building blocks with fla-hub parameter names: RMSNorm, GatedMLP, ShortConvolution, GLA attention.

Numerics follow fla 0.6.0 (../shared/spec/gla.md §2-3): fused residual add in fp32 with the norm
taken from the unrounded sum, log-gate logsigmoid(z)/16 in the activation dtype, per-head RMSNorm x
swish output gate in fp32. The recurrence itself runs in `kernels/` (PyTorch on the CPU, Triton on
CUDA); this file only shapes tensors for it. Each attention layer has three entry points that share
projections and the output gate: `forward` (padded batch, used for training and full forwards),
`prefill` (packed varlen batch with pool state) and `decode` (one token per sequence).

Serving (`prefill`/`decode`) is bound by kernel launches at small batches, so after
`fuse()` (model.fuse_for_inference) the q/k/v/g/gk input projections run as one GEMM and the MLP's
gate/up as another (model/fusion.py keeps the checkpoint's parameters as views of the fused
weights), the split + log-gate + GQA repeat is one kernel (`kernels.gla_prep`), and the norms,
SwiGLU and output gate are fused kernels too. Unfused layers run the same code from separate GEMMs.
With `kernels.GEMV_ROUTE` (on for one row: batch-1 decode) those GEMMs, o_proj and SwiGLU + down_proj
run as Triton GEMVs (`kernels.linear` / `kernels.swiglu_linear`), and the pre-norms arrive as
`kernels.PreNorm`s that `kernels.linear` applies as the next GEMV's prologue.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from model.config import GATE_LOGIT_NORMALIZER, GATE_LOW_RANK_DIM, GLAConfig
from model.fusion import FusedWeight, fuse

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
        self.fused: FusedWeight | None = None

    def fuse(self) -> None:
        """gate/up weights become halves of one [2I, d] tensor (one GEMM when gradients are off)."""
        self.fused = fuse(self.fused, [self.gate_proj.weight, self.up_proj.weight])

    def forward(self, x: torch.Tensor | kernels.PreNorm) -> torch.Tensor:
        # fla's fused swiglu: act(gate) * up in fp32, stored in the input dtype, then down_proj
        f = self.fused
        if f is not None and not torch.is_grad_enabled() and f.valid():  # the GEMM bypasses the params
            gu = kernels.linear(x, f.weight)
            if self.act is F.silu:  # swiglu + down_proj (one GEMV kernel at small batches, GEMV_ROUTE)
                return kernels.swiglu_linear(gu, self.down_proj.weight)
            gate, up = gu.chunk(2, dim=-1)
        else:
            x = kernels.normed(x)
            gate, up = self.gate_proj(x), self.up_proj(x)
        h = self.act(gate.float()) * up.float()
        return self.down_proj(h.to(gate.dtype))


class ShortConvolution(nn.Module):
    """Depthwise causal conv + SiLU; the weight is named like fla's nn.Conv1d subclass ([C, 1, W])."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_conv(x, tail, self.weight)

    def step(self, x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return conv_step(x, tail, self.weight)


def causal_conv(
    x: torch.Tensor, tail: torch.Tensor | None, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, C] one sequence, tail [C, W-1] (or None = zeros), weight [C, 1, W] -> (y [T, C], new tail)."""
    W = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(x.shape[1], W - 1, dtype=torch.float32)
    full = torch.cat([tail.float(), x.float().t()], dim=1)  # [C, W-1+T]
    y = F.conv1d(full.unsqueeze(0), weight.float(), groups=x.shape[1])[0]  # [C, T]
    return F.silu(y).t().to(x.dtype), full[:, full.shape[1] - (W - 1) :]


def conv_step(x: torch.Tensor, tail: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One token per sequence: x [B, C], tail [B, C, W-1] updated in place -> y [B, C]."""
    window = torch.cat([tail.float(), x.float().unsqueeze(-1)], dim=-1)  # [B, C, W]
    y = (window * weight[:, 0, :].float()).sum(-1)
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
        self.fused_in: FusedWeight | None = None  # q|k|v|(g)|gk_proj.0, set by fuse()
        self.fused_conv: FusedWeight | None = None  # q|k|v conv weights (use_short_conv)

    def _in_params(self) -> list[nn.Parameter]:
        gate = [self.g_proj.weight] if self.use_output_gate else []
        return [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, *gate, self.gk_proj[0].weight]

    def _conv_params(self) -> list[nn.Parameter]:
        return [self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]

    def fuse(self) -> None:
        """One [kd + kd/G + vd/G (+ vd) + 16, d] input weight (and one conv weight); idempotent."""
        self.fused_in = fuse(self.fused_in, self._in_params())
        if self.use_short_conv:
            self.fused_conv = fuse(self.fused_conv, self._conv_params())

    # ---- forward (training) pieces: separate projections, autograd through plain PyTorch ---------
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
        if x.is_cuda and not torch.is_grad_enabled():
            return self._forward_kernels(q, k, v, gk, x)
        o, _ = kernels.chunk_gla_torch(q, k, v, gk, scale=self.scale)
        return self._output(o, x)

    def _forward_kernels(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """Inference forward on CUDA through the serving kernels (chunked prefill from zero states,
        fused norm x gate). They round where fla's 16-bit model rounds (q*exp(G), the scores and
        the chunk states in the activation dtype); the PyTorch form keeps those in fp32, which put
        its bf16 logits twice as far from fla's (docs/benchmarks.md, "fla parity")."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        dev = q.device
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=dev)
        pool = torch.zeros(B, H, V, K, dtype=torch.float32, device=dev)  # zero states in, final ones dropped
        slots = torch.arange(B, dtype=torch.int32, device=dev)
        # up to 64 tokens token by token, as prefill() and fla's layer (its fused_recurrent mode) do
        o = kernels.chunk_gla_prefill(*(t.flatten(0, 1) for t in (q, k, v, gk)), cu, pool, slots,
                                      scale=self.scale, short=T <= kernels.SHORT_PREFILL_MAX)
        gate = self.g_proj(x).view(B * T, H, V) if self.use_output_gate else None
        return self.o_proj(self._gate_norm(o, gate).flatten(-2)).view(B, T, -1)

    # ---- serving: packed prefill and one-token decode ----------------------------------------------
    def _in_proj(self, x: torch.Tensor | kernels.PreNorm) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([q, k, v, (g), lowrank], q|k|v [M, C]) from one fused GEMM (strided column slices, no copy)
        or from separate GEMMs (then q|k|v is concatenated, and only needed with use_short_conv)."""
        f = self.fused_in
        if f is not None and f.valid():
            y = kernels.linear(x, f.weight)
            return list(y.split(f.splits, dim=-1)), y[..., : sum(self._conv_splits())]
        x = kernels.normed(x)
        parts = [F.linear(x, w) for w in self._in_params()]
        return parts, torch.cat(parts[:3], dim=-1) if self.use_short_conv else parts[0]

    def _conv_weight(self) -> torch.Tensor:
        f = self.fused_conv
        if f is not None and f.valid():
            return f.weight
        return torch.cat([w.detach() for w in self._conv_params()], dim=0)

    def _project(
        self, x: torch.Tensor | kernels.PreNorm, conv: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [M, d] -> kernel-ready q, k, gk [M, H, K], v, gate [M, H, V] (gate None without g_proj).

        `conv` maps the q|k|v columns [M, C] through the short convolutions (use_short_conv).
        """
        parts, qkv = self._in_proj(x)
        q, k, v, lowrank = parts[0], parts[1], parts[2], parts[-1]
        gate = parts[3] if self.use_output_gate else None
        if conv is not None:
            q, k, v = conv(qkv).split(self._conv_splits(), dim=-1)
        lin = self.gk_proj[1]
        q, k, v, gk, gate = kernels.gla_prep(
            q, k, v, gate, lowrank, lin.weight, lin.bias, self.num_heads, self.head_k_dim, self.head_v_dim,
            GATE_LOGIT_NORMALIZER, self.clamp_min,
        )
        if self.feature_map is not None:  # elementwise, so applying it after the kv repeat is the same
            q, k = self.feature_map(q), self.feature_map(k)
        return q, k, v, gk, gate

    def _gate_norm(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """o [M, H, V] -> per-head RMSNorm (x act(gate)) in o.dtype: `_output` without o_proj."""
        norm = self.g_norm_swish_gate if self.fused_gate_norm else self.g_norm
        if gate is None or self.gate_act is F.silu:
            return kernels.rms_norm_gate(o, gate, norm.weight, norm.eps)
        return (norm(o.float()) * self.gate_act(gate.float())).to(o.dtype)

    def prefill(
        self,
        x: torch.Tensor | kernels.PreNorm,
        cu_seqlens: torch.Tensor,
        cu_seqlens_cpu: list[int],
        recurrent: torch.Tensor,
        conv: torch.Tensor | None,
        slots: torch.Tensor,
        initial_state_mask: torch.Tensor | None,
        conv_meta: tuple[list[int], list[bool]] | None,
        checkpoint_positions: torch.Tensor | None = None,
        checkpoint_out: list[torch.Tensor] | None = None,
        short: bool = False,
    ) -> torch.Tensor:
        """Packed x [T, d]; states read from / written to `recurrent` [S, H, V, K] at `slots` [N].

        With `checkpoint_positions` (packed token indices), the states after those tokens
        [M, H, V, K] are appended to `checkpoint_out`.

        `conv_meta` is (slots, initial_state_mask) as host lists, given when the short-conv tails
        are used, so the per-sequence conv loop never reads device tensors.
        """
        conv_fn = None
        if self.use_short_conv:
            assert conv is not None and conv_meta is not None
            weight = self._conv_weight()

            def conv_fn(qkv: torch.Tensor) -> torch.Tensor:
                return _conv_varlen(qkv, weight, cu_seqlens_cpu, conv, *conv_meta)

        q, k, v, gk, gate = self._project(x, conv_fn)
        o = kernels.chunk_gla_prefill(
            q, k, v, gk, cu_seqlens, recurrent, slots, scale=self.scale, initial_state_mask=initial_state_mask,
            checkpoint_positions=checkpoint_positions, short=short,
        )
        if checkpoint_positions is not None:
            o, states = o
            assert checkpoint_out is not None
            checkpoint_out.append(states)
        return kernels.linear(self._gate_norm(o, gate).flatten(-2), self.o_proj.weight)

    def decode(
        self, x: torch.Tensor | kernels.PreNorm, recurrent: torch.Tensor, conv: torch.Tensor | None, slots: torch.Tensor
    ) -> torch.Tensor:
        """One token per sequence: x [B, d]; states at `slots` [B] updated in place."""
        conv_fn = None
        if self.use_short_conv:
            assert conv is not None
            weight = self._conv_weight()

            def conv_fn(qkv: torch.Tensor) -> torch.Tensor:
                tails = conv[slots]  # [B, C, W-1] gathered copy, advanced in place, scattered back
                y = conv_step(qkv, tails, weight)
                conv[slots] = tails
                return y

        if conv_fn is None and self.feature_map is None and self.fused_gate_norm and kernels.DECODE_PROJ["enabled"]:
            # prep, recurrence and norm x swish gate in one kernel, from the projection's columns
            parts, _ = self._in_proj(x)
            lin, norm = self.gk_proj[1], self.g_norm_swish_gate
            o = kernels.gla_decode_proj(
                parts[0], parts[1], parts[2], parts[3], parts[-1], lin.weight, lin.bias, self.num_heads,
                self.head_k_dim, self.head_v_dim, GATE_LOGIT_NORMALIZER, self.clamp_min, recurrent, slots,
                scale=self.scale, norm_weight=norm.weight, norm_eps=norm.eps,
            )
            return kernels.linear(o.flatten(-2), self.o_proj.weight)
        q, k, v, gk, gate = self._project(x, conv_fn)
        if self.fused_gate_norm:  # the norm x swish gate runs inside the decode kernel
            norm = self.g_norm_swish_gate
            o = kernels.fused_recurrent_gla_decode(
                q, k, v, gk, recurrent, slots, scale=self.scale, gate=gate, norm_weight=norm.weight,
                norm_eps=norm.eps,
            )
        else:
            o = self._gate_norm(kernels.fused_recurrent_gla_decode(q, k, v, gk, recurrent, slots, scale=self.scale),
                                gate)
        return kernels.linear(o.flatten(-2), self.o_proj.weight)


def _conv_varlen(
    qkv: torch.Tensor, weight: torch.Tensor, cu: list[int], conv: torch.Tensor, slots: list[int], mask: list[bool]
) -> torch.Tensor:
    """Short conv of packed sequences [T, C], each continuing from its slot's tail when mask[n]."""
    outs = []
    for n in range(len(cu) - 1):
        s, e, slot = cu[n], cu[n + 1], slots[n]
        if s == e:  # empty (padding): the tail passes through, or starts from zeros
            if not mask[n] and slot >= 0:
                conv[slot].zero_()
            continue
        y, tail = causal_conv(qkv[s:e], conv[slot] if mask[n] else None, weight)
        outs.append(y)
        conv[slot].copy_(tail)
    return torch.cat(outs) if outs else qkv[:0]


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
