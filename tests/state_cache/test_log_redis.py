"""Token logs and turn leases in a Redis of their own (`redis_log_url`), states in another.

Logs are the conversations' source of truth and states a cache of them. With one instance every key
carries a TTL, so an evicting policy can take a log as readily as a state; with two, the states'
instance may evict (here: lose) everything and every conversation still continues, rebuilt from its
log, equal to the replay.
"""

from __future__ import annotations

import asyncio

import pytest
import redis

from server.conversations import ConversationKey
from server.metrics import Metrics, StateCacheMetrics
from server.settings import Settings
from server.state_cache.conversation_store import TieredConversationStore
from server.state_cache.redis_tier import RedisTier
from tests.server.conftest import BASE_SETTINGS
from tests.server.test_conversations import _replay_ids
from tests.state_cache.test_conversation_store import Moving, ns, start_with_store, turn
from tests.state_cache.test_tiered_cache import new_cache

pytestmark = pytest.mark.redis


def keys_of(url: str, prefix: str) -> set[str]:
    return {k.decode() for k in redis.Redis.from_url(url).scan_iter(f"{prefix}*")}


def test_logs_and_leases_live_only_in_the_log_instance(redis_proc, own_redis):
    prefix = ns()
    key = ConversationKey("t", "c")

    async def main() -> dict:
        log_tier = RedisTier(own_redis.url, op_timeout_s=5, bulk_connections=0)
        store = TieredConversationStore(new_cache(redis_proc.url, prefix, log_redis=log_tier))
        assert store.cache.log_redis is log_tier and store.cache.redis is not log_tier
        StateCacheMetrics(metrics, store)  # both instances' calls are timed
        await turn(store, key, [1, 2, 3], state_seed=1)
        await store.flush()
        log_key, lease_key = store.cache.keys.token_log("t", "c"), store.cache.keys.lease("t", "c")
        store.acquire(key)
        try:
            await store.load(key)
            # the turn's lease: in the log instance, not the states'
            assert redis.Redis.from_url(own_redis.url).exists(lease_key)
            assert not redis.Redis.from_url(redis_proc.url).exists(lease_key)
        finally:
            store.release(key)
        await store.flush()
        states, logs = keys_of(redis_proc.url, prefix), keys_of(own_redis.url, prefix)
        assert log_key in logs and log_key not in states
        assert all(":snap:" not in k and ":conv:" not in k for k in logs), logs
        assert any(":snap:" in k for k in states) and any(":conv:" in k for k in states)
        stats = store.stats()
        await store.cache.close()
        return stats

    metrics = Metrics(process_metrics=False)
    stats = asyncio.run(main())
    assert stats["log_redis_breaker_state"] == "closed" and stats["redis_breaker_state"] == "closed"
    text = metrics.render()[0].decode()
    for op in ("lease", "other", "put"):  # leases and log GET/SETs from the log instance, states from the other
        assert f'gla:redis_op_latency_seconds_count{{op="{op}"}} 0.0' not in text, op


def test_a_state_instance_that_loses_everything_loses_no_conversation(redis_proc, own_redis):
    prefix = ns()
    key = ConversationKey("t", "c")

    async def main() -> tuple[list[int], dict]:
        def store() -> TieredConversationStore:
            log_tier = RedisTier(own_redis.url, op_timeout_s=5, bulk_connections=0)
            return TieredConversationStore(new_cache(redis_proc.url, prefix, host_budget_bytes=0, log_redis=log_tier))

        a = store()
        await turn(a, key, [1, 2, 3], state_seed=1)
        await turn(a, key, [4, 5], state_seed=2)
        await a.flush()
        for k in keys_of(redis_proc.url, prefix):  # an evicting instance under pressure, at its worst
            redis.Redis.from_url(redis_proc.url).delete(k)
        b = store()  # another replica
        snap = await turn(b, key, [6], state_seed=3, commit=False)
        await b.flush()
        return snap.token_ids, b.stats()

    log, stats = asyncio.run(main())
    assert log == [1, 2, 3, 4, 5]  # the whole history, from the log instance
    assert stats["conversation_rebuilds"] == 1 and stats["conversation_new"] == 0


