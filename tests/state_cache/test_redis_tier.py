import asyncio
import time
import uuid

import pytest
import redis

from server.state_cache.breaker import CLOSED, OPEN
from server.state_cache.keys import prefix_hash
from server.state_cache.redis_tier import RedisTier, chunk_key, parse_manifest
from server.state_cache.snapshot import SnapshotCorrupt, SnapshotDecoder, decode_snapshot, encode_snapshot
from tests.state_cache.helpers import assert_state_equal, fp, make_state, state_of_bytes
from tests.state_cache.tls_proxy import TlsProxy, make_self_signed

pytestmark = pytest.mark.redis
FP = fp("model-a")


def ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def encoded(nbytes: int = 1 << 20):
    return encode_snapshot(state_of_bytes(nbytes), num_tokens=9, prefix_hash=prefix_hash(range(9)),
                           fingerprint=FP)


def sync_client(proc) -> redis.Redis:
    return redis.Redis.from_url(proc.url)


def test_chunked_snapshot_round_trip_with_ttl(redis_proc):
    key = ns() + "snap"
    enc = encoded(1 << 20)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=64 << 10, ttl_s=60)
        try:
            assert await tier.put_snapshot(key, enc)
            header, payload = await tier.get_snapshot(key)
            return header, payload, tier.stats()
        finally:
            await tier.close()

    header, payload, stats = asyncio.run(main())
    snap = decode_snapshot(header, payload, fingerprint=FP)
    assert_state_equal(snap.tensors, state_of_bytes(1 << 20))
    assert stats["redis_snapshot_hits"] == 1 and stats["redis_bytes_written"] == enc.nbytes
    r = sync_client(redis_proc)
    gen, n, *_ = parse_manifest(r.get(key))
    assert n == 16  # 1 MiB of state in 64 KiB chunks
    for k in (key, chunk_key(key, gen, 0), chunk_key(key, gen, n - 1)):
        assert 0 < r.pttl(k) <= 60_000


def test_overwrite_unlinks_previous_chunks_and_missing_chunk_is_a_miss(redis_proc):
    key = ns() + "snap"

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=256 << 10)
        try:
            await tier.put_snapshot(key, encoded())
            old_gen = parse_manifest(sync_client(redis_proc).get(key))[0]
            await tier.put_snapshot(key, encoded())
            r = sync_client(redis_proc)
            assert not r.exists(chunk_key(key, old_gen, 0))
            gen = parse_manifest(r.get(key))[0]
            r.delete(chunk_key(key, gen, 2))  # e.g. evicted by Redis maxmemory
            assert await tier.get_snapshot(key) is None
            assert await tier.get_snapshot(ns() + "absent") is None
        finally:
            await tier.close()

    asyncio.run(main())


def test_corrupted_chunk_fails_the_checksum(redis_proc):
    key = ns() + "snap"

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=128 << 10)
        try:
            await tier.put_snapshot(key, encoded())
            r = sync_client(redis_proc)
            r.setrange(chunk_key(key, parse_manifest(r.get(key))[0], 3), 1000, b"\xff\xfe")
            return await tier.get_snapshot(key)
        finally:
            await tier.close()

    header, payload = asyncio.run(main())
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        decode_snapshot(header, payload, fingerprint=FP)


def test_token_log_append_detects_a_missed_append(redis_proc):
    key = ns() + "log"

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, ttl_s=30)
        try:
            assert await tier.get_token_log(key) is None
            assert await tier.set_token_log(key, [1, 2, 3])
            assert await tier.append_token_log(key, [4, 5], expected_len=3)
            assert not await tier.append_token_log(key, [9], expected_len=3)  # stale view: refused
            assert await tier.get_token_log(key) == [1, 2, 3, 4, 5]
            assert 0 < await tier.pttl_ms(key) <= 30_000
        finally:
            await tier.close()

    asyncio.run(main())


