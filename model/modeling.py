"""GLAForCausalLM with fla-hub parameter names, plus the serving interface the engine calls.

`forward` is the Hugging Face entry point (full sequences from a zero state, with a loss for
training). `prefill` and `decode` are what gla-serve runs: a packed batch of sequences whose states
live in a `StatePool`, independent of HF `generate()`. See docs/architecture.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

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
    ) -> torch.Tensor:
        """Run a packed batch of N sequences and return the logits of each one's last token.

        Args:
            input_ids: [T] token ids of all sequences, concatenated.
            cu_seqlens: [N+1] int32 offsets (0, len_0, len_0+len_1, ...); every length >= 1.
            pool: the state pool; per layer the recurrent state is [S, H, V, K] float32, V-first
                (fla >= 0.5.1 layout).
            slots: [N] int32 pool slot of each sequence; its final state is written there in place.
            initial_state_mask: [N] bool; True continues from the slot's state (a resumed
                conversation or the next piece of a split prompt), False starts from zeros.
                None means all False.
            cu_seqlens, slots and initial_state_mask may be CPU tensors (the engine passes them so):
            the host needs their values anyway, so that costs no device sync.
        Returns:
            logits [N, vocab] float32.
        """
        dev = input_ids.device
        cu_cpu = cu_seqlens.tolist()
        n = len(cu_cpu) - 1
        if n < 1 or cu_cpu[0] != 0 or cu_cpu[-1] != input_ids.shape[0] or any(
            b <= a for a, b in zip(cu_cpu, cu_cpu[1:], strict=False)
        ):
            raise ValueError(f"cu_seqlens {cu_cpu} must start at 0, increase strictly and end at {input_ids.shape[0]}")
        if initial_state_mask is None:
            initial_state_mask = torch.zeros(n, dtype=torch.bool)
        conv_meta = (slots.tolist(), initial_state_mask.tolist()) if pool.conv is not None else None
        cu_seqlens = cu_seqlens.to(dev, non_blocking=True)
        slots = slots.to(dev, non_blocking=True)
        initial_state_mask = initial_state_mask.to(dev, non_blocking=True)
        h = self.model.embeddings(input_ids)
        for i, layer in enumerate(self.model.layers):
            a = layer.attn.prefill(
                layer.attn_norm(h),
                cu_seqlens,
                cu_cpu,
                pool.recurrent[i],
                pool.conv[i] if pool.conv is not None else None,
                slots,
                initial_state_mask,
                conv_meta,
            )
            h = layer.residual_mlp(a, h)
        last = cu_seqlens[1:].long() - 1
        return self.lm_head(self.model.norm(h[last])).float()

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, pool: StatePool, slots: torch.Tensor) -> torch.Tensor:
        """One token for each of B sequences; their states at `slots` [B] are updated in place.

        Returns logits [B, vocab] float32.
        """
        h = self.model.embeddings(input_ids)
        for i, layer in enumerate(self.model.layers):
            a = layer.attn.decode(
                layer.attn_norm(h), pool.recurrent[i], pool.conv[i] if pool.conv is not None else None, slots
            )
            h = layer.residual_mlp(a, h)
        return self.lm_head(self.model.norm(h)).float()


__all__ = ["GLAForCausalLM", "GLAModel", "GLAPreTrainedModel", "GatedLinearAttention"]
