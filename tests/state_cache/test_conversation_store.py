"""TieredConversationStore: the engine protocol directly, then two real servers sharing one Redis."""

from __future__ import annotations

import asyncio
import threading
import uuid

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.conversations import ConversationKey, ConversationSnapshot
from server.errors import ConversationBusy
from server.settings import Settings
from server.state_cache.conversation_store import TieredConversationStore
from server.state_cache.factory import build_conversation_store, fingerprint_from_model_dir
from server.state_cache.keys import prefix_hash
from tests.server.conftest import BASE_SETTINGS, RunningServer
from tests.server.test_conversations import GREEDY, TURNS, _replay_ids
from tests.state_cache.helpers import assert_state_equal, make_state
from tests.state_cache.test_tiered_cache import new_cache

pytestmark = pytest.mark.redis


def ns() -> str:
    return f"cs{uuid.uuid4().hex[:8]}:"


async def turn(store: TieredConversationStore, key: ConversationKey, new_ids: list[int], state_seed: int,
               commit: bool = True) -> ConversationSnapshot | None:
    """One turn as the engine runs it: acquire + load on the loop, commit + release from a thread."""
    store.acquire(key)
    try:
        snap = await store.load(key)
    except BaseException:
        store.release(key)
        raise
    log = (snap.token_ids if snap else []) + new_ids

    def finish() -> None:
        if commit:
            store.commit(key, ConversationSnapshot(log, make_state(seed=state_seed)))
        store.release(key)

    await asyncio.to_thread(finish)
    return snap


def test_engine_protocol_across_two_replicas(redis_proc):
    prefix = ns()
    key = ConversationKey("t", "c")

    async def main():
        a = TieredConversationStore(new_cache(redis_proc.url, prefix))
        b = TieredConversationStore(new_cache(redis_proc.url, prefix))
        assert await turn(a, key, [1, 2, 3], state_seed=1) is None
        await a.flush()
        snap = await turn(b, key, [4, 5], state_seed=2)  # continues on the other replica
        assert snap.token_ids == [1, 2, 3]
        assert_state_equal(snap.state, make_state(seed=1))
        # the same replica's next turn waits for its own commit, without a flush
        snap = await turn(b, key, [6], state_seed=3, commit=False)  # an aborted turn commits nothing
        assert snap.token_ids == [1, 2, 3, 4, 5]
        await b.flush()
        snap = await turn(a, key, [], state_seed=4)
        assert snap.token_ids == [1, 2, 3, 4, 5]
        assert_state_equal(snap.state, make_state(seed=2))
        # a turn in flight on A makes B's turn a 409 (via the Redis lease)
        a.acquire(key)
        await a.load(key)
        with pytest.raises(ConversationBusy):
            await turn(b, key, [7], state_seed=5)
        with pytest.raises(ConversationBusy):
            a.acquire(key)
        a.release(key)
        await a.flush()
        assert (await turn(b, key, [], state_seed=5)) is not None
        await a.flush()
        await b.flush()
        return a.stats(), b.stats()

    sa, sb = asyncio.run(main())
    assert sa["conversation_new"] == 1 and sb["conversation_resumed"] == 3


def test_missing_state_is_a_rebuild_from_the_log(redis_proc):
    prefix = ns()
    key = ConversationKey("t", "c")

    async def main():
        a = TieredConversationStore(new_cache(redis_proc.url, prefix))
        await turn(a, key, [1, 2, 3], state_seed=1)
        await a.flush()
        cold = TieredConversationStore(new_cache(redis_proc.url, prefix, host_budget_bytes=0))
        await cold.cache.redis.delete_snapshot(cold.cache.keys.snapshot("t", prefix_hash([1, 2])))
        snap = await turn(cold, key, [4], state_seed=2, commit=False)
        await cold.flush()
        return snap, cold.stats()

    snap, stats = asyncio.run(main())
    assert snap.token_ids == [1, 2, 3] and snap.state is None and stats["conversation_rebuilds"] == 1


# -- two real servers over HTTP -------------------------------------------------------------------



def start_with_store(settings: Settings) -> RunningServer:
    srv = RunningServer(settings)
    srv.app = create_app(settings, conversations=build_conversation_store(settings, FINGERPRINT))
    config = uvicorn.Config(srv.app, host="127.0.0.1", port=srv.port, log_level="warning", lifespan="on")
    srv.server = uvicorn.Server(config)
    srv.thread = threading.Thread(target=srv.server.run, daemon=True)
    return srv.start()


FINGERPRINT = fingerprint_from_model_dir(None)


@pytest.mark.slow
def test_conversation_moves_between_servers_and_survives_a_redis_outage(own_redis):
    settings = Settings(**BASE_SETTINGS, redis_url=own_redis.url, redis_key_prefix=ns().rstrip(":"),
                        redis_breaker_reset_s=0.1, redis_breaker_failures=1, redis_timeout_s=5)
    a, b = start_with_store(settings), start_with_store(settings)
    try:
        ca, cb = httpx.Client(base_url=a.url, timeout=60), httpx.Client(base_url=b.url, timeout=60)
        body = {"conversation_id": "moving", **GREEDY}
        turns = [ca.post("/generate", json={"prompt": TURNS[0], **body}).json()]
        turns.append(cb.post("/generate", json={"prompt": TURNS[1], **body}).json())
        assert turns[1]["state_cached"], "B resumed from the state A left in Redis"
        own_redis.stop()
        turns.append(cb.post("/generate", json={"prompt": TURNS[2], **body}).json())
        assert turns[2]["state_cached"], "B's own host tier and log carry on without Redis"
        for k in (1, 2):
            replay = ca.post("/generate", json={"prompt_token_ids": _replay_ids(a, turns, k), **GREEDY}).json()
            assert replay["token_ids"] == turns[k]["token_ids"], k
        stats_b = b.health()["cache"]
        assert stats_b["lookup_hits_redis"] == 1 and stats_b["lookup_hits_host"] == 1
        assert stats_b["redis_breaker_state"] == "open" and b.health()["status"] == "ok"
    finally:
        a.stop()
        b.stop()
