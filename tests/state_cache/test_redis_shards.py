"""Snapshot chunks spread over several redis-server processes (`RedisTier` chunk_urls)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis

from server.settings import Settings
from server.state_cache.factory import build_state_cache
from server.state_cache.redis_tier import RedisTier, chunk_key, chunk_shard, parse_manifest
from server.state_cache.snapshot import decode_snapshot
from tests.server.conftest import BASE_SETTINGS
from tests.state_cache.redis_proc import RedisProcess
from tests.state_cache.test_bulk_read import FP, STATE, enc, feed, opener
from tests.state_cache.test_conversation_store import Moving, start_with_store

pytestmark = pytest.mark.redis
CHUNK = 100  # STATE's payload is ~3.2 KB: 33 chunks, cutting tensors at odd offsets


def ns() -> str:
    return f"s{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="module")
def shards() -> Iterator[list[RedisProcess]]:
    """Two chunk shards next to the session's primary `redis_proc`."""
    procs = [RedisProcess(), RedisProcess()]
    for p in procs:
        p.start()
    yield procs
    for p in procs:
        p.stop()


def chunk_keys_on(proc: RedisProcess) -> set[bytes]:
    return set(redis.Redis.from_url(proc.url).scan_iter(match="*:chunk:*", count=1000))


def tier(primary: RedisProcess, shard_procs: list[RedisProcess], **kw) -> RedisTier:
    return RedisTier(primary.url, op_timeout_s=5, chunk_bytes=CHUNK, chunk_urls=[p.url for p in shard_procs],
                     base_backoff_s=0.05, max_backoff_s=0.2, **kw)


@pytest.mark.parametrize("piece", [0, 40], ids=lambda p: f"piece{p}")
@pytest.mark.parametrize("connections", [0, 1, 3], ids=lambda c: f"conns{c}")
def test_chunks_spread_over_the_shards_and_every_read_path_gets_them_back(redis_proc, shards, connections, piece):
    key = ns() + "snap"

    async def main():
        t = tier(redis_proc, shards, bulk_connections=connections, read_piece_bytes=piece)
        try:
            assert (t.bulk is None) == (connections == 0)
            assert t.num_shards == 2 and t.stats()["redis_chunk_shards"] == 2
            assert await t.put_snapshot(key, enc())
            header, parts = await t.get_snapshot(key)  # one MGET per shard, in payload order
            streamed = await t.stream_snapshot(key, opener(), feed, group=3)
            read = await t.read_snapshot_into(key, opener(), feed)  # bulk sockets to both shards
            # the read's sockets are split over the shards, at least one each: 1 -> 1 + 1, 3 -> 2 + 2
            sockets = t.bulk.reconnects if t.bulk else None
            return header, parts, streamed.finish(), read.finish(), t.stats(), sockets
        finally:
            await t.close()

    header, parts, streamed, read, stats, sockets = asyncio.run(main())
    assert sockets == {0: None, 1: 2, 3: 4}[connections]
    fetched = decode_snapshot(header, parts, fingerprint=FP).tensors
    for got in (fetched, streamed.tensors, read.tensors):
        assert set(got) == set(STATE) and all(got[n].equal(STATE[n]) for n in STATE)
    gen, n, *_ = parse_manifest(redis.Redis.from_url(redis_proc.url).get(key))
    assert n == len(parts) > 2 and stats["redis_snapshot_hits"] == 3
    # the manifest alone on the primary, each chunk on its own shard and nowhere else
    assert not {k for k in chunk_keys_on(redis_proc) if k.startswith(key.encode())}
    for s, proc in enumerate(shards):
        held = {k for k in chunk_keys_on(proc) if k.startswith(key.encode())}
        assert held == {chunk_key(key, gen, i).encode() for i in range(n) if chunk_shard(gen, i, 2) == s}
        assert abs(len(held) - n / 2) <= 1


