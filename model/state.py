"""The state pool: every running sequence's whole context, preallocated once, indexed by slot.

A GLA sequence has no KV cache; its context is, per layer, a recurrent state [H, V, K] float32 in
fla's V-first layout (fla >= 0.5.1, `state_v_first=True`; older fla stored [H, K, V]) plus, with
`use_short_conv`, the last `conv_size - 1` inputs of the q/k/v convolutions. Kernels read and write
these tensors in place through int32 slot indices, so joining or leaving a batch never copies state.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from model.config import GLAConfig

# One copy stream per device for moving staged snapshots to the host off the compute stream.
_COPY_STREAMS: dict[int, Any] = {}
_COPY_STREAMS_LOCK = threading.Lock()


class StagedState(dict):
    """A slot's state copied on the device: the snapshot payload before it reaches the host.

    `ready` is the CUDA event recorded after the copies. `to_host` waits for it on a side stream,
    so the device-to-host transfer (48 MiB for a 1.3B model) overlaps later engine steps instead
    of stalling the one that took the snapshot.
    """

    ready: Any = None


def _copy_stream(device: torch.device) -> Any:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _COPY_STREAMS_LOCK:
        stream = _COPY_STREAMS.get(index)
        if stream is None:
            stream = _COPY_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def clone_slot(tensors: list[tuple[str, torch.Tensor]], slot: int) -> list[tuple[str, torch.Tensor]]:
    """Copies of `slot` of every pool tensor: one buffer per dtype and one multi-tensor copy.

    Why: a clone per layer tensor was ~50 allocations and copy launches for a 1.3B model, about a
    millisecond of host time in the step that ends a prompt, ahead of its first token.
    """
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors:
        by_dtype.setdefault(t.dtype, []).append((name, t[slot]))
    out: dict[str, torch.Tensor] = {}
    for dtype, items in by_dtype.items():
        flat = torch.empty(sum(src.numel() for _, src in items), dtype=dtype, device=items[0][1].device)
        dsts, off = [], 0
        for name, src in items:
            dst = flat[off : off + src.numel()].view(src.shape)
            off += src.numel()
            out[name] = dst
            dsts.append(dst)
        torch._foreach_copy_(dsts, [src for _, src in items])
    return [(name, out[name]) for name, _ in tensors]


def to_host(tensors: Mapping[str, torch.Tensor], pin: bool = False) -> dict[str, torch.Tensor]:
    """CPU copies of a snapshot (page-locked when `pin`); CPU tensors pass through uncopied.

    Blocks until the copies are done; call it off the engine step (the state cache does it in a
    worker thread). A `StagedState` is copied on a side stream after its `ready` event.
    """
    ready = getattr(tensors, "ready", None)
    if ready is None:
        out = {}
        for name, t in tensors.items():
            t = t.detach()
            if t.device.type != "cpu":
                t = t.to("cpu")
            out[name] = t.pin_memory() if pin and not t.is_pinned() else t
        return out
    device = next(iter(tensors.values())).device
    stream = _copy_stream(device)
    out = {}
    with torch.cuda.device(device), torch.cuda.stream(stream):
        stream.wait_event(ready)
        for name, t in tensors.items():
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            out[name] = host
        stream.synchronize()
    return out


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
        self.max_staged_bytes = 2**30  # device copies awaiting their host copy; beyond, `stage` reads
        self._staged_bytes = 0
        self._staged_lock = threading.Lock()
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

    def stage(self, slot: int) -> dict[str, torch.Tensor]:
        """A snapshot of one slot that costs the caller no device-to-host wait (see `to_host`).

        On CUDA: device copies, ordered on the current stream after whatever wrote the slot, plus a
        `ready` event; at most `max_staged_bytes` of them await their host copy at once, and past
        that (or when the device is out of memory) this is `read`. Elsewhere it is `read`.
        """
        if self.device.type != "cuda":
            return self.read(slot)
        nbytes = self.bytes_per_slot
        with self._staged_lock:
            if self._staged_bytes + nbytes > self.max_staged_bytes:
                return self.read(slot)
            self._staged_bytes += nbytes
        try:
            staged = StagedState(clone_slot(self._tensors(), slot))
        except torch.cuda.OutOfMemoryError:
            self._release_staged(nbytes)
            return self.read(slot)
        staged.ready = torch.cuda.Event()
        staged.ready.record(torch.cuda.current_stream(self.device))  # this pool's device, whatever thread stages
        weakref.finalize(staged, self._release_staged, nbytes)
        return staged

    def warm_pinned_host(self, num_snapshots: int) -> int:
        """Fill torch's caching host allocator with `num_snapshots` page-locked copies of a slot's
        tensors, then free them; returns how many fit.

        Why: each pinned allocation of a snapshot (48 MiB for a 1.3B model) is a cudaHostAlloc of
        tens of milliseconds that holds the GIL, so until the host tier had filled once, every
        prompt-end snapshot stalled the event loop and the engine thread (an H200 measured 40 ms
        of HTTP time to first token for a 2K prompt that prefills in 12 ms). Freed pinned blocks
        stay cached by torch and are reused by `to_host` and the Redis decode of the same sizes.
        """
        if self.device.type != "cuda" or num_snapshots <= 0:
            return 0
        held: list[list[torch.Tensor]] = []
        try:
            for _ in range(num_snapshots):
                held.append([torch.empty(t.shape[1:], dtype=t.dtype, pin_memory=True) for _, t in self._tensors()])
        except RuntimeError:  # out of page-lockable memory: warm what fit
            pass
        n = len(held)
        del held
        return n

    def _release_staged(self, nbytes: int) -> None:
        with self._staged_lock:
            self._staged_bytes -= nbytes

    def write(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Load a snapshot from `read` into a slot. Names and shapes must match exactly, dtypes
        too, except that a narrower float copy (a bf16-stored state) is widened as it is copied
        (on the GPU, for a CUDA pool: the host skips a widening pass over the whole state)."""
        expected = dict(self._tensors())
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))
            extra = sorted(set(tensors) - set(expected))
            raise ValueError(f"state snapshot does not match the pool: missing {missing}, unexpected {extra}")
        for name, t in expected.items():
            src = tensors[name]
            widens = src.dtype.is_floating_point and t.dtype.is_floating_point and src.itemsize < t.itemsize
            if tuple(src.shape) != tuple(t.shape[1:]) or (src.dtype != t.dtype and not widens):
                raise ValueError(
                    f"state tensor {name}: got {tuple(src.shape)} {src.dtype}, "
                    f"expected {tuple(t.shape[1:])} {t.dtype}"
                )
        for name, t in expected.items():
            src = tensors[name]
            if src.dtype != t.dtype and src.device != t.device:
                # copy_ across devices would widen on the host first (and from pageable memory):
                # move the narrow bytes, then widen where the slot lives
                src = src.to(t.device, non_blocking=True)
            elif src.is_cuda:
                # a staged Redis read (server/state_cache/staging.py) lives on another stream's
                # memory: keep it from being reused before this stream's copy has read it
                src.record_stream(torch.cuda.current_stream(src.device))
            t[slot].copy_(src, non_blocking=True)
