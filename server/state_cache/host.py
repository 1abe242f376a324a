"""The host tier: decoded snapshots in CPU memory (pinned on CUDA), LRU-evicted within a byte budget.

Entries hold tensors, not encoded bytes, so a hit is one host-to-device copy away from a pool slot.
Pinned memory makes that copy asynchronous (`copy_(..., non_blocking=True)` in `StatePool.write`).
All methods run on the event loop thread; only `prepare` is meant for a worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from model.state import to_host


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(slots=True)
class HostEntry:
    """One state: the tensors (read-only by contract), the tokens they summarise, their size."""

    tensors: dict[str, torch.Tensor]
    num_tokens: int
    prefix_hash: bytes
    nbytes: int = 0

    def __post_init__(self) -> None:
        if not self.nbytes:
            self.nbytes = tensors_nbytes(self.tensors)


class HostLRU:
    """Byte-bounded LRU of `HostEntry` by key.

    Args:
        budget_bytes: the most bytes of tensors held; older entries are evicted to make room and an
            entry larger than the whole budget is refused.
        pin_memory: copy tensors into page-locked memory in `prepare`; None = when CUDA is present.
        on_evict: called with (key, entry) for each eviction (metrics, secondary indexes).

    Counters (plain attributes, for metrics): hits, misses, evictions, insertions, rejected,
    bytes_used.

    Example:
        >>> lru = HostLRU(budget_bytes=1 << 30)
        >>> lru.put("k", HostEntry(lru.prepare(state), num_tokens=12, prefix_hash=h))
        >>> lru.get("k").num_tokens
        12
    """

    def __init__(
        self,
        budget_bytes: int,
        pin_memory: bool | None = None,
        on_evict: Callable[[str, HostEntry], None] | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.on_evict = on_evict
        self._entries: OrderedDict[str, HostEntry] = OrderedDict()
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.insertions = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def prepare(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Owned CPU copies (pinned when enabled); slow for big states, so call it off the loop.

        A staged device snapshot (`model.state.StagedState`) is copied on a side stream, so the
        engine's compute stream never waits for it.
        """
        return to_host(tensors, pin=self.pin_memory)

    def get(self, key: str) -> HostEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def peek(self, key: str) -> HostEntry | None:
        """Like `get` but neither reorders nor counts (for probing candidates)."""
        return self._entries.get(key)

    def put(self, key: str, entry: HostEntry) -> bool:
        """Inserts or replaces; returns False when the entry alone exceeds the budget."""
        if entry.nbytes > self.budget_bytes:
            self.rejected += 1
            self.pop(key)
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes_used -= old.nbytes
        while self._entries and self.bytes_used + entry.nbytes > self.budget_bytes:
            victim_key, victim = self._entries.popitem(last=False)
            self.bytes_used -= victim.nbytes
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(victim_key, victim)
        self._entries[key] = entry
        self.bytes_used += entry.nbytes
        self.insertions += 1
        return True

    def pop(self, key: str) -> HostEntry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.nbytes
        return entry

    def stats(self) -> dict[str, int]:
        return {
            "host_hits": self.hits,
            "host_misses": self.misses,
            "host_evictions": self.evictions,
            "host_insertions": self.insertions,
            "host_rejected": self.rejected,
            "host_bytes": self.bytes_used,
            "host_budget_bytes": self.budget_bytes,
            "host_entries": len(self._entries),
        }
