"""GLAForCausalLM with fla-hub parameter names, plus the serving interface the engine calls.

`forward` is the Hugging Face entry point (full sequences from a zero state, with a loss for
training). `prefill` and `decode` are what gla-serve runs: a packed batch of sequences whose states
live in a `StatePool`, independent of HF `generate()`. See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import kernels
from model.config import GLAConfig
from model.layers import GatedLinearAttention, GLABlock, RMSNorm, ShortConvolution
from model.state import StatePool


class GLAPreTrainedModel(PreTrainedModel):
    config_class = GLAConfig
    base_model_prefix = "model"
    _no_split_modules = ["GLABlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):
            nn.init.kaiming_uniform_(module.weight)


class GLAModel(GLAPreTrainedModel):
    def __init__(self, config: GLAConfig) -> None:
        config.validate_supported()
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList([GLABlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer.residual_mlp(layer.attn(layer.attn_norm(h)), h)
        return self.norm(h)

    def serve_layers(
        self, h: torch.Tensor,
        attn: Callable[[int, GatedLinearAttention, torch.Tensor | kernels.PreNorm], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer stack of prefill/decode: embeddings h [M, d] -> (residual, last MLP output).

        Same numerics as `forward`'s blocks, but each norm is one kernel together with the residual
        add before it: the post-MLP add (`h = residual + mlp`, rounded to the activation dtype)
        happens inside the next layer's `attn_norm` (round_sum), and the caller finishes the last one
        with the final norm via `final_norm`. `attn(i, layer.attn, x)` runs layer i's attention.
        """
        m: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            # each norm goes to the projection after it, which runs it as its GEMV's prologue at
            # batch-1 steps (kernels.linear, norm_gemv) and as the norm kernel first otherwise
            n = layer.attn_norm
            pre = kernels.PreNorm(h if m is None else m, None if m is None else h, n.weight, n.eps, True)
            a = attn(i, layer.attn, pre)
            pre = kernels.PreNorm(a, pre.new_residual(), layer.mlp_norm.weight, layer.mlp_norm.eps, False)
            m = layer.mlp(pre)
            h = pre.new_residual()
        return h, m

    def final_norm(self, h: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """norm(h + m): the last layer's residual add fused into the final RMSNorm."""
        if m is None:
            return kernels.rms_norm_gate(h, None, self.norm.weight, self.norm.eps)
        return kernels.add_rms_norm(m, h, self.norm.weight, self.norm.eps, round_sum=True)[0]


class GLAForCausalLM(GLAPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: GLAConfig) -> None:
        super().__init__(config)
        self.model = GLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):  # type: ignore[override]
        """Load through our own loader, which handles the legacy fla-hub layouts (spec §3.3)."""
        from model.loader import load_checkpoint

        return load_checkpoint(
            str(pretrained_model_name_or_path),
            dtype=kwargs.get("torch_dtype", kwargs.get("dtype")),
            device=kwargs.get("device_map") if isinstance(kwargs.get("device_map"), str) else "cpu",
            config=kwargs.get("config"),
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Full sequences [B, T] from a zero state; returns logits for every position (and the loss)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padded batches are not supported by forward(); pack sequences and use prefill() with cu_seqlens"
            )
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ---- serving interface ----------------------------------------------------------------------
    def fuse_for_inference(self) -> GLAForCausalLM:
        """Fuse each layer's input projections (q|k|v|g|gk_proj.0) and MLP gate|up into one weight each.

        Call after the weights are loaded and moved (dtype/device): the original parameters become
        views of the fused tensors, so names, shapes and state_dict() are unchanged and no memory is
        duplicated. Idempotent. A later `.to()` silently unfuses (the layers fall back to separate
        GEMMs); call this again afterwards. Training (`forward` with gradients) never uses the fusion.
        """
        for layer in self.model.layers:
            layer.attn.fuse()
            layer.mlp.fuse()
        return self

    def new_state_pool(self, num_slots: int) -> StatePool:
        return StatePool(self.config, num_slots, device=self.lm_head.weight.device)

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        pool: StatePool,
        slots: torch.Tensor,
        initial_state_mask: torch.Tensor | None = None,
        checkpoint_positions: list[int] | None = None,
        cu_seqlens_host: list[int] | None = None,
        short: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Run a packed batch of N sequences and return the logits of each one's last token.

        Args:
            input_ids: [T] token ids of all sequences, concatenated.
            cu_seqlens: [N+1] int32 offsets (0, len_0, len_0+len_1, ...). A sequence may be empty (a
                CUDA graph's padding): its state passes through unchanged (slot -1: untouched) and
                its logits row is meaningless.
            pool: the state pool; per layer the recurrent state is [S, H, V, K] float32, V-first
                (fla >= 0.5.1 layout).
            slots: [N] int32 pool slot of each sequence; its final state is written there in place.
            initial_state_mask: [N] bool; True continues from the slot's state (a resumed
                conversation or the next piece of a split prompt), False starts from zeros.
                None means all False.
            cu_seqlens, slots and initial_state_mask may be CPU tensors (the engine passes them so):
            the host needs their values anyway, so that costs no device sync.
            cu_seqlens_host: cu_seqlens as a host list when cu_seqlens lives on the device (a CUDA
                graph capture, which must not read device values back).
            checkpoint_positions: packed token indices p; also return, for each, the state after
                token p (recurrent states only: not with use_short_conv, whose conv tails at p are
                not kept).
            short: run the recurrence token by token (`kernels.chunk_gla_prefill(short=True)`: same
                results, faster for a few tokens per sequence); None picks it when no sequence is
                longer than `kernels.SHORT_PREFILL_MAX` and no checkpoint states are wanted.
        Returns:
            logits [N, vocab] float32; with checkpoint_positions, (logits, [state dict per position])
            in the `StatePool.read` layout.
        """
        dev = input_ids.device
        cu_cpu = cu_seqlens_host if cu_seqlens_host is not None else cu_seqlens.tolist()
        n = len(cu_cpu) - 1
        if n < 1 or cu_cpu[0] != 0 or cu_cpu[-1] != input_ids.shape[0] or any(
            b < a for a, b in zip(cu_cpu, cu_cpu[1:], strict=False)
        ) or cu_cpu[-1] < 1:
            raise ValueError(f"cu_seqlens {cu_cpu} must start at 0, never decrease and end at "
                             f"{input_ids.shape[0]} >= 1")
        if slots.shape[0] != n:
            raise ValueError(f"cu_seqlens has {n} sequences but slots has {slots.shape[0]}")
        if initial_state_mask is None:
            initial_state_mask = torch.zeros(n, dtype=torch.bool, device=dev if cu_seqlens_host is not None else "cpu")
        conv_meta = (slots.tolist(), initial_state_mask.tolist()) if pool.conv is not None else None
        cu_seqlens = cu_seqlens.to(dev, non_blocking=True)
        slots = slots.to(dev, non_blocking=True)
        initial_state_mask = initial_state_mask.to(dev, non_blocking=True)
        conv = pool.conv
        if short is None:
            longest = max(b - a for a, b in zip(cu_cpu, cu_cpu[1:], strict=False))
            short = checkpoint_positions is None and longest <= kernels.SHORT_PREFILL_MAX
        positions = None
        states: list[torch.Tensor] = []
        if checkpoint_positions is not None:
            if conv is not None:
                raise ValueError("checkpoint states are not supported with use_short_conv (no conv tails at p)")
            positions = torch.tensor(checkpoint_positions, dtype=torch.long).to(dev, non_blocking=True)

        def attn(i: int, layer: GatedLinearAttention, x: torch.Tensor | kernels.PreNorm) -> torch.Tensor:
            return layer.prefill(x, cu_seqlens, cu_cpu, pool.recurrent[i], conv[i] if conv is not None else None,
                                 slots, initial_state_mask, conv_meta, positions, states, short)

        h, m = self.model.serve_layers(self.model.embeddings(input_ids), attn)
        last = cu_seqlens[1:].long() - 1
        logits = self.lm_head(self.model.final_norm(h[last], m[last] if m is not None else None)).float()
        if positions is None:
            return logits
        return logits, [{f"layers.{i}.recurrent": s[j] for i, s in enumerate(states)}
                        for j in range(len(checkpoint_positions))]

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, pool: StatePool, slots: torch.Tensor) -> torch.Tensor:
        """One token for each of B sequences; their states at `slots` [B] are updated in place.

        Returns logits [B, vocab] float32.
        """
        conv = pool.conv

        def attn(i: int, layer: GatedLinearAttention, x: torch.Tensor | kernels.PreNorm) -> torch.Tensor:
            return layer.decode(x, pool.recurrent[i], conv[i] if conv is not None else None, slots)

        h, m = self.model.serve_layers(self.model.embeddings(input_ids), attn)
        return self.lm_head(self.model.final_norm(h, m)).float()


__all__ = ["GLAForCausalLM", "GLAModel", "GLAPreTrainedModel", "GatedLinearAttention"]
