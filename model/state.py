"""The state pool: every running sequence's whole context, preallocated once, indexed by slot.

A GLA sequence has no KV cache; its context is, per layer, a recurrent state [H, V, K] float32 in
fla's V-first layout (fla >= 0.5.1, `state_v_first=True`; older fla stored [H, K, V]) plus, with
`use_short_conv`, the last `conv_size - 1` inputs of the q/k/v convolutions. Kernels read and write
these tensors in place through int32 slot indices, so joining or leaving a batch never copies state.
"""

from __future__ import annotations

import torch

from model.config import GLAConfig


def conv_channels(config: GLAConfig) -> int:
    """Channels of the concatenated q/k/v short-conv tails."""
    g = config.num_heads // config.n_kv_heads
    return config.key_dim + config.key_dim // g + config.value_dim // g


def state_bytes_per_sequence(config: GLAConfig, conv_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sequence's recurrent state (+ conv tails) across all layers."""
    per_layer = config.num_heads * config.head_v_dim * config.head_k_dim * 4
    if config.use_short_conv:
        per_layer += conv_channels(config) * (config.conv_size - 1) * torch.tensor([], dtype=conv_dtype).element_size()
    return per_layer * config.num_hidden_layers


class StatePool:
    """Per-layer state tensors for `num_slots` sequences.

    Args:
        config: the model config.
        num_slots: number of sequences that can be resident at once.
        device: where the pool lives (the model's device).
        conv_dtype: dtype of the short-conv tails (the model's activation dtype).

    Example:
        >>> pool = StatePool(cfg, num_slots=8, device="cpu")
        >>> pool.zero_([3]); snap = pool.read(3); pool.write(5, snap)
    """

    def __init__(
        self,
        config: GLAConfig,
        num_slots: int,
        device: torch.device | str = "cpu",
        conv_dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.config = config
        self.num_slots = num_slots
        self.device = torch.device(device)
        H, K, V = config.num_heads, config.head_k_dim, config.head_v_dim
        # [L] x [S, H, V, K]
        self.recurrent: list[torch.Tensor] = [
            torch.zeros(num_slots, H, V, K, dtype=torch.float32, device=self.device)
            for _ in range(config.num_hidden_layers)
        ]
        # [L] x [S, C, W-1]
        self.conv: list[torch.Tensor] | None = None
        if config.use_short_conv:
            C, W = conv_channels(config), config.conv_size
            self.conv = [
                torch.zeros(num_slots, C, W - 1, dtype=conv_dtype, device=self.device)
                for _ in range(config.num_hidden_layers)
            ]

    @property
    def bytes_per_slot(self) -> int:
        total = sum(t[0].numel() * t.element_size() for t in self.recurrent)
        if self.conv is not None:
            total += sum(t[0].numel() * t.element_size() for t in self.conv)
        return total

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        out = [(f"layers.{i}.recurrent", t) for i, t in enumerate(self.recurrent)]
        if self.conv is not None:
            out += [(f"layers.{i}.conv", t) for i, t in enumerate(self.conv)]
        return out

    def zero_(self, slots: torch.Tensor | list[int]) -> None:
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        for _, t in self._tensors():
            t.index_fill_(0, idx, 0)

    def copy_(self, src: int, dst: int) -> None:
        for _, t in self._tensors():
            t[dst].copy_(t[src])

    def read(self, slot: int) -> dict[str, torch.Tensor]:
        """A CPU copy of one slot's state, keyed by stable names (the snapshot payload)."""
        return {name: t[slot].detach().to("cpu", copy=True) for name, t in self._tensors()}

    def write(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Load a snapshot from `read` into a slot; the names, shapes and dtypes must match exactly."""
        expected = dict(self._tensors())
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))
            extra = sorted(set(tensors) - set(expected))
            raise ValueError(f"state snapshot does not match the pool: missing {missing}, unexpected {extra}")
        for name, t in expected.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(t.shape[1:]) or src.dtype != t.dtype:
                raise ValueError(
                    f"state tensor {name}: got {tuple(src.shape)} {src.dtype}, "
                    f"expected {tuple(t.shape[1:])} {t.dtype}"
                )
        for name, t in expected.items():
            t[slot].copy_(tensors[name], non_blocking=True)
