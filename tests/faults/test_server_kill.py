"""SIGKILL the server mid-load, start a new one on the same Redis: no committed turn is lost."""

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

NUM_CONVERSATIONS = 16
TURNS_BEFORE_KILL = 48


def serve(redis: RedisProcess) -> ServeProcess:
    # A short lease: the turns cut by the kill hold theirs until it expires (409 meanwhile).
    return ServeProcess("--redis-url", redis.url, "--redis-key-prefix", "kill", "--conversation-lease-s", "3",
                        "--max-num-seqs", "8", "--redis-timeout-s", "2").start()


async def _load_then_kill(srv: ServeProcess, convs: list[LoadedConversation]) -> None:
    killed = False

    def keep_going() -> bool:
        return not killed

    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
        tasks = [asyncio.create_task(converse(client, c, keep_going)) for c in convs]
        deadline = time.monotonic() + 60
        while sum(c.turns for c in convs) < TURNS_BEFORE_KILL and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        srv.kill()  # mid-load: every conversation has a turn in flight or about to be sent
        killed = True
        await asyncio.gather(*tasks)


def test_sigkill_mid_load_loses_no_committed_turn(own_redis: RedisProcess) -> None:  # noqa: F811
    """Hard: every conversation resumes from one of its own turn boundaries and equals its replay.

    No acknowledged turn may be lost: the engine sends a turn's final output only after its commit
    is durable (before that fix, about half of 16 busy conversations lost their last turn here).
    """
    convs = [LoadedConversation(f"kill-{i}", index=i) for i in range(NUM_CONVERSATIONS)]
    first = serve(own_redis)
    try:
        asyncio.run(_load_then_kill(first, convs))
    finally:
        first.stop()
    assert sum(c.turns for c in convs) >= TURNS_BEFORE_KILL
    assert any(c.failures for c in convs), "the kill cut no request: not a mid-load kill"
    second = serve(own_redis)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as client:
            lost = {c.conversation_id: resume_after_fault(client, c, lost_turns_ok=True) for c in convs if c.turns}
        assert httpx.get(second.url + "/health").json()["running"] == 0
    except AssertionError:
        print(second.output())
        raise
    finally:
        second.stop()
    lost = {cid: n for cid, n in lost.items() if n}
    assert not lost, f"acknowledged turns lost by the SIGKILL: {lost}"
