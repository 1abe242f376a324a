"""Conversation state between turns: the engine <-> cache interface and an in-process LRU behind it.

A conversation is its token log plus, optionally, the model state after consuming all but the last
logged token (the last sampled token is pending: the next turn feeds it first). The state is a
cache of the log: without it the engine rebuilds the state by prefilling the log. The tiered cache
(issue 5) implements `ConversationStore` with device, host and Redis tiers; docs/api.md describes
the contract.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from model.state import to_host
from server.errors import ConversationBusy
from server.state_cache.keys import ANCHOR_BLOCK, PrefixHasher

DEFAULT_TENANT = "default"
_BYTES_PER_TOKEN = 8  # a Python int in a list, roughly, for the budget


@dataclass(frozen=True, slots=True)
class ConversationKey:
    tenant: str
    conversation_id: str


@dataclass(slots=True)
class ConversationSnapshot:
    """What a finished turn leaves behind.

    token_ids: the whole log (every prompt and sampled token of every turn), at least 1 token.
    state: per-layer tensors from `StatePool.read` after consuming `token_ids[:-1]`, or None when
        only the log is known (the engine then prefills `token_ids` from a zero state).
    """

    token_ids: list[int]
    state: dict[str, Any] | None = None

    @property
    def num_state_bytes(self) -> int:
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state.values())

    @property
    def nbytes(self) -> int:
        return self.num_state_bytes + _BYTES_PER_TOKEN * len(self.token_ids)


@dataclass(slots=True)
class PrefixHit:
    """A cached state for the first `num_tokens` of a prompt (tensors shared: copy, never mutate)."""

    num_tokens: int
    state: dict[str, Any]


@runtime_checkable
class PrefixStore(Protocol):
    """Optional side of a store: states indexed by the exact token prefix they summarise.

    This is what lets a client without a conversation id (an OpenAI chat client resending its
    whole history) skip prefilling what an earlier request already consumed. Entries are a pure
    cache: losing one only costs a longer prefill.
    """

    async def lookup_prefix(self, tenant: str, token_ids: list[int]) -> PrefixHit | None:
        """The state of the longest cached prefix of `token_ids` (1 <= length <= len), or None."""
        ...

    def store_prefix(self, tenant: str, token_ids: list[int], state: dict[str, Any]) -> None:
        """Keep `state` (after consuming exactly `token_ids`). Called from the engine's step
        thread: must not block on I/O."""
        ...


@runtime_checkable
class ConversationStore(Protocol):
    """What the engine needs from a conversation cache.

    Turn protocol: `acquire` (may raise ConversationBusy -> 409) -> `await load` -> the turn runs ->
    on success `commit(key, snapshot)` -> always `release`. A failed or aborted turn never commits,
    so the stored conversation stays exactly as it was.
    """

    def acquire(self, key: ConversationKey) -> None: ...

    def release(self, key: ConversationKey) -> None: ...

    async def load(
        self, key: ConversationKey, resident: Callable[[list[int]], bool] | None = None
    ) -> ConversationSnapshot | None:
        """The log and its state. `resident(log)` true means the engine still holds that state in
        a slot: a store whose state costs a fetch may then return the log alone. The returned
        `token_ids` list is the caller's: the engine keeps it without copying (32K-token logs)."""
        ...

    def commit(self, key: ConversationKey, snapshot: ConversationSnapshot) -> None:
        """Store a finished turn. Called from the engine loop: must not block on I/O."""
        ...

    def stats(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class _PrefixEntry:
    anchor: tuple[str, bytes]  # (tenant, anchor) it is indexed under
    num_tokens: int
    state: dict[str, Any]
    nbytes: int


class LRUConversationStore:
    """In-process conversations within a byte budget, least recently used evicted first.

    It also keeps prefix states (`PrefixStore`) in the same budget. Over budget it first drops
    the least recently used prefix state, then the state of the least recently used conversation
    but keeps its token log (a later turn rebuilds the state by prefill), and drops whole
    conversations only when the logs alone exceed the budget.

    It copies each state to host memory inside the engine step (a synchronous 48 MiB read took 4.3
    ms on an H200, and a turn takes two: prompt end and commit): the default of `create_app` for
    tests and embedding. `gla-serve serve` uses the tiered store (`server.state_cache`), whose copies run off
    the step.

    Args:
        budget_bytes: bound on states plus logs.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[ConversationKey, ConversationSnapshot] = OrderedDict()
        self._busy: set[ConversationKey] = set()
        self._lock = threading.Lock()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_state_evictions = 0
        self.num_evictions = 0
        # prefix states: (tenant, prefix hash) -> entry; (tenant, anchor) -> lengths stored under it,
        # so a lookup hashes only the lengths that can match instead of every prefix of the prompt
        self._prefixes: OrderedDict[tuple[str, bytes], _PrefixEntry] = OrderedDict()
        self._prefix_lengths: dict[tuple[str, bytes], Counter[int]] = {}
        self.num_prefix_bytes = 0
        self.num_prefix_hits = 0
        self.num_prefix_misses = 0
        self.num_prefix_cached_tokens = 0
        self.num_prefix_evictions = 0

    def acquire(self, key: ConversationKey) -> None:
        with self._lock:
            if key in self._busy:
                raise ConversationBusy(
                    f"conversation {key.conversation_id!r} already has a turn in progress; retry when it ends",
                    param="conversation_id",
                )
            self._busy.add(key)

    def release(self, key: ConversationKey) -> None:
        with self._lock:
            self._busy.discard(key)

    async def load(
        self, key: ConversationKey, resident: Callable[[list[int]], bool] | None = None
    ) -> ConversationSnapshot | None:
        await asyncio.sleep(0)  # in-process states cost nothing to hand over: `resident` is moot
        with self._lock:
            snap = self._entries.get(key)
            if snap is None:
                self.num_misses += 1
                return None
            self._entries.move_to_end(key)
            self.num_hits += 1
            return ConversationSnapshot(snap.token_ids, snap.state)  # logs are never mutated: no copy

    def commit(self, key: ConversationKey, snapshot: ConversationSnapshot) -> None:
        if snapshot.state is not None:  # in-process: hold host copies, never device memory
            snapshot = ConversationSnapshot(snapshot.token_ids, to_host(snapshot.state))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.num_bytes -= old.nbytes
            self._entries[key] = snapshot
            self.num_bytes += snapshot.nbytes
            self._evict()

    async def lookup_prefix(self, tenant: str, token_ids: list[int]) -> PrefixHit | None:
        hasher = PrefixHasher(token_ids)
        total = len(token_ids)
        with self._lock:
            lengths = {
                n
                for k, anchor in enumerate(hasher.anchors)
                for n in self._prefix_lengths.get((tenant, anchor), ())
                if n // ANCHOR_BLOCK == k and n <= total
            }
            for n in sorted(lengths, reverse=True):
                key = (tenant, hasher.prefix_hash(n))
                entry = self._prefixes.get(key)
                if entry is not None:
                    self._prefixes.move_to_end(key)
                    self.num_prefix_hits += 1
                    self.num_prefix_cached_tokens += n
                    return PrefixHit(n, entry.state)
            self.num_prefix_misses += 1
            return None

    def store_prefix(self, tenant: str, token_ids: list[int], state: dict[str, Any]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        if not token_ids or nbytes > self.budget_bytes:
            return
        state = to_host(state)
        hasher = PrefixHasher(token_ids)
        n = len(token_ids)
        key = (tenant, hasher.prefix_hash(n))
        anchor = (tenant, hasher.anchor_for(n))
        with self._lock:
            if key in self._prefixes:
                self._prefixes.move_to_end(key)
                return
            self._prefixes[key] = _PrefixEntry(anchor, n, state, nbytes)
            self._prefix_lengths.setdefault(anchor, Counter())[n] += 1
            self.num_bytes += nbytes
            self.num_prefix_bytes += nbytes
            self._evict()

    def _evict_prefix(self) -> None:
        _, entry = self._prefixes.popitem(last=False)
        lengths = self._prefix_lengths[entry.anchor]
        lengths[entry.num_tokens] -= 1
        if lengths[entry.num_tokens] <= 0:
            del lengths[entry.num_tokens]
            if not lengths:
                del self._prefix_lengths[entry.anchor]
        self.num_bytes -= entry.nbytes
        self.num_prefix_bytes -= entry.nbytes
        self.num_prefix_evictions += 1

    def _evict(self) -> None:
        while self.num_bytes > self.budget_bytes:
            if self._prefixes:
                self._evict_prefix()
                continue
            victim = next((k for k, s in self._entries.items() if s.state is not None), None)
            if victim is not None:
                snap = self._entries[victim]
                self.num_bytes -= snap.num_state_bytes
                snap.state = None
                self.num_state_evictions += 1
                continue
            if not self._entries:
                break
            _, snap = self._entries.popitem(last=False)
            self.num_bytes -= snap.nbytes
            self.num_evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "conversations": len(self._entries),
                "states": sum(1 for s in self._entries.values() if s.state is not None),
                "bytes": self.num_bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.num_hits,
                "misses": self.num_misses,
                "state_evictions": self.num_state_evictions,
                "evictions": self.num_evictions,
                "busy": len(self._busy),
                "prefix_states": len(self._prefixes),
                "prefix_bytes": self.num_prefix_bytes,
                "prefix_hits": self.num_prefix_hits,
                "prefix_misses": self.num_prefix_misses,
                "prefix_cached_tokens": self.num_prefix_cached_tokens,
                "prefix_evictions": self.num_prefix_evictions,
            }
