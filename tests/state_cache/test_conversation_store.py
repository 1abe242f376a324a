"""TieredConversationStore: the engine protocol directly, then two real servers sharing one Redis."""

from __future__ import annotations

import asyncio
import threading
import uuid

import httpx
import pytest
import redis
import uvicorn

from server.app import create_app
from server.conversations import ConversationKey, ConversationSnapshot
from server.errors import ConversationBusy
from server.metrics import Metrics, StateCacheMetrics
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


class Moving:
    """A conversation that starts on server A and continues on B over HTTP: `turn(client, k)` sends
    TURNS[k]; `replays(k)` says whether A, replaying the whole history, produces turn k's reply."""

    def __init__(self, a: RunningServer, b: RunningServer, conversation_id: str) -> None:
        self.a = a
        self.ca, self.cb = httpx.Client(base_url=a.url, timeout=60), httpx.Client(base_url=b.url, timeout=60)
        self.body = {"conversation_id": conversation_id, **GREEDY}
        self.turns: list[dict] = []

    def turn(self, client: httpx.Client, k: int) -> dict:
        self.turns.append(client.post("/generate", json={"prompt": TURNS[k], **self.body}).json())
        return self.turns[-1]

    def a_then_b(self, why: str = "B resumed from the state A left in Redis") -> None:
        self.turn(self.ca, 0)
        assert self.turn(self.cb, 1)["state_cached"], why

    def replays(self, k: int) -> bool:
        ids = _replay_ids(self.a, self.turns, k)
        return self.ca.post("/generate", json={"prompt_token_ids": ids, **GREEDY}).json()["token_ids"] == \
            self.turns[k]["token_ids"]


@pytest.mark.slow
def test_conversation_moves_between_servers_and_survives_a_redis_outage(own_redis):
    # no device tier: turn 3 on B must come from B's host tier (test_resident_* cover the slots)
    settings = Settings(**BASE_SETTINGS, redis_url=own_redis.url, redis_key_prefix=ns().rstrip(":"),
                        redis_breaker_reset_s=0.1, redis_breaker_failures=1, redis_timeout_s=5,
                        resident_conversations=False)
    a, b = start_with_store(settings), start_with_store(settings)
    try:
        conv = Moving(a, b, "moving")
        conv.a_then_b()
        own_redis.stop()
        assert conv.turn(conv.cb, 2)["state_cached"], "B's own host tier and log carry on without Redis"
        for k in (1, 2):
            assert conv.replays(k), k
        stats_b = b.health()["cache"]
        assert stats_b["lookup_hits_redis"] == 1 and stats_b["lookup_hits_host"] == 1
        assert stats_b["redis_breaker_state"] == "open" and b.health()["status"] == "ok"
    finally:
        a.stop()
        b.stop()


def test_resident_turn_skips_the_store_lookup_and_equals_replay(own_redis):
    """The slot holds turn 1's state: turn 2 neither hashes the log for a lookup nor reads Redis."""
    settings = Settings(**BASE_SETTINGS, redis_url=own_redis.url, redis_key_prefix=ns().rstrip(":"))
    srv = start_with_store(settings)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"conversation_id": "resident", **GREEDY}
            turns = [c.post("/generate", json={"prompt": TURNS[0], **body}).json()]
            lookups = srv.health()["cache"]["lookups"]
            turns.append(c.post("/generate", json={"prompt": TURNS[1], **body}).json())
            h = srv.health()
            assert turns[1]["state_cached"] and h["device_hits"] == 1
            assert h["cache"]["conversation_resident"] == 1 and h["cache"]["lookups"] == lookups
            replay = c.post("/generate", json={"prompt_token_ids": _replay_ids(srv, turns, 1), **GREEDY}).json()
            assert replay["token_ids"] == turns[1]["token_ids"]
    finally:
        srv.stop()


def test_resident_slot_evicted_before_the_turn_claims_it_rebuilds_from_the_log():
    """`load` saw the state in its slot, then a step gave the slot away: the turn prefills its log."""
    from model import load_checkpoint, load_tokenizer
    from model.loader import bundled_model_path
    from server.engine import AsyncEngine
    from server.sampling_params import SamplingParams

    async def main() -> tuple[list[int], list[int], dict]:
        settings = Settings(**BASE_SETTINGS)
        tok = load_tokenizer(bundled_model_path())
        engine = AsyncEngine(load_checkpoint(bundled_model_path()), tok, settings,
                             build_conversation_store(settings, FINGERPRINT))
        await engine.start()
        try:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            key = ConversationKey("default", "evicted-late")
            first = tok(TURNS[0])["input_ids"]
            second = tok(TURNS[1], add_special_tokens=False)["input_ids"]
            out1 = [t async for o in await engine.add_request(first, params, key) for t in o.token_ids]
            for _ in range(200):  # the commit lands off the step
                if engine.scheduler.parked.get(key) is not None:
                    break
                await asyncio.sleep(0.01)
            stream = await engine.add_request(second, params, key)  # load saw the parked state
            parked = engine.scheduler.claim_parked(key)  # ... and a step evicts it before ingest
            assert parked is not None
            engine.scheduler.free_slot(parked.slot)
            out2 = [t async for o in stream for t in o.token_ids]
            replay = [t async for o in await engine.add_request(first + out1 + second, params) for t in o.token_ids]
            return out2, replay, engine.stats()
        finally:
            await engine.stop()

    resumed, replayed, stats = asyncio.run(main())
    assert resumed == replayed and stats["resident_lost"] == 1


