"""The tiered store's events reach Prometheus: tier hits, host evictions, Redis latency and errors by
op, and rebuilds by reason (corrupt, another model, missing), first through the store, then over HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from server.conversations import ConversationKey
from server.metrics import Metrics, StateCacheMetrics
from server.settings import Settings
from server.state_cache import encode_snapshot
from server.state_cache.conversation_store import TieredConversationStore, rebuild_reason
from server.state_cache.host import tensors_nbytes
from server.state_cache.keys import PrefixHasher, prefix_hash
from server.state_cache.tiered import TieredStateCache
from tests.server.conftest import BASE_SETTINGS
from tests.server.test_conversations import GREEDY, TURNS, _replay_ids
from tests.state_cache.helpers import fp, make_state
from tests.state_cache.test_conversation_store import FINGERPRINT, ns, start_with_store, turn
from tests.state_cache.test_tiered_cache import FP, _corrupt_first_chunk, new_cache

pytestmark = pytest.mark.redis


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return parse(text)[(name, tuple(sorted(labels.items())))]


def test_rebuild_reason_names_the_worst_rejection():
    assert rebuild_reason([]) == "missing"
    assert rebuild_reason(["prefix_mismatch"]) == "missing"
    assert rebuild_reason(["invalid"]) == rebuild_reason(["corrupt"]) == "corrupt"
    assert rebuild_reason(["corrupt", "model_mismatch"]) == "fingerprint"


def test_store_events_feed_tier_redis_and_rebuild_metrics(redis_proc):
    prefix = ns()
    key = ConversationKey("t", "c")
    snap_key_of = prefix_hash([1, 2])  # turn 1 commits the state of log [1, 2, 3] minus its last id

    async def main() -> tuple[str, dict, dict]:
        writer = TieredConversationStore(new_cache(redis_proc.url, prefix))
        await turn(writer, key, [1, 2, 3], state_seed=1)
        await writer.flush()
        m = Metrics(process_metrics=False)
        cold = TieredConversationStore(new_cache(redis_proc.url, prefix, host_budget_bytes=0))
        StateCacheMetrics(m, cold)
        snap = await turn(cold, key, [4], state_seed=2, commit=False)  # resumed from Redis
        assert snap is not None and snap.state is not None
        snap_key = cold.cache.keys.snapshot("t", snap_key_of)
        _corrupt_first_chunk(redis_proc, snap_key)
        assert (await turn(cold, key, [5], state_seed=3, commit=False)).state is None  # corrupt: rebuilt
        h = PrefixHasher([1, 2])
        foreign = encode_snapshot(make_state(), num_tokens=2, prefix_hash=h.prefix_hash(2), fingerprint=fp("model-b"))
        assert await cold.cache.redis.put_snapshot(snap_key, foreign)
        assert (await turn(cold, key, [6], state_seed=4, commit=False)).state is None  # another model's
        assert (await turn(cold, key, [7], state_seed=5, commit=False)).state is None  # deleted: missing
        await cold.flush()
        return m.render()[0].decode(), cold.stats(), writer.stats()

    text, stats, _ = asyncio.run(main())
    assert stats["conversation_rebuilds"] == 3 and stats["conversation_resumed"] == 1
    assert value(text, "gla:redis_up", instance="states") == 1
    for reason in ("corrupt", "fingerprint", "missing"):
        assert value(text, "gla:state_rebuilds_total", reason=reason) == 1, reason
    assert value(text, "gla:state_cache_hits_total", tier="redis") == 1
    assert value(text, "gla:state_cache_queries_total", tier="redis") == 4
    assert value(text, "gla:state_cache_queries_total", tier="host") == 0  # no host tier configured
    for op in ("get", "lease", "delete"):
        assert value(text, "gla:redis_op_latency_seconds_count", op=op) >= 1, op
    assert value(text, "gla:redis_errors_total", op="get") == 0


NBYTES = tensors_nbytes(make_state())


def test_host_evictions_and_bytes_are_exported():
    async def main() -> str:
        m = Metrics(process_metrics=False)
        cache = TieredStateCache(FP, host_budget_bytes=3 * NBYTES + 100, pin_memory=False)
        store = TieredConversationStore(cache)
        StateCacheMetrics(m, store)
        for i in range(5):  # room for three
            await cache.store("t", [i + 1, 7, 7], make_state(seed=i))
        assert await cache.lookup_prefix("t", [5, 7, 7, 9]) is not None
        assert await cache.lookup_prefix("t", [1, 7, 7, 9]) is None  # evicted first
        return m.render()[0].decode()

    text = asyncio.run(main())
    assert value(text, "gla:state_cache_evictions_total", tier="host") == 2
    assert value(text, "gla:state_cache_bytes", tier="host") == 3 * NBYTES
    assert value(text, "gla:state_cache_queries_total", tier="host") == 2
    assert value(text, "gla:state_cache_hits_total", tier="host") == 1


def test_redis_errors_are_counted_by_op_while_redis_is_down(own_redis):
    async def main() -> str:
        m = Metrics(process_metrics=False)
        cache = new_cache(own_redis.url, ns())
        StateCacheMetrics(m, TieredConversationStore(cache))
        own_redis.stop()
        assert await cache.get_token_log("t", "gone") is None  # a miss, not an exception
        await cache.close()
        return m.render()[0].decode()

    text = asyncio.run(main())
    assert value(text, "gla:redis_errors_total", op="other") == 1
    assert value(text, "gla:redis_op_latency_seconds_count", op="other") == 1
    # one instance serves both roles here, and its breaker opened on the failure
    assert value(text, "gla:redis_up", instance="states") == value(text, "gla:redis_up", instance="logs") == 0


@pytest.mark.slow
def test_server_metrics_show_redis_resume_and_a_corrupt_rebuild(redis_proc):
    """Over HTTP: turn 2 resumes from Redis (no host tier, no resident slot), turn 3 finds its
    snapshot corrupted, rebuilds from the log and still equals the replay; /metrics says so."""
    prefix = ns().rstrip(":")
    settings = Settings(**BASE_SETTINGS, redis_url=redis_proc.url, redis_key_prefix=prefix, host_cache_bytes=0,
                        resident_conversations=False, redis_timeout_s=5)
    srv = start_with_store(settings)
    assert srv.app is not None and FINGERPRINT
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"conversation_id": "metered", **GREEDY}
            turns = [c.post("/generate", json={"prompt": TURNS[0], **body}).json()]
            turns.append(c.post("/generate", json={"prompt": TURNS[1], **body}).json())
            assert turns[1]["state_cached"]
            m = c.get("/metrics").text
            assert value(m, "gla:state_cache_hits_total", tier="redis") >= 1
            assert value(m, "gla:redis_op_latency_seconds_count", op="put") >= 1
            assert value(m, "gla:redis_op_latency_seconds_count", op="get") >= 1
            assert value(m, "gla:state_rebuilds_total", reason="corrupt") == 0
            r = redis.Redis.from_url(redis_proc.url)
            for k in r.scan_iter(f"{prefix}:*:chunk:*"):
                r.setrange(k, 10, b"\x00\xff")
            turns.append(c.post("/generate", json={"prompt": TURNS[2], **body}).json())
            assert not turns[2]["state_cached"]
            replay = c.post("/generate", json={"prompt_token_ids": _replay_ids(srv, turns, 2), **GREEDY}).json()
            assert replay["token_ids"] == turns[2]["token_ids"]
            m = c.get("/metrics").text
            assert value(m, "gla:state_rebuilds_total", reason="corrupt") == 1
            assert value(m, "gla:state_rebuilds_total", reason="missing") == 0
    finally:
        srv.stop()
