"""The early Redis read (`TieredConversationStore(early_read=True)`, `GLA_REDIS_EARLY_READ`).

A replica that has not seen a conversation starts reading the state its shared pointer names while
the token log is still on its way, and uses it only if it summarises exactly the log but its pending
token. Against a real redis-server: the state it resumes from equals the one committed on the
other replica; a state behind the log is read but not used (the turn is rebuilt, as without the
early read); a replica that knows the conversation, a new conversation and a Redis outage start
nothing or leave nothing running.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from server.conversations import ConversationKey
from server.settings import Settings
from server.state_cache.conversation_store import TieredConversationStore
from server.state_cache.factory import build_conversation_store
from tests.server.conftest import BASE_SETTINGS
from tests.state_cache.helpers import assert_state_equal, make_state
from tests.state_cache.test_conversation_store import Moving, start_with_store, turn
from tests.state_cache.test_tiered_cache import FP, new_cache

pytestmark = pytest.mark.redis
KEY = ConversationKey("t", "c")


def ns() -> str:
    return f"er{uuid.uuid4().hex[:8]}:"


async def early_tasks() -> list[asyncio.Task]:
    """Early reads still running a moment after the load returned (a cancelled one needs a loop turn
    to finish)."""
    await asyncio.sleep(0.05)
    return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__name__", "") == "_early_fetch"
            and not t.done()]


async def started_on_a(url: str, prefix: str) -> TieredConversationStore:
    """Turn 1 ([1, 2, 3], state seed 1) committed on replica A and flushed to Redis; returns A."""
    a = TieredConversationStore(new_cache(url, prefix))
    await turn(a, KEY, [1, 2, 3], state_seed=1)
    await a.flush()
    return a


def cold_replica(url: str, prefix: str) -> TieredConversationStore:
    return TieredConversationStore(new_cache(url, prefix), early_read=True)


def test_a_cold_replica_resumes_from_the_early_read(redis_proc):
    prefix = ns()

    async def main():
        await started_on_a(redis_proc.url, prefix)
        b = cold_replica(redis_proc.url, prefix)
        snap = await turn(b, KEY, [4, 5], state_seed=2)
        assert snap.token_ids == [1, 2, 3]
        assert_state_equal(snap.state, make_state(seed=1))
        first = b.stats()
        # B committed turn 2, so it holds the pointer: its next turn starts no early read
        snap = await turn(b, KEY, [6], state_seed=3)
        assert snap.token_ids == [1, 2, 3, 4, 5]
        assert_state_equal(snap.state, make_state(seed=2))
        await b.flush()
        return first, b.stats()

    first, last = asyncio.run(main())
    assert first["early_reads"] == 1 and first["lookup_hits_redis"] == 1 and first["lookups"] == 1
    assert "early_reads_unused" not in first and first["conversation_resumed"] == 1
    assert last["early_reads"] == 1 and last["lookup_hits_host"] == 1 and last["conversation_resumed"] == 2


def test_with_logs_in_their_own_redis_the_early_read_asks_for_the_pointer_itself(redis_proc, own_redis):
    """The lease, the log and the pointer come in one round trip only when one Redis holds them
    all (`TieredStateCache.begin_turn`); with a separate log Redis the early read reads the
    pointer from the state Redis itself, and still resumes from the committed state."""
    from server.state_cache.redis_tier import RedisTier

    prefix = ns()

    def store(early: bool) -> TieredConversationStore:
        log_tier = RedisTier(own_redis.url, op_timeout_s=5, bulk_connections=0)
        return TieredConversationStore(new_cache(redis_proc.url, prefix, log_redis=log_tier), early_read=early)

    async def main():
        a = store(False)
        await turn(a, KEY, [1, 2, 3], state_seed=1)
        await a.flush()
        b = store(True)
        snap = await turn(b, KEY, [4, 5], state_seed=2)
        assert snap.token_ids == [1, 2, 3]
        assert_state_equal(snap.state, make_state(seed=1))
        return b.stats()

    stats = asyncio.run(main())
    assert stats["early_reads"] == 1 and stats["lookup_hits_redis"] == 1 and stats["conversation_resumed"] == 1
    assert "early_reads_unused" not in stats


def test_an_early_read_behind_the_log_is_not_used(redis_proc):
    prefix = ns()

    async def main():
        a = await started_on_a(redis_proc.url, prefix)
        # the log moves on without a state for it (e.g. that turn's snapshot write was skipped)
        assert await a.cache.set_token_log("t", "c", [1, 2, 3, 4, 5])
        b = cold_replica(redis_proc.url, prefix)
        snap = await turn(b, KEY, [6], state_seed=2, commit=False)
        await b.flush()
        return snap, b.stats()

    snap, stats = asyncio.run(main())
    assert snap.token_ids == [1, 2, 3, 4, 5] and snap.state is None  # rebuilt from the log
    assert stats["early_reads"] == 1 and stats["early_reads_unused"] == 1
    assert stats["conversation_rebuilds"] == 1 and stats["conversation_resumed"] == 0
    # the checked lookup found the early read's copy in the host tier (its state for [1, 2] is a
    # prefix of the log, just not all of it): Redis was read once
    assert stats["lookup_hits_host"] == 1 and "lookup_hits_redis" not in stats


def test_new_conversations_known_ones_and_outages_leave_no_early_read_running(redis_proc):
    prefix = ns()

    async def main():
        b = cold_replica(redis_proc.url, prefix)
        assert await turn(b, ConversationKey("t", "new"), [1, 2], state_seed=1) is None  # no log yet
        assert await early_tasks() == []
        await b.flush()
        known = (await turn(b, ConversationKey("t", "new"), [3], state_seed=2)).token_ids
        assert await early_tasks() == []
        await b.flush()
        stats = b.stats()
        # nothing listens at this Redis: the early read and the log both come back empty, no error
        down = cold_replica("redis://127.0.0.1:1/0", prefix)
        snap = await turn(down, ConversationKey("t", "other"), [9], state_seed=3, commit=False)
        assert await early_tasks() == []
        await down.flush()
        return known, stats, snap, down.stats()

    known, stats, snap, down = asyncio.run(main())
    assert known == [1, 2]
    assert stats["early_reads"] == 1  # only the first turn: then B held the pointer itself
    assert snap is None and down["early_reads"] == 1 and down["conversation_new"] == 1


def test_a_turn_cancelled_before_its_early_read_transfers_gives_its_lease_back(redis_proc, monkeypatch):
    """A client that leaves while the turn's start waits for the early read (after the lease was
    taken, before the store holds it) must not leave the lease behind: the next turn would get 409
    until it expired. The wait is held open here so the cancel lands inside it."""
    from server.state_cache import tiered

    prefix = ns()
    never = asyncio.Event()

    async def stuck(self) -> None:
        await never.wait()

    monkeypatch.setattr(tiered.EarlyRead, "wait_transferring", stuck)

    async def main():
        await started_on_a(redis_proc.url, prefix)
        b = cold_replica(redis_proc.url, prefix)
        start = asyncio.create_task(b.cache.begin_turn("t", "c", 30.0, early_read=True))
        for _ in range(500):  # until the lease is taken and the start waits on the early read
            await asyncio.sleep(0.01)
            if b.stats().get("early_reads"):
                break
        assert not start.done() and b.stats().get("early_reads") == 1
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        await b.cache.flush()
        left = await early_tasks()
        again = await cold_replica(redis_proc.url, prefix).cache.begin_turn("t", "c", 30.0)
        return left, again, b.stats()

    left, again, stats = asyncio.run(main())
    assert left == [] and stats["early_reads"] == 1
    assert again is not None and again.lease.is_distributed and again.log == [1, 2, 3]


def test_the_setting_reaches_the_store(redis_proc):
    on = build_conversation_store(Settings(redis_url=redis_proc.url), FP)  # the default
    off = build_conversation_store(Settings(redis_url=redis_proc.url, redis_early_read=False), FP)
    assert on.early_read and not off.early_read


def test_two_servers_over_http_the_early_read_resumes_and_equals_replay(redis_proc):
    """A starts the conversation; B, with the early read on, resumes it from Redis; the reply equals a
    replay of the whole history."""
    common = {**BASE_SETTINGS, "redis_url": redis_proc.url, "redis_key_prefix": ns().rstrip(":"),
              "redis_timeout_s": 5, "resident_conversations": False}
    a = start_with_store(Settings(**common))
    b = start_with_store(Settings(**common, redis_early_read=True))
    try:
        conv = Moving(a, b, "early")
        conv.a_then_b()
        assert conv.replays(1)
        cache_b = b.health()["cache"]
        assert cache_b["early_reads"] == 1 and cache_b["lookup_hits_redis"] == 1
        assert "early_reads_unused" not in cache_b
    finally:
        a.stop()
        b.stop()


def test_forget_local_makes_a_replica_cold_for_that_conversation_only(redis_proc):
    """What `e2e_server.py --cold-replica` relies on: after `forget_local` the replica that wrote
    the conversation starts an early read, as one that never saw it, and resumes the same state."""
    prefix = ns()
    other = ConversationKey("t", "other")

    async def main():
        a = TieredConversationStore(new_cache(redis_proc.url, prefix), early_read=True)
        await turn(a, KEY, [1, 2, 3], state_seed=1)
        await turn(a, other, [7, 8], state_seed=4)
        await a.flush()
        assert a.cache.stats()["host_entries"] == 2
        a.cache.forget_local(KEY.tenant, KEY.conversation_id)
        assert a.cache.stats()["host_entries"] == 1  # only that conversation's state left the host tier
        snap = await turn(a, KEY, [4], state_seed=2)
        kept = await turn(a, other, [9], state_seed=5)  # still known here: no early read
        await a.flush()
        return snap, kept, a.stats()

    snap, kept, stats = asyncio.run(main())
    assert snap.token_ids == [1, 2, 3] and kept.token_ids == [7, 8]
    assert_state_equal(snap.state, make_state(seed=1))
    assert_state_equal(kept.state, make_state(seed=4))
    # one early read per first turn (the replica knew neither conversation yet) and one after the forget
    assert stats["early_reads"] == 3 and stats["lookup_hits_redis"] == 1 and stats["lookup_hits_host"] == 1