@pytest.mark.slow
def test_servers_with_a_log_instance_continue_after_the_state_instance_is_wiped(redis_proc, own_redis):
    """Two servers, states in one Redis and logs in another: turn 2 on B resumes A's state; after
    the states' Redis is wiped, turn 3 on B rebuilds from the log and equals the replay."""
    prefix = ns().rstrip(":")
    settings = Settings(**BASE_SETTINGS, redis_url=redis_proc.url, redis_log_url=own_redis.url,
                        redis_key_prefix=prefix, resident_conversations=False, host_cache_bytes=0,
                        redis_timeout_s=5)
    a, b = start_with_store(settings), start_with_store(settings)
    try:
        conv = Moving(a, b, "two-instances")
        conv.a_then_b("B resumed from the state A left in the states' Redis")
        r = redis.Redis.from_url(redis_proc.url)
        for k in r.scan_iter(f"{prefix}:*"):
            r.delete(k)
        third = conv.turn(conv.cb, 2)
        assert not third["state_cached"]
        assert third["usage"]["prompt_tokens"] == len(_replay_ids(b, conv.turns, 2))  # the whole history
        assert conv.replays(2)
        assert b.health()["cache"]["conversation_rebuilds"] == 1
    finally:
        a.stop()
        b.stop()


def test_without_a_log_instance_logs_share_the_state_instance(redis_proc):
    cache = new_cache(redis_proc.url, ns())
    assert cache.log_redis is cache.redis
    assert new_cache(None, ns()).log_redis is None


def test_a_log_instance_alone_shares_logs_while_states_stay_in_process(redis_proc):
    prefix = ns()

    async def main() -> list[int] | None:
        a = new_cache(None, prefix, log_redis=RedisTier(redis_proc.url, op_timeout_s=5, bulk_connections=0))
        await a.set_token_log("t", "c", [7, 8, 9])
        b = new_cache(None, prefix, log_redis=RedisTier(redis_proc.url, op_timeout_s=5, bulk_connections=0))
        got = await b.get_token_log("t", "c")  # another replica reads the log
        await a.close()
        await b.close()
        return got

    assert asyncio.run(main()) == [7, 8, 9]
    assert not any(":snap:" in k for k in keys_of(redis_proc.url, prefix))


def test_a_log_instance_outage_is_not_an_error(redis_proc, own_redis):
    """The log instance down: turns still run (leases local to the replica, logs kept in process)
    and resume from the states' instance; when it returns, the next commit writes the whole log."""
    prefix = ns()
    key = ConversationKey("t", "c")

    async def main() -> tuple[list[int] | None, dict]:
        log_tier = RedisTier(own_redis.url, op_timeout_s=5, bulk_connections=0, failure_threshold=1,
                             base_backoff_s=0.05, max_backoff_s=0.1)
        store = TieredConversationStore(new_cache(redis_proc.url, prefix, log_redis=log_tier))
        await turn(store, key, [1, 2, 3], state_seed=1)
        await store.flush()
        own_redis.stop()
        snap = await turn(store, key, [4], state_seed=2)  # no exception, the state still resumes
        assert snap is not None and snap.token_ids == [1, 2, 3] and snap.state is not None
        await store.flush()
        own_redis.start()  # same port, empty
        await asyncio.sleep(0.2)  # the breaker's backoff
        for _ in range(50):
            if await turn(store, key, [5], state_seed=3) is not None and log_tier.breaker.state == "closed":
                break
            await asyncio.sleep(0.05)
        await store.flush()
        remote = await RedisTier(own_redis.url, bulk_connections=0).get_token_log(store.cache.keys.token_log("t", "c"))
        stats = store.stats()
        await store.cache.close()
        return remote, stats

    remote, stats = asyncio.run(main())
    assert stats["lease_local_only"] >= 1
    assert remote is not None and remote[:5] == [1, 2, 3, 4, 5]  # the whole log, written again