def test_lease_is_exclusive_released_only_by_its_holder_and_expires(redis_proc):
    key = ns() + "lease"

    async def main():
        a, b = RedisTier(redis_proc.url, op_timeout_s=5), RedisTier(redis_proc.url, op_timeout_s=5)
        try:
            assert await a.acquire_lease(key, "tok-a", ttl_s=5) is True
            assert await b.acquire_lease(key, "tok-b", ttl_s=5) is False
            assert not await b.release_lease(key, "tok-b")
            assert await a.extend_lease(key, "tok-a", ttl_s=5)
            assert await a.release_lease(key, "tok-a")
            assert await b.acquire_lease(key, "tok-b", ttl_s=0.05) is True
            await asyncio.sleep(0.1)
            assert await a.acquire_lease(key, "tok-a", ttl_s=5) is True  # b's lease expired
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_lease_and_get_reads_the_keys_only_for_the_lease_holder(redis_proc):
    key, log_key, ptr_key = ns() + "lease", ns() + "log", ns() + "ptr"
    sync_client(redis_proc).set(log_key, b"\x01\x00\x00\x00" * 3)

    async def main():
        a, b = RedisTier(redis_proc.url, op_timeout_s=5), RedisTier(redis_proc.url, op_timeout_s=5)
        try:
            got, values = await a.acquire_lease_and_get(key, "tok-a", 5, [log_key, ptr_key])
            assert (got, values) == (True, [b"\x01\x00\x00\x00" * 3, None])  # a missing key reads None
            assert await b.acquire_lease_and_get(key, "tok-b", 5, [log_key]) == (False, [])
            assert await b.release_lease(key, "tok-b") is False  # b never held it
            assert await a.release_lease(key, "tok-a")
            assert await b.acquire_lease_and_get(key, "tok-b", 0.05, []) == (True, [])
            await asyncio.sleep(0.1)
            assert (await a.acquire_lease_and_get(key, "tok-a", 5, [log_key]))[0] is True  # b's expired
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_wrong_password_is_unavailable_not_an_error(redis_proc):
    url = f"redis://:wrong@127.0.0.1:{redis_proc.port}/0"

    async def main():
        tier = RedisTier(url)
        try:
            assert await tier.get_bytes("k") is None
            assert not await tier.set_bytes("k", b"v")
            assert await tier.acquire_lease("l", "t", 1) is None
            assert await tier.acquire_lease_and_get("l", "t", 1, ["k"]) == (None, [])
            assert tier.num_errors >= 1
        finally:
            await tier.close()

    asyncio.run(main())


def test_killed_redis_is_a_miss_and_the_breaker_recovers_after_restart(own_redis):
    key = ns() + "k"

    async def main():
        tier = RedisTier(own_redis.url, op_timeout_s=5, failure_threshold=2, base_backoff_s=0.05, max_backoff_s=0.2)
        try:
            assert await tier.set_bytes(key, b"v")
            own_redis.stop()
            t0 = time.monotonic()
            for _ in range(20):
                assert await tier.get_bytes(key) is None
                assert not await tier.put_snapshot(key, encoded(64 << 10))
                assert await tier.get_snapshot(key) is None
                assert await tier.anchor_members([key]) is None
            assert time.monotonic() - t0 < 2.0  # refused by the breaker, not waiting on timeouts
            assert tier.breaker.state == OPEN and tier.num_refused > 0
            own_redis.start()  # same port, empty data
            deadline = time.monotonic() + 5
            while not await tier.set_bytes(key, b"w"):
                assert time.monotonic() < deadline, "tier did not recover"
                await asyncio.sleep(0.05)
            assert await tier.get_bytes(key) == b"w"
            assert tier.breaker.state == CLOSED
        finally:
            await tier.close()

    asyncio.run(main())


def test_slow_redis_times_out_as_a_miss(own_redis):
    async def main():
        tier = RedisTier(own_redis.url, op_timeout_s=0.1, failure_threshold=1, base_backoff_s=5)
        try:
            assert await tier.set_bytes("k", b"v")
            own_redis.proc.send_signal(19)  # SIGSTOP: the socket stays open but nothing answers
            t0 = time.monotonic()
            assert await tier.get_bytes("k") is None
            assert time.monotonic() - t0 < 1.0
            assert tier.num_timeouts == 1 and tier.breaker.state == OPEN
        finally:
            own_redis.proc.send_signal(18)  # SIGCONT
            await tier.close()

    asyncio.run(main())