# -- turn leases that outlive their TTL -----------------------------------------------------------


def test_a_turn_longer_than_its_lease_keeps_it(redis_proc):
    """The lease is renewed while the turn runs: after 2.5x its TTL another replica still gets 409.
    (A 2 s lease renewed every 2/3 s leaves 4/3 s of slack for a stalled loop: with a 1 s lease a
    2-core CI box once missed one renewal.)"""
    prefix = ns()
    key = ConversationKey("t", "long")

    async def main() -> dict:
        a = TieredConversationStore(new_cache(redis_proc.url, prefix), lease_ttl_s=2.0)
        b = TieredConversationStore(new_cache(redis_proc.url, prefix), lease_ttl_s=2.0)
        await turn(a, key, [1, 2, 3], state_seed=1)
        await a.flush()
        a.acquire(key)
        snap = await a.load(key)
        await asyncio.sleep(5.0)  # a long turn
        b.acquire(key)
        with pytest.raises(ConversationBusy):
            await b.load(key)
        b.release(key)
        await asyncio.to_thread(a.commit, key, ConversationSnapshot(snap.token_ids + [4], make_state(seed=2)))
        await asyncio.to_thread(a.release, key)
        await a.flush()
        assert (await turn(b, key, [5], state_seed=3)).token_ids == [1, 2, 3, 4]  # free again, A's turn in
        await b.flush()
        return a.stats()

    stats = asyncio.run(main())
    assert stats["lease_renewals_failed"] == 0


def test_a_turn_that_lost_its_lease_cannot_erase_the_turn_taken_since(redis_proc):
    """A's lease is gone mid-turn (expired while Redis was unreachable, say) and B takes the next
    turn: A's late commit is fenced off, so the log keeps B's turn."""
    prefix = ns()
    key = ConversationKey("t", "fenced")

    async def main() -> tuple[list[int] | None, dict]:
        a = TieredConversationStore(new_cache(redis_proc.url, prefix))
        b = TieredConversationStore(new_cache(redis_proc.url, prefix))
        await turn(a, key, [1, 2, 3], state_seed=1)
        await a.flush()
        a.acquire(key)
        snap = await a.load(key)
        redis.Redis.from_url(redis_proc.url).delete(a.cache.keys.lease("t", "fenced"))  # A's lease lapses
        assert (await turn(b, key, [9], state_seed=2)).token_ids == [1, 2, 3]
        await b.flush()
        await asyncio.to_thread(a.commit, key, ConversationSnapshot(snap.token_ids + [4], make_state(seed=3)))
        await asyncio.to_thread(a.release, key)
        await a.flush()
        return await b.cache.get_token_log("t", "fenced"), a.cache.stats()

    log, stats = asyncio.run(main())
    assert log == [1, 2, 3, 9]
    assert stats["token_log_writes_fenced"] == 1


def test_a_committed_log_must_extend_the_stored_one(redis_proc):
    """A turn that ran on a stale log (say, with a local-only lease while Redis was unreachable)
    cannot erase turns committed since: its log is not an extension of the stored one."""
    prefix = ns()

    metrics = Metrics(process_metrics=False)

    async def main() -> tuple[list[int] | None, dict]:
        a, b = new_cache(redis_proc.url, prefix), new_cache(redis_proc.url, prefix)
        StateCacheMetrics(metrics, TieredConversationStore(a))
        assert await a.set_token_log("t", "c", [1, 2])  # nothing stored yet
        assert await a.set_token_log("t", "c", [1, 2, 3, 4])  # extends it
        assert await b.set_token_log("t", "c", [1, 2, 3, 4, 9])  # another replica's turn
        assert not await a.set_token_log("t", "c", [1, 2, 3, 4, 5])  # a turn on the stale [1, 2, 3, 4]
        redis.Redis.from_url(redis_proc.url).delete(a.keys.token_log("t", "c"))  # expired, or Redis restarted
        assert await a.set_token_log("t", "c", [1, 2, 3, 4, 9, 6])
        log = await b.get_token_log("t", "c")
        await a.close()
        await b.close()
        return log, a.stats()

    log, stats = asyncio.run(main())
    assert log == [1, 2, 3, 4, 9, 6]
    assert stats["token_log_writes_diverged"] == 1 and "token_log_writes_fenced" not in stats
    text = metrics.render()[0].decode()
    assert 'gla:token_log_writes_refused_total{reason="diverged"} 1.0' in text
    assert 'gla:token_log_writes_refused_total{reason="lease_lost"} 0.0' in text
