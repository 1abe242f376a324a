"""`ConversationStore` (server/conversations.py) on top of `TieredStateCache`: the engine's drop-in.

The engine calls `acquire`/`release`/`commit` from its step thread and `load` on the event loop.
`commit` only schedules work on the loop and leaves a future behind; the next `load` of the same
conversation waits for it, so a turn always sees the previous turn's commit. The Redis turn lease
is taken in `load` (async) and released only after the commit has reached Redis, so another
replica that wins the lease next reads the new log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from server.conversations import ConversationKey, ConversationSnapshot, PrefixHit
from server.errors import ConversationBusy
from server.state_cache.tiered import Lease, TieredStateCache

log = logging.getLogger(__name__)


class TieredConversationStore:
    """Conversations as token logs (source of truth) plus cached states, across replicas.

    Args:
        cache: the tiered cache (host LRU + optional Redis).
        lease_ttl_s: a turn's lease lifetime; a crashed replica blocks its conversation this long.
        wait_for_redis: finish the Redis snapshot write before the lease is released, so the next
            turn on another replica resumes from it instead of rebuilding from the log.
        early_read: on a replica that holds no pointer of the conversation, start reading its
            state from Redis while the token log is still being fetched, and check it against the
            log afterwards (`TieredStateCache.begin_turn`). Off unless asked here; the server
            turns it on from `Settings.redis_early_read` (on by default since measured on the
            H200: ~2 ms off a resumed turn).

    Example:
        >>> store = TieredConversationStore(TieredStateCache(fp, host_budget_bytes=8 << 30, redis=tier))
        >>> engine = AsyncEngine(model, tokenizer, settings, store)
    """

    def __init__(self, cache: TieredStateCache, lease_ttl_s: float = 600.0, wait_for_redis: bool = True,
                 early_read: bool = False) -> None:
        self.cache = cache
        self.lease_ttl_s = lease_ttl_s
        self.wait_for_redis = wait_for_redis
        self.early_read = early_read
        self._lock = threading.Lock()
        self._busy: set[ConversationKey] = set()
        self._leases: dict[ConversationKey, Lease] = {}
        self._pending: dict[ConversationKey, concurrent.futures.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefix_writes: set[concurrent.futures.Future] = set()
        self._keepers: dict[ConversationKey, asyncio.Task] = {}  # lease renewals of turns in progress
        self.num_loads = 0
        self.num_lease_renewals_failed = 0
        self.num_resumed = 0
        self.num_resident = 0  # loads that skipped the lookup: the engine's slot holds the state
        self.num_rebuilds = 0
        self.num_new = 0
        self.on_rebuild: Callable[[str], None] | None = None  # called with rebuild_reason(...) (Prometheus)

    def acquire(self, key: ConversationKey) -> None:
        with self._lock:
            if key in self._busy:
                raise _busy(key)
            self._busy.add(key)

    async def load(
        self, key: ConversationKey, resident: Callable[[list[int]], bool] | None = None
    ) -> ConversationSnapshot | None:
        """The log and, when a state for exactly `log[:-1]` is cached, that state.

        When `resident(log)` says the engine's slot still holds that state, the lookup is skipped:
        it would hash the whole log and, with the host copy evicted, read 48 MiB from Redis only
        for the engine to discard it.

        Raises ConversationBusy when another replica holds the turn lease.
        """
        self._loop = asyncio.get_running_loop()
        pending = self._pending.get(key)
        if pending is not None:
            # The previous turn's commit and lease release; their failure is not this turn's.
            await asyncio.wait([asyncio.wrap_future(pending)])
        rejections: list[str] = []
        # lease, log and (for the early read) the pointer in one round trip
        start = await self.cache.begin_turn(key.tenant, key.conversation_id, self.lease_ttl_s,
                                            early_read=self.early_read, rejections=rejections)
        if start is None:
            raise _busy(key)
        lease, log, early = start.lease, start.log, start.early
        with self._lock:
            self._leases[key] = lease
        if lease.is_distributed:
            self._keepers[key] = asyncio.create_task(self._keep_alive(lease))
        self.num_loads += 1
        try:
            if not log:
                self.num_new += 1
                return None
            if resident is not None and resident(log):
                self.num_resident += 1
                return ConversationSnapshot(log, None)
            if early is not None:
                hit = await self.cache.finish_early_lookup(early, key.tenant, key.conversation_id, log[:-1],
                                                           rejections=rejections)
            else:
                hit = await self.cache.lookup(key.tenant, key.conversation_id, log[:-1], rejections=rejections)
        finally:
            if early is not None:
                early.cancel()  # unless done: never checked against the log; a shielded Redis read finishes alone
        if hit is None or hit.num_tokens != len(log) - 1:
            # Missing, evicted, corrupt, foreign or stale: the engine prefills the log instead.
            self.num_rebuilds += 1
            if self.on_rebuild is not None:
                self.on_rebuild(rebuild_reason(rejections))
            return ConversationSnapshot(log, None)
        self.num_resumed += 1
        return ConversationSnapshot(log, hit.tensors)

    async def lookup_prefix(self, tenant: str, token_ids: list[int]) -> PrefixHit | None:
        """The longest cached prefix state of `token_ids`: prompt ends, turn ends, any replica."""
        self._loop = asyncio.get_running_loop()
        hit = await self.cache.lookup_prefix(tenant, token_ids)
        return PrefixHit(hit.num_tokens, hit.tensors) if hit is not None else None

    def store_prefix(self, tenant: str, token_ids: list[int], state: dict[str, Any]) -> None:
        """Schedules the store on the loop; never blocks the engine step."""
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._store_prefix(tenant, token_ids, state), self._loop)
        with self._lock:
            self._prefix_writes.add(fut)
        fut.add_done_callback(self._prefix_written)

    def _prefix_written(self, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._prefix_writes.discard(fut)

    async def _store_prefix(self, tenant: str, token_ids: list[int], state: dict[str, Any]) -> None:
        try:
            await self.cache.store(tenant, token_ids, state)
        except Exception:  # a lost prefix state only means a longer prefill later
            log.exception("storing a prefix state failed")

    async def _keep_alive(self, lease: Lease) -> None:
        """Renews a turn's lease every third of its lifetime until the turn is released, so a turn
        longer than `lease_ttl_s` keeps it. A failed renewal (Redis unreachable, or the lease
        already gone) is counted and retried; the checked log write at commit has the last word."""
        while True:
            await asyncio.sleep(self.lease_ttl_s / 3)
            if not await self.cache.extend_lease(lease, self.lease_ttl_s):
                self.num_lease_renewals_failed += 1
                log.warning("renewing the turn lease %s failed", lease.key)

    def commit(self, key: ConversationKey, snapshot: ConversationSnapshot) -> None:
        """Schedules the write; never blocks the engine step."""
        with self._lock:
            lease = self._leases.get(key)
        self._schedule(key, self._commit(key, snapshot, lease))

    def release(self, key: ConversationKey) -> None:
        with self._lock:
            self._busy.discard(key)
            lease = self._leases.pop(key, None)
            after = self._pending.get(key)
        if lease is not None:
            self._schedule(key, self._release(key, lease, after))

    def _schedule(self, key: ConversationKey, coro: Coroutine[Any, Any, None]) -> None:
        if self._loop is None:  # nothing was loaded yet, so nothing can be committed or leased
            coro.close()
            return
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        with self._lock:
            self._pending[key] = fut
        fut.add_done_callback(lambda f: self._forget(key, f))

    def _forget(self, key: ConversationKey, fut: concurrent.futures.Future) -> None:
        with self._lock:
            if self._pending.get(key) is fut:
                del self._pending[key]

    async def _commit(self, key: ConversationKey, snapshot: ConversationSnapshot, lease: Lease | None = None) -> None:
        log_ids = snapshot.token_ids
        try:
            if snapshot.state is not None:
                await self.cache.store(
                    key.tenant, log_ids[:-1], snapshot.state, conversation_id=key.conversation_id,
                    wait_for_redis=self.wait_for_redis,
                )
            # checked: the log must extend the stored one and the lease must still be this turn's,
            # else the turn taken since keeps the log (the state stored above is then only a
            # prefix state, and the pointer a stale one that the next load rejects against the log)
            await self.cache.set_token_log(key.tenant, key.conversation_id, log_ids, lease=lease)
        except Exception:  # the turn already answered; a lost commit means a rebuild later
            log.exception("committing conversation %r failed", key.conversation_id)

    async def wait_committed(self, key: ConversationKey, timeout_s: float = 30.0) -> None:
        """Waits until the turn committed for `key` is written (or failed: Redis trouble is a miss).

        The engine awaits this before a turn's final output reaches the client, so an acknowledged
        turn survives a crash of this replica. Bounded: Redis calls have their own timeouts.
        """
        with self._lock:
            fut = self._pending.get(key)
        if fut is not None:
            await asyncio.wait([asyncio.wrap_future(fut)], timeout=timeout_s)

    async def flush(self) -> None:
        """Waits for scheduled commits and lease releases (shutdown, tests)."""
        while pending := self._unfinished():
            await asyncio.wait([asyncio.wrap_future(f) for f in pending])
        await self.cache.flush()

    def _unfinished(self) -> list[concurrent.futures.Future]:
        with self._lock:
            return [*self._pending.values(), *self._prefix_writes]

    async def _release(self, key: ConversationKey, lease: Lease, after: concurrent.futures.Future | None) -> None:
        if after is not None:
            await asyncio.wait([asyncio.wrap_future(after)])
        keeper = self._keepers.pop(key, None)
        if keeper is not None:
            keeper.cancel()
        await self.cache.release_lease(lease)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "conversation_loads": self.num_loads,
            "conversation_resumed": self.num_resumed,
            "conversation_resident": self.num_resident,
            "conversation_rebuilds": self.num_rebuilds,
            "conversation_new": self.num_new,
            "lease_renewals_failed": self.num_lease_renewals_failed,
            "conversations": self.cache.num_local_conversations,
            "busy": len(self._busy),
        }
        out.update(self.cache.stats())
        with self._lock:  # host copies of prefix snapshots and commits still in flight
            out["pending_writes"] = len(self._prefix_writes) + sum(not f.done() for f in self._pending.values())
        return out


def rebuild_reason(rejections: list[str]) -> str:
    """Why a conversation's state is rebuilt from its log, in the metric's terms: a snapshot that
    failed its checksum or format ("corrupt"), one from other weights ("fingerprint"), else none
    usable was found ("missing": evicted, expired, never written, or Redis unreachable)."""
    if "model_mismatch" in rejections:
        return "fingerprint"
    if "corrupt" in rejections or "invalid" in rejections:
        return "corrupt"
    return "missing"


def _busy(key: ConversationKey) -> ConversationBusy:
    return ConversationBusy(
        f"conversation {key.conversation_id!r} already has a turn in progress; retry when it ends",
        param="conversation_id",
    )