def test_overwrite_and_delete_unlink_the_chunks_on_every_shard(redis_proc, shards):
    key = ns() + "snap"

    async def main():
        t = tier(redis_proc, shards)
        try:
            assert await t.put_snapshot(key, enc())
            first = sum(1 for p in shards for k in chunk_keys_on(p) if k.startswith(key.encode()))
            assert await t.put_snapshot(key, enc())  # a new generation replaces the old one
            second = {k for p in shards for k in chunk_keys_on(p) if k.startswith(key.encode())}
            await t.delete_snapshot(key)
            gone = {k for p in shards for k in chunk_keys_on(p) if k.startswith(key.encode())}
            return first, second, gone
        finally:
            await t.close()

    first, second, gone = asyncio.run(main())
    assert first == len(second) > 2 and not gone


@pytest.mark.parametrize("connections", [0, 3], ids=lambda c: f"conns{c}")
def test_a_replica_listing_other_shards_misses_and_never_misreads(redis_proc, shards, connections):
    key = ns() + "snap"

    async def main():
        writer = tier(redis_proc, shards)
        swapped = tier(redis_proc, shards[::-1], bulk_connections=connections)
        fewer = tier(redis_proc, shards[:1], bulk_connections=connections)
        try:
            assert await writer.put_snapshot(key, enc())
            return ([await r.read_snapshot_into(key, opener(), feed) for r in (swapped, fewer)],
                    swapped.stats(), swapped.breaker.state)
        finally:
            for r in (writer, swapped, fewer):
                await r.close()

    reads, stats, breaker = asyncio.run(main())
    assert reads == [None, None]
    assert stats["redis_snapshot_misses"] == 1 and stats["redis_errors"] == 0 and breaker == "closed"


def test_a_killed_shard_is_a_miss_and_the_tier_writes_again_once_it_returns(redis_proc):
    key = ns() + "snap"
    a, b = RedisProcess(), RedisProcess()
    a.start()
    b.start()
    try:
        async def main():
            t = tier(redis_proc, [a, b], bulk_connections=2, failure_threshold=1)
            try:
                assert await t.put_snapshot(key, enc())
                b.stop()  # SIGKILL: half the chunks are gone
                lost = await t.read_snapshot_into(key, opener(), feed)
                write_while_down = await t.put_snapshot(key, enc())
                b.start()  # same port, empty
                await asyncio.sleep(0.3)  # past the breaker's backoff
                still_lost = await t.read_snapshot_into(key, opener(), feed)
                rewritten = await t.put_snapshot(key, enc())
                back = await t.read_snapshot_into(key, opener(), feed)
                return lost, write_while_down, still_lost, rewritten, back.finish(), t.stats()
            finally:
                await t.close()

        lost, write_while_down, still_lost, rewritten, back, stats = asyncio.run(main())
    finally:
        a.stop()
        b.stop()
    assert lost is None and write_while_down is False and still_lost is None
    assert rewritten is True and all(back.tensors[n].equal(STATE[n]) for n in STATE)
    assert stats["redis_breaker_opens"] >= 1 and stats["redis_breaker_state"] == "closed"


def test_settings_pass_the_chunk_urls_to_the_tier(redis_proc, shards):
    settings = Settings(**BASE_SETTINGS, redis_url=redis_proc.url,
                        redis_chunk_urls=" , ".join(p.url for p in shards))

    async def main() -> int:
        built = build_state_cache(settings, b"\0" * 32)
        try:
            return built.redis.num_shards
        finally:
            await built.close()

    assert asyncio.run(main()) == 2


@pytest.mark.slow
def test_conversation_moves_between_servers_over_chunk_shards(redis_proc, shards):
    """Two servers, one primary and two chunk shards: turn 2 on B resumes from A's state, read from
    both shards, and equals a replay of the whole history."""
    settings = Settings(**BASE_SETTINGS, redis_url=redis_proc.url, redis_key_prefix=ns().rstrip(":"),
                        redis_chunk_urls=",".join(p.url for p in shards), redis_timeout_s=5,
                        resident_conversations=False)
    a, b = start_with_store(settings), start_with_store(settings)
    try:
        conv = Moving(a, b, "sharded")
        conv.a_then_b("B resumed from the state A left on the shards")
        assert conv.replays(1)
        cache_b = b.health()["cache"]
        assert cache_b["lookup_hits_redis"] == 1 and cache_b["redis_chunk_shards"] == 2
        assert all(chunk_keys_on(p) for p in shards)
    finally:
        a.stop()
        b.stop()