def test_rediss_url_through_tls(redis_proc, tmp_path):
    pair = make_self_signed(tmp_path)
    if pair is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    cert, key_file = pair
    key = ns() + "snap"
    state = make_state()
    enc = encode_snapshot(state, num_tokens=1, prefix_hash=prefix_hash([1]), fingerprint=FP)
    with TlsProxy(cert, key_file, redis_proc.port) as proxy:
        url = f"rediss://:{redis_proc.password}@127.0.0.1:{proxy.port}/0"

        async def main():
            tier = RedisTier(url, op_timeout_s=2, client_kwargs={"ssl_ca_certs": str(cert)})
            try:
                assert await tier.put_snapshot(key, enc)
                return await tier.get_snapshot(key)
            finally:
                await tier.close()

        header, payload = asyncio.run(main())
    assert_state_equal(decode_snapshot(header, payload, fingerprint=FP).tensors, state)


def test_get_snapshot_returns_the_chunks_unjoined_and_a_torn_chunk_is_rejected(redis_proc):
    key = ns() + "snap"

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100 << 10)
        try:
            await tier.put_snapshot(key, encoded())
            got = await tier.get_snapshot(key)
            r = sync_client(redis_proc)
            gen = parse_manifest(r.get(key))[0]
            r.setrange(chunk_key(key, gen, 2), 100 << 10, b"x")  # a chunk one byte too long
            return got, await tier.get_snapshot(key)
        finally:
            await tier.close()

    (header, parts), (header2, torn) = asyncio.run(main())
    assert isinstance(parts, list) and len(parts) == 11 and all(isinstance(p, bytes) for p in parts)
    assert_state_equal(decode_snapshot(header, parts, fingerprint=FP).tensors, state_of_bytes(1 << 20))
    with pytest.raises(SnapshotCorrupt):
        decode_snapshot(header2, torn, fingerprint=FP)


def test_tune_malloc_is_harmless():
    from server.state_cache.redis_tier import tune_malloc_for_snapshots

    assert tune_malloc_for_snapshots() in (True, False)


def test_streamed_snapshot_read_overlaps_fetch_and_decode_and_misses_cleanly(redis_proc):
    """`stream_snapshot` feeds every chunk in order (groups of 3 here) and decodes to the stored
    state; a chunk gone mid-read is a miss (None), never a partial state."""
    key = ns() + "snap"
    enc = encoded(1 << 20)
    fed: list[int] = []

    async def feed(dec: SnapshotDecoder, parts: list[bytes]) -> None:
        fed.append(len(parts))
        await asyncio.to_thread(dec.feed, parts)

    def opener(header: bytes) -> SnapshotDecoder:
        return SnapshotDecoder(header, fingerprint=FP)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=64 << 10)
        try:
            assert await tier.put_snapshot(key, enc)
            dec = await tier.stream_snapshot(key, opener, feed, group=3)
            snap = dec.finish()
            fed_ok = list(fed)
            gen, n, *_ = parse_manifest(sync_client(redis_proc).get(key))
            sync_client(redis_proc).delete(chunk_key(key, gen, n - 2))
            fed.clear()
            missing = await tier.stream_snapshot(key, opener, feed, group=3)
            absent = await tier.stream_snapshot(ns() + "absent", opener, feed)
            return snap, fed_ok, n, missing, absent, list(fed), tier.stats()
        finally:
            await tier.close()

    snap, fed_ok, n, missing, absent, fed_after, stats = asyncio.run(main())
    assert_state_equal(snap.tensors, state_of_bytes(1 << 20))
    assert n == 16 and fed_ok == [3, 3, 3, 3, 3, 1]
    assert missing is None and absent is None and sum(fed_after) == 12  # stopped at the missing chunk's group
    assert stats["redis_snapshot_hits"] == 1 and stats["redis_snapshot_misses"] == 2
