"""Redis killed mid-load and restarted: no request fails, and conversations still resume exactly."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.faults.conversations import LoadedConversation, converse, resume_after_fault
from tests.faults.serve_proc import ServeProcess
from tests.state_cache.conftest import own_redis  # noqa: F401  (a redis-server this test may kill)
from tests.state_cache.redis_proc import RedisProcess, redis_server_binary

pytestmark = [pytest.mark.slow, pytest.mark.redis,
              pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server binary")]

NUM_CONVERSATIONS = 12
TURNS_PER_PHASE = 36  # with Redis up, then down, then back


async def _load_with_redis_outage(srv: ServeProcess, redis: RedisProcess, convs: list[LoadedConversation]) -> None:
    done = False

    def keep_going() -> bool:
        return not done

    async def turns_reach(n: int) -> None:
        deadline = time.monotonic() + 60
        while sum(c.turns for c in convs) < n:
            assert time.monotonic() < deadline, "load stalled"
            await asyncio.sleep(0.02)

    async def breaker_closes() -> None:
        """The breaker's backoff may outlast a fixed number of turns, so wait for it under load."""
        deadline = time.monotonic() + 60
        while (await client.get("/health")).json()["cache"]["redis_breaker_state"] != "closed":
            assert time.monotonic() < deadline, "redis tier never came back"
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        tasks = [asyncio.create_task(converse(client, c, keep_going)) for c in convs]
        try:
            await turns_reach(TURNS_PER_PHASE)
            redis.stop()  # SIGKILL, mid-load
            await turns_reach(2 * TURNS_PER_PHASE)
            redis.start()  # same port, empty: nothing was saved
            await breaker_closes()
            await turns_reach(sum(c.turns for c in convs) + TURNS_PER_PHASE)  # with Redis in use again
        finally:
            done = True
            await asyncio.gather(*tasks)


def test_redis_killed_and_restarted_mid_load_fails_no_request(own_redis: RedisProcess) -> None:  # noqa: F811
    convs = [LoadedConversation(f"redis-{i}", index=i) for i in range(NUM_CONVERSATIONS)]
    srv = ServeProcess("--redis-url", own_redis.url, "--redis-key-prefix", "rkill", "--max-num-seqs", "8",
                       "--redis-timeout-s", "0.5", "--redis-breaker-reset-s", "0.5").start()
    try:
        asyncio.run(_load_with_redis_outage(srv, own_redis, convs))
        failures = [f for c in convs for f in c.failures]
        assert failures == [], failures[:5]
        assert all(c.pending is None for c in convs)
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            for conv in convs:
                assert resume_after_fault(client, conv) == 0
            health = client.get("/health").json()
        assert health["running"] == 0
        cache = health["cache"]
        assert cache["redis_breaker_opens"] >= 1 and cache["redis_writes_failed"] >= 1, cache  # the outage was seen
        assert cache["redis_breaker_state"] == "closed", cache  # and Redis is in use again
    except AssertionError:
        print(srv.output())
        raise
    finally:
        srv.stop()
