"""TieredStateCache: the one object the engine talks to for saved conversation state.

The token log is the source of truth and a state is a cache of it: every lookup checks that a
state summarises exactly a prefix of the caller's tokens (prefix hash) and was made by this model
(fingerprint), so a miss, an eviction, a corrupt blob or a foreign one all mean the same thing to
the engine: prefill from the longest prefix found (possibly none).

Snapshots are stored once per (tenant, token prefix); a conversation is a small pointer to its
latest committed prefix. Host tier first, then Redis; a Redis hit is promoted to the host. Redis
writes run in the background after the host insert, so a commit never waits for the network.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from server.state_cache.flight import SingleFlight
from server.state_cache.host import HostEntry, HostLRU, tensors_nbytes
from server.state_cache.keys import ANCHOR_BLOCK, KeySpace, PrefixHasher, model_tag
from server.state_cache.pinned import PinnedSets, layout_of
from server.state_cache.redis_tier import RedisTier, decode_token_log
from server.state_cache.snapshot import (
    SnapshotDecoder,
    SnapshotError,
    SnapshotHeader,
    encode_snapshot,
)

log = logging.getLogger(__name__)
R = TypeVar("R")

_POINTER = struct.Struct("<Q32s32s")  # num_tokens, prefix_hash, anchor


class _Unread:
    """Marks a pointer not yet read from Redis (None means read and absent)."""


UNREAD = _Unread()


class EarlyRead:
    """An early Redis read of a conversation's state (`TieredStateCache.begin_turn`): its task,
    and an event set once the payload's transfer has been handed to the reader threads, so the
    caller can leave the event loop to the read's own steps (pointer, manifest, decoder) until
    then and do its CPU work (the log's decode and prefix hash) during the transfer."""

    def __init__(self, task_of: Callable[[EarlyRead], Awaitable[CacheHit | None]]) -> None:
        self.transferring = asyncio.Event()
        self.task: asyncio.Task[CacheHit | None] = asyncio.ensure_future(task_of(self))
        # retrieved here, so an early read that nobody awaits is never logged as a lost exception
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def wait_transferring(self) -> None:
        """Returns once the transfer has started or the read has ended (a miss, a failure, a
        coalesced fetch that another caller leads)."""
        if self.transferring.is_set() or self.task.done():
            return
        waiter = asyncio.ensure_future(self.transferring.wait())
        try:
            await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    def cancel(self) -> None:
        self.task.cancel()


@dataclass(slots=True)
class CacheHit:
    """A usable state. `tensors` are shared with the cache: copy them (StatePool.write), never
    mutate them. They always have the dtypes that were stored (bf16 storage is undone)."""

    num_tokens: int
    prefix_hash: bytes
    tensors: dict[str, torch.Tensor]
    tier: str  # "host" or "redis"


@dataclass(slots=True)
class Lease:
    """One turn's exclusive right to a conversation; `is_distributed` is False when Redis could not
    be asked and only this replica's exclusivity holds."""

    key: str
    token: str
    is_distributed: bool


@dataclass(slots=True)
class TurnStart:
    """What a resumed turn needs first, from one round trip (`TieredStateCache.begin_turn`): its
    lease, the conversation's token log (as `get_token_log` returns it) and, when asked for, the
    early read of its state (`EarlyRead`)."""

    lease: Lease
    log: list[int] | None
    early: EarlyRead | None


class TieredStateCache:
    """Host LRU + optional Redis, prefix index, token logs, turn leases and single-flight.

    Args:
        fingerprint: `keys.model_fingerprint(config, weights_digest)`; snapshots must match it.
        host_budget_bytes: host tier size (e.g. 8 GiB = ~170 states of the 1.3B model).
        redis: a `RedisTier`, or None for a single-replica, host-only cache.
        log_redis: the `RedisTier` for token logs and turn leases (default: `redis`). Logs are the
            source of truth and states only a cache of them, so they may live in an instance that
            never evicts while the states' instance evicts freely.
        key_prefix: namespace shared by the replicas of one deployment.
        storage_dtype: torch.bfloat16 halves Redis bytes (lossy); None (default) stores exactly.
            The host tier keeps exact tensors of what it stored itself.
        widen_on_host: whether states read back from Redis in `storage_dtype` are widened to their
            original dtype on the host. None = unless the host tier pins (CUDA): there they stay
            narrow (half the host memory, no widening pass ahead of the turn) and
            `StatePool.write` widens them on the GPU as it copies them in.
        max_pending_write_bytes: background Redis writes beyond this are skipped (and counted),
            so a slow Redis cannot grow memory without bound.
        max_local_conversations: bound on in-process conversation pointers and token logs.
        thread_threshold_bytes: copies, encodes and decodes at least this big go to a thread.
        stage_device: a CUDA device to copy states read from Redis to while they arrive
            (`staging.py`; only with pinned host memory): the hit's tensors are then on it, and the
            step's copy into a slot is device to device. None (default): hits stay on the host.
        pinned_sets: how many ready sets of pinned destination tensors to keep per snapshot layout
            for Redis reads (`pinned.PinnedSets`), so a read allocates none on the turn's critical
            path; only with `redis` and where the host tier pins (0: off, each read allocates its
            own). A `PinnedSets` is used as given, pinned or not (the CPU tests inject an allocator).
        on_event: called as on_event(name, amount) for every counter increment (Prometheus).

    Example:
        >>> cache = TieredStateCache(fp, host_budget_bytes=4 << 30, redis=RedisTier(url))
        >>> hit = await cache.lookup_prefix("default", prompt_ids)   # None or CacheHit
        >>> await cache.store("default", prompt_ids + reply_ids, pool.read(slot), conversation_id="c1")
    """

    def __init__(
        self,
        fingerprint: bytes,
        *,
        host_budget_bytes: int,
        redis: RedisTier | None = None,
        log_redis: RedisTier | None = None,
        key_prefix: str = "gla:",
        storage_dtype: torch.dtype | None = None,
        pin_memory: bool | None = None,
        widen_on_host: bool | None = None,
        max_pending_write_bytes: int = 1 << 30,
        max_local_conversations: int = 100_000,
        thread_threshold_bytes: int = 1 << 20,
        on_event: Callable[[str, int], None] | None = None,
        stage_device: torch.device | None = None,
        pinned_sets: int | PinnedSets = 2,
    ) -> None:
        if len(fingerprint) != 32:
            raise ValueError("fingerprint must be 32 bytes (keys.model_fingerprint)")
        self.fingerprint = fingerprint
        self.keys = KeySpace(key_prefix, model_tag(fingerprint))
        self.host = HostLRU(host_budget_bytes, pin_memory=pin_memory, on_evict=self._host_evicted)
        self.redis = redis
        self.log_redis = log_redis if log_redis is not None else redis
        self.storage_dtype = storage_dtype
        self.widen_on_host = not self.host.pin_memory if widen_on_host is None else widen_on_host
        # an asynchronous copy to CUDA needs pinned sources: without them staging would only add a
        # copy (a CPU stage_device is what the CPU tests exercise the staging with)
        self.stage_device = (stage_device if stage_device is not None
                             and (stage_device.type != "cuda" or self.host.pin_memory) else None)
        if isinstance(pinned_sets, PinnedSets):
            self.pinned_sets: PinnedSets | None = pinned_sets
        else:
            wanted = pinned_sets > 0 and self.host.pin_memory and redis is not None
            self.pinned_sets = PinnedSets(pinned_sets) if wanted else None
        self.max_pending_write_bytes = max_pending_write_bytes
        self.max_local_conversations = max_local_conversations
        self.thread_threshold_bytes = thread_threshold_bytes
        self.on_event = on_event
        self.counters: Counter[str] = Counter()
        self.flights: SingleFlight[Any] = SingleFlight()
        # host prefix index: anchor key -> cached lengths (counted: prompts of one length that
        # differ after the anchor share it); snapshot key -> (anchor key, length)
        self._host_anchors: dict[str, Counter[int]] = {}
        self._host_index: dict[str, tuple[str, int]] = {}
        self._pointers: OrderedDict[str, bytes] = OrderedDict()
        self._logs: OrderedDict[str, list[int]] = OrderedDict()
        self._leases: dict[str, tuple[str, float]] = {}
        self._pending: set[asyncio.Task] = set()
        self._pending_bytes = 0
        self._conv_tail: dict[str, asyncio.Task] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def _count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount
        if self.on_event is not None:
            self.on_event(name, amount)

    async def _offload(self, nbytes: int, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        if nbytes >= self.thread_threshold_bytes:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def _remember(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_local_conversations:
            table.popitem(last=False)

    def _host_evicted(self, key: str, entry: HostEntry) -> None:
        """The LRU dropped an entry for room (counted, unlike a replacement)."""
        self._count("host_evictions")
        self._on_host_evict(key, entry)

    def _on_host_evict(self, key: str, _entry: HostEntry) -> None:
        if key not in self._host_index:
            return
        anchor_key, n = self._host_index.pop(key)
        lengths = self._host_anchors.get(anchor_key)
        if lengths is not None:
            lengths[n] -= 1
            if lengths[n] <= 0:
                del lengths[n]
            if not lengths:
                del self._host_anchors[anchor_key]

    def _host_put(self, snap_key: str, anchor_key: str, entry: HostEntry) -> None:
        self._on_host_evict(snap_key, entry)  # a replaced (or rejected) entry leaves the index first
        if self.host.put(snap_key, entry):
            self._host_anchors.setdefault(anchor_key, Counter())[entry.num_tokens] += 1
            self._host_index[snap_key] = (anchor_key, entry.num_tokens)

    # -- store ------------------------------------------------------------------------------------
    async def store(
        self,
        tenant: str,
        token_ids: Sequence[int],
        tensors: Mapping[str, torch.Tensor],
        *,
        conversation_id: str | None = None,
        ttl_s: float | None = None,
        wait_for_redis: bool = False,
    ) -> None:
        """Saves the state after `token_ids` (call only when a turn or prompt completes).

        The cache takes the tensors as they are (`StatePool.read` returns fresh CPU copies,
        `StatePool.stage` fresh device copies that `HostLRU.prepare` moves to the host off the
        loop): do not mutate them afterwards. With `conversation_id` the conversation's pointer moves to
        this prefix. Redis is written in the background unless `wait_for_redis`.
        """
        n = len(token_ids)
        hasher = PrefixHasher(token_ids)
        phash = hasher.prefix_hash(n)
        snap_key = self.keys.snapshot(tenant, phash)
        anchor_key = self.keys.anchor(tenant, hasher.anchor_for(n))
        nbytes = tensors_nbytes(tensors)
        owned = await self._offload(nbytes, self.host.prepare, tensors)
        self._host_put(snap_key, anchor_key, HostEntry(owned, n, phash, nbytes))
        self._count("stores")
        conv_key = pointer = None
        if conversation_id is not None:
            conv_key = self.keys.conversation(tenant, conversation_id)
            pointer = _POINTER.pack(n, phash, hasher.anchor_for(n))
            self._remember(self._pointers, conv_key, pointer)
        if self.redis is None:
            return
        if self._pending_bytes + nbytes > self.max_pending_write_bytes:
            self._count("redis_writes_skipped")
            return
        previous = self._conv_tail.get(conv_key) if conv_key is not None else None
        task = asyncio.create_task(
            self._write_redis(snap_key, anchor_key, n, phash, owned, nbytes, conv_key, pointer, ttl_s, previous)
        )
        self._pending.add(task)
        self._pending_bytes += nbytes

        def done(t: asyncio.Task) -> None:
            self._pending.discard(t)
            self._pending_bytes -= nbytes
            if conv_key is not None and self._conv_tail.get(conv_key) is t:
                del self._conv_tail[conv_key]

        task.add_done_callback(done)
        if conv_key is not None:
            self._conv_tail[conv_key] = task
        if wait_for_redis:
            await asyncio.shield(task)

    async def _write_redis(
        self,
        snap_key: str,
        anchor_key: str,
        n: int,
        phash: bytes,
        tensors: dict[str, torch.Tensor],
        nbytes: int,
        conv_key: str | None,
        pointer: bytes | None,
        ttl_s: float | None,
        previous: asyncio.Task | None,
    ) -> None:
        assert self.redis is not None
        enc = await self._offload(
            nbytes, encode_snapshot, tensors, num_tokens=n, prefix_hash=phash,
            fingerprint=self.fingerprint, storage_dtype=self.storage_dtype,
        )
        self._prime_pinned(enc.header)
        if previous is not None:
            # Commits of one conversation land in order, so an older pointer never wins.
            await asyncio.wait([previous])
        if not await self.redis.put_snapshot(snap_key, enc, ttl_s):
            self._count("redis_writes_failed")
            return
        await self.redis.add_anchor_member(anchor_key, n, ttl_s)
        if conv_key is not None and pointer is not None:
            # Written after the snapshot: a reader never follows a pointer to nothing.
            await self.redis.set_bytes(conv_key, pointer, ttl_s)
        self._count("redis_writes")

    def _prime_pinned(self, header: SnapshotHeader) -> None:
        """A replica that writes states of a layout will usually read one back (another replica's
        turn of the same model): have sets ready before its first read rather than after it. Only
        for layouts a read decodes into as stored (not those widened on the host)."""
        reduced = any(t.dtype != t.orig_dtype for t in header.tensors)
        if self.pinned_sets is not None and not (reduced and self.widen_on_host):
            self.pinned_sets.prime(layout_of(header))

    async def flush(self) -> None:
        """Waits for background Redis writes (shutdown, tests)."""
        while self._pending:
            await asyncio.wait(list(self._pending))

    async def close(self) -> None:
        await self.flush()
        if self.redis is not None:
            await self.redis.close()
        if self.log_redis is not None and self.log_redis is not self.redis:
            await self.log_redis.close()

    # -- lookup -----------------------------------------------------------------------------------
    async def lookup_prefix(self, tenant: str, token_ids: Sequence[int]) -> CacheHit | None:
        """The state of the longest cached prefix of `token_ids` (at least 1 token), or None.

        Probes the host index and Redis' anchor sets (one round trip), then tries candidates from
        longest to shortest; the longer prefix wins whichever tier holds it.
        """
        self._count("lookups")
        hasher = PrefixHasher(token_ids)
        total = len(token_ids)
        anchor_keys = [self.keys.anchor(tenant, a) for a in hasher.anchors]
        host_lengths = {n for k in anchor_keys for n in self._host_anchors.get(k, ())}
        redis_lengths: set[int] = set()
        if self.redis is not None and total:
            members = await self.redis.anchor_members(anchor_keys)
            for i, lengths in enumerate(members or []):
                redis_lengths |= {n for n in lengths if n // ANCHOR_BLOCK == i}
        for n in sorted((host_lengths | redis_lengths), reverse=True):
            if not 1 <= n <= total:
                continue
            hit = await self._fetch(tenant, hasher.prefix_hash(n), n, anchor_keys[n // ANCHOR_BLOCK],
                                    try_redis=n in redis_lengths)
            if hit is not None:
                return self._hit(hit)
            if n in redis_lengths and self.redis is not None:
                await self.redis.remove_anchor_member(anchor_keys[n // ANCHOR_BLOCK], n)
        self._count("lookup_misses")
        return None

    async def lookup(
        self, tenant: str, conversation_id: str, token_ids: Sequence[int] | None = None,
        rejections: list[str] | None = None,
    ) -> CacheHit | None:
        """The conversation's latest committed state, or None.

        With `token_ids` (the conversation's log) a state is used only if it summarises a prefix
        of them; a pointer that does not is counted as `rejected_prefix_mismatch` and skipped.
        `rejections` collects the `SnapshotError.reason` of each snapshot refused on the way, so
        the caller can say why it rebuilds (corrupt, another model) rather than only that it does.
        """
        self._count("lookups")
        conv_key = self.keys.conversation(tenant, conversation_id)
        pointers = []
        if self.redis is not None and (remote := await self.redis.get_bytes(conv_key)) is not None:
            pointers.append(remote)
        if (local := self._pointers.get(conv_key)) is not None:
            pointers.append(local)
        hasher = PrefixHasher(token_ids) if token_ids is not None else None
        candidates = sorted({_POINTER.unpack(p) for p in pointers if len(p) == _POINTER.size}, reverse=True)
        for n, phash, anchor in candidates:
            if hasher is not None and (n > hasher.num_tokens or hasher.prefix_hash(n) != phash):
                self._count("rejected_prefix_mismatch")
                continue
            hit = await self._fetch(tenant, phash, n, self.keys.anchor(tenant, anchor), try_redis=True,
                                    rejections=rejections)
            if hit is not None:
                return self._hit(hit)
        self._count("lookup_misses")
        return None

    def forget_local(self, tenant: str, conversation_id: str) -> None:
        """Drops what this process alone holds of a conversation: its pointer, its token log and the
        host-tier copy of the state the pointer names. Redis keeps its copies, so the next turn runs
        as on a replica that never saw the conversation: how benchmarks and tests measure and check
        that case in one process (`e2e_server.py --cold-replica`)."""
        pointer = self._pointers.pop(self.keys.conversation(tenant, conversation_id), None)
        self._logs.pop(self.keys.token_log(tenant, conversation_id), None)
        if pointer is not None and len(pointer) == _POINTER.size:
            snap_key = self.keys.snapshot(tenant, _POINTER.unpack(pointer)[1])
            entry = self.host.pop(snap_key)
            if entry is not None:
                self._on_host_evict(snap_key, entry)

    def _wants_early_read(self, tenant: str, conversation_id: str) -> bool:
        return self.redis is not None and self._pointers.get(self.keys.conversation(tenant, conversation_id)) is None

    def _start_early(
        self, tenant: str, conversation_id: str, rejections: list[str] | None, pointer: bytes | None | _Unread
    ) -> EarlyRead:
        self._count("early_reads")
        return EarlyRead(lambda early: self._early_fetch(tenant, conversation_id, rejections, pointer, early))

    async def _early_fetch(
        self, tenant: str, conversation_id: str, rejections: list[str] | None, remote: bytes | None | _Unread,
        early: EarlyRead,
    ) -> CacheHit | None:
        assert self.redis is not None
        if isinstance(remote, _Unread):
            remote = await self.redis.get_bytes(self.keys.conversation(tenant, conversation_id))
        if remote is None or len(remote) != _POINTER.size:
            return None
        n, phash, anchor = _POINTER.unpack(remote)
        return await self._fetch(tenant, phash, n, self.keys.anchor(tenant, anchor), try_redis=True,
                                 rejections=rejections, on_transfer=early.transferring.set)

    async def finish_early_lookup(
        self, early: EarlyRead, tenant: str, conversation_id: str, token_ids: Sequence[int],
        rejections: list[str] | None = None,
    ) -> CacheHit | None:
        """`lookup(tenant, conversation_id, token_ids)` for a lookup that `begin_turn` began early:
        its state if it summarises exactly `token_ids` (the conversation's log but its last, pending
        token), else the checked lookup, which never loads a state that does not summarise a prefix
        of `token_ids`."""
        # hashed once the transfer runs in the reader threads: before that, the read's own steps on
        # this loop (manifest, decoder) come first, and the hash would only delay them
        await early.wait_transferring()
        want = PrefixHasher(token_ids).prefix_hash(len(token_ids))
        hit = await early.task
        if hit is not None and hit.num_tokens == len(token_ids) and want == hit.prefix_hash:
            self._count("lookups")
            return self._hit(hit)
        if hit is not None:
            self._count("early_reads_unused")
        return await self.lookup(tenant, conversation_id, token_ids, rejections=rejections)

    def _hit(self, hit: CacheHit) -> CacheHit:
        self._count(f"lookup_hits_{hit.tier}")
        self._count("cached_tokens", hit.num_tokens)
        return hit

    async def _fetch(
        self, tenant: str, phash: bytes, n: int, anchor_key: str, try_redis: bool,
        rejections: list[str] | None = None, on_transfer: Callable[[], None] | None = None,
    ) -> CacheHit | None:
        snap_key = self.keys.snapshot(tenant, phash)
        entry = self.host.get(snap_key)
        if entry is not None and entry.num_tokens == n and entry.prefix_hash == phash:
            return CacheHit(n, phash, entry.tensors, "host")
        if not try_redis or self.redis is None:
            return None
        return await self.flights.do(("fetch", snap_key),
                                     lambda: self._fetch_redis(snap_key, phash, n, anchor_key, rejections,
                                                               on_transfer))

    async def _fetch_redis(
        self, snap_key: str, phash: bytes, n: int, anchor_key: str, rejections: list[str] | None = None,
        on_transfer: Callable[[], None] | None = None,
    ) -> CacheHit | None:
        assert self.redis is not None

        pinned = self.pinned_sets

        def ready_set(header: SnapshotHeader) -> dict[str, torch.Tensor] | None:
            assert pinned is not None
            return pinned.take(layout_of(header))  # and refills later, off this read's path

        def open_decoder(header_bytes: bytes) -> SnapshotDecoder:
            # straight from the Redis chunks into the tensors (pinned on CUDA, so promotion below
            # needs no second copy and the copy into a device slot is a DMA), ready ones if any
            return SnapshotDecoder(header_bytes, fingerprint=self.fingerprint, prefix_hash=phash,
                                   pin_memory=self.host.pin_memory, restore_dtype=self.widen_on_host,
                                   stage_device=self.stage_device, per_tensor=pinned is not None,
                                   buffers=ready_set if pinned is not None else None)

        async def feed(decoder: SnapshotDecoder, parts: list[bytes]) -> None:
            await self._offload(sum(len(p) for p in parts), decoder.feed, parts)

        try:
            # chunks received in place over plain sockets, or streamed through `feed` without them
            decoder = await self.redis.read_snapshot_into(snap_key, open_decoder, feed, on_transfer)
            if decoder is None:
                return None
            snap = await self._offload(decoder.finish_bytes, decoder.finish)
        except SnapshotError as e:
            # Never loaded, and deleted so the next lookup does not pay for it again.
            self._count(f"rejected_{e.reason}")
            if rejections is not None:  # only the caller that led the fetch hears why
                rejections.append(e.reason)
            log.warning("state snapshot %s rejected: %s", snap_key, e)
            await self.redis.delete_snapshot(snap_key)
            return None
        if snap.num_tokens != n:
            self._count("rejected_prefix_mismatch")
            return None
        nbytes = tensors_nbytes(snap.tensors)
        owned = snap.tensors  # decoded into fresh (pinned when the host tier pins) memory: owned
        self._host_put(snap_key, anchor_key, HostEntry(owned, n, phash, nbytes))
        if decoder.staged is not None:  # already on the device: the host tier keeps the pinned copy
            self._count("redis_reads_staged")
            return CacheHit(n, phash, decoder.staged, "redis")
        return CacheHit(n, phash, owned, "redis")

    @asynccontextmanager
    async def prefill_once(self, tenant: str, token_ids: Sequence[int]) -> AsyncIterator[bool]:
        """Single-flight for identical concurrent prompts of one tenant.

        Yields True to the first caller, who should prefill and `store` before leaving the block;
        the others wait for it, get False, and should `lookup_prefix` again (and prefill
        themselves only if that still misses, e.g. because the leader failed).
        """
        hasher = PrefixHasher(token_ids)
        key = ("prefill", tenant, hasher.prefix_hash(len(token_ids)))
        async with self.flights.claim(key) as is_leader:
            if not is_leader:
                self._count("prefill_waits")
            yield is_leader

    # -- token logs -------------------------------------------------------------------------------
    async def get_token_log(self, tenant: str, conversation_id: str) -> list[int] | None:
        """The conversation's token ids: Redis (shared by replicas) first, then this process."""
        key = self.keys.token_log(tenant, conversation_id)
        return self._log_from(key, None if self.log_redis is None else await self.log_redis.get_token_log(key))

    def _log_from(self, key: str, remote: list[int] | None) -> list[int] | None:
        """The log Redis gave (remembered here), else this process's own copy."""
        if remote is not None:
            self._remember(self._logs, key, remote)
            return remote
        # Not copied: a committed log is never mutated (turns build new lists), and handing out the
        # list the engine committed lets its device tier recognise its own log by identity instead
        # of comparing 32K ids (`ParkedState.summarises`).
        return self._logs.get(key)

    async def set_token_log(
        self, tenant: str, conversation_id: str, token_ids: Sequence[int], lease: Lease | None = None
    ) -> bool:
        """Stores a committed turn's whole log. Redis takes it only if it extends the stored log (or
        none is stored) and, with the turn's `lease` held in Redis, only while that lease is still
        this turn's: a turn that outlived its lease, or ran on a stale log while Redis was
        unreachable, cannot erase the turns taken since. Such a write is refused here too and
        counted (`token_log_writes_fenced`, `token_log_writes_diverged`); returns False then."""
        key = self.keys.token_log(tenant, conversation_id)
        ids = token_ids if isinstance(token_ids, list) else list(token_ids)
        if self.log_redis is None:
            self._remember(self._logs, key, ids)
            return True
        leased = lease is not None and lease.is_distributed
        outcome = await self.log_redis.set_token_log_checked(
            key, ids, lease.key if leased and lease else None, lease.token if leased and lease else None)
        if self._log_write_refused(conversation_id, outcome):
            return False
        self._remember(self._logs, key, ids)
        return True

    def _log_write_refused(self, conversation_id: str, outcome: str | None) -> bool:
        """Counts a checked log write's outcome (`RedisTier.set_token_log_checked`); True if refused."""
        if outcome is None:
            self._count("token_log_writes_skipped")
        elif outcome != "written":
            self._count("token_log_writes_fenced" if outcome == "lease_lost" else "token_log_writes_diverged")
            log.warning("token log of %r not written: %s", conversation_id,
                        "its turn lease was lost" if outcome == "lease_lost" else "another turn was committed since")
            return True
        return False

    async def append_token_log(
        self, tenant: str, conversation_id: str, new_ids: Sequence[int]
    ) -> list[int]:
        """Appends a committed turn's tokens; returns the whole log.

        Redis gets an APPEND if its copy has the length this process knows, else (it missed an
        append during an outage, or expired) the whole log is rewritten if it extends Redis' copy.
        """
        key = self.keys.token_log(tenant, conversation_id)
        old = self._logs.get(key)
        if old is None:
            old = await self.get_token_log(tenant, conversation_id) or []
        new_log = [*old, *new_ids]
        self._remember(self._logs, key, new_log)
        if self.log_redis is not None:
            if not await self.log_redis.append_token_log(key, new_ids, expected_len=len(old)):
                # Redis missed appends (an outage) or expired the log: rewrite it, but only as an
                # extension of what it holds, never over turns another replica appended
                self._log_write_refused(conversation_id, await self.log_redis.set_token_log_checked(key, new_log))
        return list(new_log)

    # -- turn lease -------------------------------------------------------------------------------
    async def acquire_lease(self, tenant: str, conversation_id: str, ttl_s: float = 120.0) -> Lease | None:
        """Exclusive right to run one turn; None when another turn holds it (answer 409).

        The lease expires after `ttl_s` even if its holder dies; `extend_lease` for long turns.
        With Redis unreachable it falls back to this replica only (is_distributed False).
        """
        key = self.keys.lease(tenant, conversation_id)
        if self._local_lease_held(key):
            return None
        token = os.urandom(16).hex()
        got = None if self.log_redis is None else await self.log_redis.acquire_lease(key, token, ttl_s)
        return self._grant_lease(key, token, ttl_s, got)

    def _local_lease_held(self, key: str) -> bool:
        held = self._leases.get(key)
        if held is not None and held[1] > time.monotonic():
            self._count("lease_conflicts")
            return True
        return False

    def _grant_lease(self, key: str, token: str, ttl_s: float, got: bool | None) -> Lease | None:
        """The lease after Redis answered `got` (None: no Redis, or it could not say)."""
        if got is False:
            self._count("lease_conflicts")
            return None
        if got is None and self.log_redis is not None:
            self._count("lease_local_only")
        self._leases[key] = (token, time.monotonic() + ttl_s)
        return Lease(key, token, got is True)

    async def begin_turn(
        self, tenant: str, conversation_id: str, ttl_s: float = 120.0, early_read: bool = False,
        rejections: list[str] | None = None,
    ) -> TurnStart | None:
        """`acquire_lease`, then `get_token_log` and, with `early_read` on a replica that holds no
        pointer of the conversation, the early read of its state (checked against the log by
        `finish_early_lookup` before anything uses it). The lease, the log and the pointer are
        asked of Redis in one round trip (`RedisTier.acquire_lease_and_get`) where one Redis holds
        them all: on the H200 host these were three sequential round trips before the state's read
        could start. None when another turn holds the lease (answer 409)."""
        key = self.keys.lease(tenant, conversation_id)
        if self._local_lease_held(key):
            return None
        token = os.urandom(16).hex()
        log_key = self.keys.token_log(tenant, conversation_id)
        early = early_read and self._wants_early_read(tenant, conversation_id)
        with_pointer = early and self.redis is self.log_redis
        if self.log_redis is None:
            got: bool | None = None
            remote: list[bytes | None] = []
        else:
            read_keys = [log_key] + ([self.keys.conversation(tenant, conversation_id)] if with_pointer else [])
            got, remote = await self.log_redis.acquire_lease_and_get(key, token, ttl_s, read_keys)
        lease = self._grant_lease(key, token, ttl_s, got)
        if lease is None:
            return None
        task = None
        if early:
            pointer: bytes | None | _Unread = remote[1] if with_pointer and remote else UNREAD
            task = self._start_early(tenant, conversation_id, rejections, pointer)
            try:
                # the read's steps on this loop first; the log is decoded while its payload arrives
                await task.wait_transferring()
            except BaseException:
                # cancelled (the client left) before the caller holds the lease: give it back now,
                # or the conversation would answer 409 until the lease expired
                task.cancel()
                self._drop_local_lease(lease)
                release = asyncio.ensure_future(self.release_lease(lease))
                self._pending.add(release)  # held until done (and awaited by `flush`)
                release.add_done_callback(self._pending.discard)
                raise
        return TurnStart(lease, self._log_from(log_key, decode_token_log(remote[0]) if remote else None), task)

    async def extend_lease(self, lease: Lease, ttl_s: float = 120.0) -> bool:
        held = self._leases.get(lease.key)
        if held is None or held[0] != lease.token:
            return False
        self._leases[lease.key] = (lease.token, time.monotonic() + ttl_s)
        if lease.is_distributed and self.log_redis is not None:
            return await self.log_redis.extend_lease(lease.key, lease.token, ttl_s)
        return True

    async def release_lease(self, lease: Lease) -> None:
        self._drop_local_lease(lease)
        if lease.is_distributed and self.log_redis is not None:
            await self.log_redis.release_lease(lease.key, lease.token)

    def _drop_local_lease(self, lease: Lease) -> None:
        held = self._leases.get(lease.key)
        if held is not None and held[0] == lease.token:
            del self._leases[lease.key]

    # -- metrics ----------------------------------------------------------------------------------
    @property
    def num_local_conversations(self) -> int:
        """Conversations whose token log this process holds."""
        return len(self._logs)

    def stats(self) -> dict[str, int | str]:
        """Flat counters for /metrics: cache events, host tier, Redis tier, pending writes."""
        out: dict[str, int | str] = dict(self.counters)
        out.update(self.host.stats())
        out["pending_write_bytes"] = self._pending_bytes
        out["prefill_waits_total"] = self.flights.num_waits
        out["fetches_coalesced"] = self.flights.num_coalesced
        if self.pinned_sets is not None:
            out.update(self.pinned_sets.stats())
        if self.redis is not None:
            out.update(self.redis.stats())
        if self.log_redis is not None and self.log_redis is not self.redis:
            out.update({f"log_{k}": v for k, v in self.log_redis.stats().items()})
        return out
