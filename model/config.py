"""GLAConfig: the fields and defaults of fla's GLAConfig, so fla-hub config.json files load unchanged.

Derived sizes (head dims, MLP width) live here as properties so the model, the state pool and the
CLI compute them one way. See ../shared/spec/gla.md §1 and §3.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from transformers import PretrainedConfig

# Not config fields in fla: GatedLinearAttention's constructor defaults, never passed by GLABlock,
# so every fla-hub checkpoint was trained with these two values (spec §1).
GATE_LOGIT_NORMALIZER = 16
GATE_LOW_RANK_DIM = 16


class GLAConfig(PretrainedConfig):
    model_type = "gla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        attn_mode: str = "chunk",
        hidden_size: int = 2048,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        feature_map: str | None = None,
        attn: dict | list | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_output_gate: bool = True,
        clamp_min: float | None = None,
        hidden_act: str = "swish",
        max_position_embeddings: int = 2048,
        elementwise_affine: bool | None = True,
        norm_eps: float = 1e-6,
        use_gk: bool = True,
        use_gv: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        **kwargs: Any,
    ) -> None:
        # The March 2024 checkpoints say "fused_chunk"; fla 0.6.0 made that mode a stub that raises,
        # while every mode computes the same recurrence (spec §4.4), so run it as "chunk".
        if attn_mode == "fused_chunk":
            attn_mode = "chunk"
        if attn_mode not in ("chunk", "fused_recurrent"):
            raise ValueError(f"attn_mode must be 'chunk', 'fused_recurrent' or 'fused_chunk', got {attn_mode!r}")
        # fla ignores the legacy `rms_norm_eps` key (norm_eps keeps its default); we do the same so
        # outputs match fla, but say so when the two disagree.
        legacy_eps = kwargs.pop("rms_norm_eps", None)
        if legacy_eps is not None and legacy_eps != norm_eps:
            warnings.warn(
                f"config has legacy rms_norm_eps={legacy_eps}; fla ignores it and uses norm_eps={norm_eps}",
                stacklevel=2,
            )
        kwargs.pop("share_conv_kernel", None)
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.feature_map = feature_map
        self.attn = attn
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_output_gate = use_output_gate
        self.clamp_min = clamp_min
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.use_gk = use_gk
        self.use_gv = use_gv
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        return _exact_int(self.hidden_size * self.expand_k, "hidden_size * expand_k")

    @property
    def value_dim(self) -> int:
        return _exact_int(self.hidden_size * self.expand_v, "hidden_size * expand_v")

    @property
    def n_kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def mlp_intermediate_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        # fla's GatedMLP rounding: 256 * ceil(int(d * ratio * 2/3) / 256)
        ratio = self.hidden_ratio if self.hidden_ratio is not None else 4
        inner = int(self.hidden_size * ratio * 2 / 3)
        return 256 * ((inner + 255) // 256)

    def validate_supported(self) -> None:
        """Raise for configurations this runtime cannot run, naming the field."""
        if self.attn is not None:
            raise ValueError(
                "config field `attn` is set: hybrid softmax-attention layers are not supported yet "
                f"(attn={self.attn!r}); remove the field or use a pure GLA checkpoint"
            )
        if self.num_heads % self.n_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.n_kv_heads}")
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError("key_dim and value_dim must be divisible by num_heads")


def _exact_int(x: float, what: str) -> int:
    r = round(x)
    if not math.isclose(x, r, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"{what} = {x} is not an integer")
    return int(r)
