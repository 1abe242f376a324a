"""Snapshot reads received in place over plain sockets (`bulk_read.py`), against a real redis-server."""

import asyncio
import gc
import signal
import threading
import time
import uuid

import pytest
import redis

from server.state_cache import bulk_read
from server.state_cache.bulk_read import Endpoint, chunk_ranges
from server.state_cache.keys import prefix_hash
from server.state_cache.redis_tier import RedisTier, chunk_key, parse_manifest, piece_ranges
from server.state_cache.snapshot import (
    CHECKSUM_BLAKE2B,
    CHECKSUM_CRC32,
    SnapshotCorrupt,
    SnapshotDecoder,
    encode_snapshot,
)
from tests.state_cache.helpers import assert_state_equal, fp, make_state
from tests.state_cache.tls_proxy import TlsProxy, make_self_signed

pytestmark = pytest.mark.redis
FP = fp("model-a")
PH = prefix_hash(range(9))
# odd sizes: fp32 recurrent tensors of 1,020 bytes and bf16 conv tails of 30, so the payload has
# alignment gaps, and 100-byte chunks cut tensors, gaps and chunk boundaries at every offset
STATE = make_state(layers=3, heads=3, v=17, k=5)


def ns() -> str:
    return f"b{uuid.uuid4().hex[:8]}:"


def opener(per_tensor: bool = False):
    def open_decoder(header: bytes) -> SnapshotDecoder:
        return SnapshotDecoder(header, fingerprint=FP, prefix_hash=PH, per_tensor=per_tensor)

    return open_decoder


async def feed(decoder: SnapshotDecoder, parts: list[bytes]) -> None:
    """The MGET fallback's feed (unused while the bulk reader is on, as in these tests)."""
    decoder.feed(parts)


def enc(state=STATE, checksum_alg=CHECKSUM_CRC32):
    return encode_snapshot(state, num_tokens=9, prefix_hash=PH, fingerprint=FP, checksum_alg=checksum_alg)


@pytest.mark.parametrize("connections", [1, 3], ids=lambda c: f"conns{c}")
@pytest.mark.parametrize("per_tensor", [False, True], ids=["flat", "per_tensor"])
def test_read_in_place_equals_the_stored_state(redis_proc, connections, per_tensor):
    key = ns() + "snap"

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=connections)
        try:
            assert tier.bulk is not None
            assert await tier.put_snapshot(key, enc())
            first = await tier.read_snapshot_into(key, opener(per_tensor), feed)
            again = await tier.read_snapshot_into(key, opener(per_tensor), feed)  # pooled sockets reused
            absent = await tier.read_snapshot_into(ns() + "absent", opener(per_tensor), feed)
            return first.finish(), again.finish(), absent, tier.stats(), tier.bulk.reconnects, tier.bulk.reads
        finally:
            await tier.close()

    first, again, absent, stats, reconnects, reads = asyncio.run(main())
    assert_state_equal(first.tensors, STATE)
    assert_state_equal(again.tensors, STATE)
    assert first.num_tokens == 9 and absent is None
    assert stats["redis_snapshot_hits"] == 2 and stats["redis_snapshot_misses"] == 1
    assert reads == 2 and reconnects == connections  # the second read opened no new socket


def test_without_a_bulk_reader_the_chunks_stream_through_feed(redis_proc):
    key = ns() + "snap"
    fed: list[int] = []

    async def counting_feed(decoder: SnapshotDecoder, parts: list[bytes]) -> None:
        fed.append(len(parts))
        decoder.feed(parts)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=0)
        try:
            assert tier.bulk is None
            assert await tier.put_snapshot(key, enc())
            return (await tier.read_snapshot_into(key, opener(), counting_feed)).finish()
        finally:
            await tier.close()

    assert_state_equal(asyncio.run(main()).tensors, STATE)
    assert sum(fed) == len(chunk_ranges(len(enc().payload), 100)) and len(fed) > 1


def test_a_missing_chunk_is_a_miss_and_the_next_read_still_works(redis_proc):
    key = ns() + "snap"
    sync = redis.Redis.from_url(redis_proc.url)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=2)
        try:
            assert await tier.put_snapshot(key, enc())
            gen, n, *_ = parse_manifest(sync.get(key))
            saved = sync.get(chunk_key(key, gen, n - 3))
            sync.delete(chunk_key(key, gen, n - 3))
            missing = await tier.read_snapshot_into(key, opener(), feed)
            sync.set(chunk_key(key, gen, n - 3), saved)
            back = await tier.read_snapshot_into(key, opener(), feed)
            return n, missing, back.finish(), tier.breaker.consecutive_failures
        finally:
            await tier.close()

    n, missing, back, failures = asyncio.run(main())
    assert n > 30 and missing is None
    assert_state_equal(back.tensors, STATE)
    assert failures == 0  # a miss is not a Redis failure


@pytest.mark.parametrize("alg", [CHECKSUM_CRC32, CHECKSUM_BLAKE2B], ids=["crc32-combined", "blake2b-serial"])
def test_a_chunk_of_the_wrong_length_is_corrupt_and_a_bad_checksum_fails_finish(redis_proc, alg):
    key = ns() + "snap"
    sync = redis.Redis.from_url(redis_proc.url)

    def enc_alg():
        return enc(checksum_alg=alg)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=2)
        try:
            assert await tier.put_snapshot(key, enc_alg())
            gen, *_ = parse_manifest(sync.get(key))
            sync.setrange(chunk_key(key, gen, 4), 100, b"x")  # one byte too long
            with pytest.raises(SnapshotCorrupt):
                await tier.read_snapshot_into(key, opener(), feed)
            sync.set(chunk_key(key, gen, 4), b"")  # empty: a wrong length too, not a missing chunk
            with pytest.raises(SnapshotCorrupt):
                await tier.read_snapshot_into(key, opener(), feed)
            sync.set(chunk_key(key, gen, 4), b"y" * 100)  # right length, wrong bytes
            dec = await tier.read_snapshot_into(key, opener(), feed)
            with pytest.raises(SnapshotCorrupt, match="checksum"):
                dec.finish()
            assert await tier.put_snapshot(key, enc_alg())  # rewritten: readable again
            return (await tier.read_snapshot_into(key, opener(), feed)).finish()
        finally:
            await tier.close()

    assert_state_equal(asyncio.run(main()).tensors, STATE)


def test_frozen_redis_mid_read_times_out_as_a_miss_without_hanging(own_redis):
    key = ns() + "snap"
    big = make_state(layers=4, heads=4, v=256, k=128)  # 2 MiB: far beyond the socket buffers

    async def main():
        tier = RedisTier(own_redis.url, op_timeout_s=0.2, min_bandwidth_bytes_s=1e9, chunk_bytes=64 << 10,
                         bulk_connections=2, failure_threshold=5)
        try:
            assert await tier.put_snapshot(key, enc(big))

            def freeze_after_manifest(header: bytes) -> SnapshotDecoder:
                own_redis.proc.send_signal(signal.SIGSTOP)
                return opener()(header)

            # a full collection now, not inside the 0.2 s windows below: with the server's tests
            # collected in the same process, a gen-2 pass landed in the second read and timed it out
            gc.collect()
            t0 = time.monotonic()
            frozen = await tier.read_snapshot_into(key, freeze_after_manifest, feed)
            took = time.monotonic() - t0
            own_redis.proc.send_signal(signal.SIGCONT)
            timeouts = tier.num_timeouts
            after = await tier.read_snapshot_into(key, opener(), feed)
            return frozen, took, timeouts, after.finish()
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
            await tier.close()

    frozen, took, timeouts, after = asyncio.run(main())
    assert frozen is None and took < 1.5 and timeouts == 1
    assert_state_equal(after.tensors, big)


def test_pooled_sockets_from_before_a_redis_restart_are_replaced(own_redis):
    key = ns() + "snap"

    async def main():
        tier = RedisTier(own_redis.url, op_timeout_s=2, chunk_bytes=100, bulk_connections=2)
        try:
            assert await tier.put_snapshot(key, enc())
            assert (await tier.read_snapshot_into(key, opener(), feed)) is not None
            own_redis.stop()
            own_redis.start()  # same port, empty: the pooled sockets are dead
            deadline = time.monotonic() + 5
            while not await tier.put_snapshot(key, enc()):
                assert time.monotonic() < deadline, "tier did not recover"
                await asyncio.sleep(0.05)
            dec = await tier.read_snapshot_into(key, opener(), feed)
            return dec.finish(), tier.bulk.reconnects
        finally:
            await tier.close()

    snap, reconnects = asyncio.run(main())
    assert_state_equal(snap.tensors, STATE)
    assert reconnects == 4


def test_bulk_read_through_tls(redis_proc, tmp_path):
    pair = make_self_signed(tmp_path)
    if pair is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    cert, key_file = pair
    key = ns() + "snap"
    with TlsProxy(cert, key_file, redis_proc.port) as proxy:
        url = f"rediss://:{redis_proc.password}@127.0.0.1:{proxy.port}/0"

        async def main():
            tier = RedisTier(url, op_timeout_s=2, chunk_bytes=100, client_kwargs={"ssl_ca_certs": str(cert)})
            try:
                assert tier.bulk is not None and tier.bulk.endpoints[0].ssl_context is not None
                assert await tier.put_snapshot(key, enc())
                whole = (await tier.read_snapshot_into(key, opener(per_tensor=True), feed)).finish()
                tier.read_piece_bytes = 30  # GETRANGE pieces over TLS too
                pieces = (await tier.read_snapshot_into(key, opener(per_tensor=True), feed)).finish()
                assert_state_equal(pieces.tensors, STATE)
                return whole
            finally:
                await tier.close()

        assert_state_equal(asyncio.run(main()).tensors, STATE)


def test_wrong_password_on_the_bulk_path_is_a_miss(redis_proc):
    key = ns() + "snap"

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=2, chunk_bytes=100, bulk_connections=2)
        try:
            assert await tier.put_snapshot(key, enc())
            ep = tier.bulk.endpoints[0]
            tier.bulk.endpoints[0] = Endpoint(**{**ep.__dict__, "password": "wrong"})
            return await tier.read_snapshot_into(key, opener(), feed), tier.num_errors
        finally:
            await tier.close()

    got, errors = asyncio.run(main())
    assert got is None and errors == 1


def test_endpoint_covers_tcp_unix_and_db_and_refuses_what_it_cannot_speak():
    tcp = Endpoint.of_client(redis.asyncio.from_url("redis://u:pw@h:7000/3"))
    assert (tcp.host, tcp.port, tcp.db, tcp.username, tcp.password, tcp.ssl_context) == ("h", 7000, 3, "u", "pw", None)
    unix = Endpoint.of_client(redis.asyncio.from_url("unix:///tmp/r.sock?db=2"))
    assert unix.path == "/tmp/r.sock" and unix.db == 2
    resp3 = redis.asyncio.from_url("redis://h:7000/0", protocol=3)
    assert Endpoint.of_client(resp3) is None
    assert RedisTier("redis://h:7000/0", bulk_connections=0).bulk is None


def test_decoder_absorbs_only_in_order():
    e = enc()
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, per_tensor=True)
    payload = memoryview(e.payload).cast("B")
    n = len(payload)
    pos = 0
    for view in dec.views(0, n):  # tensors and the alignment gaps between them, in order
        view[:] = payload[pos : pos + len(view)]
        pos += len(view)
    assert pos == n
    dec.absorb(0, n // 2)
    with pytest.raises(SnapshotCorrupt):
        dec.absorb(10, n)
    with pytest.raises(SnapshotCorrupt):
        dec.views(0, n + 1)
    dec.absorb(n // 2, n)
    assert_state_equal(dec.finish().tensors, STATE)


def test_part_checksums_combined_in_order_verify_like_a_serial_pass():
    e = enc()
    payload = memoryview(e.payload).cast("B")
    n = len(payload)
    cuts = [0, 1, 37, 500, n - 3, n]

    def filled() -> SnapshotDecoder:
        dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, per_tensor=True)
        pos = 0
        for view in dec.views(0, n):
            view[:] = payload[pos : pos + len(view)]
            pos += len(view)
        return dec

    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    dec = filled()
    parts = [dec.part_checksum(a, b) for a, b in spans]  # any order, any thread
    for (a, b), crc in zip(spans, parts, strict=True):
        assert crc is not None
        dec.absorb(a, b, crc)
    assert_state_equal(dec.finish().tensors, STATE)
    bad = filled()
    for (a, b), crc in zip(spans, parts, strict=True):
        bad.absorb(a, b, crc ^ (1 if a == 37 else 0))  # one part's checksum off by a bit
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        bad.finish()
    blake = enc(checksum_alg=CHECKSUM_BLAKE2B)
    assert SnapshotDecoder(blake.header_bytes, fingerprint=FP).part_checksum(0, 10) is None


@pytest.mark.parametrize("piece", [0, 1, 30, 99, 100], ids=lambda p: f"piece{p}")
def test_chunks_read_in_getrange_pieces_equal_the_stored_state(redis_proc, piece):
    """100-byte chunks asked for whole (GET, piece 0 or >= the chunk) or in GETRANGE pieces that
    cut every chunk at odd offsets; a missing chunk is a miss either way."""
    key = ns() + "snap"
    sync = redis.Redis.from_url(redis_proc.url)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=3,
                         read_piece_bytes=piece)
        try:
            assert await tier.put_snapshot(key, enc())
            got = await tier.read_snapshot_into(key, opener(per_tensor=True), feed)
            gen, n, *_ = parse_manifest(sync.get(key))
            sync.delete(chunk_key(key, gen, n // 2))
            missing = await tier.read_snapshot_into(key, opener(), feed)
            return got.finish(), missing, tier.breaker.consecutive_failures
        finally:
            await tier.close()

    snap, missing, failures = asyncio.run(main())
    assert_state_equal(snap.tensors, STATE)
    assert missing is None and failures == 0


def test_piece_ranges_cover_each_chunk_in_order():
    keys, ranges, offsets = piece_ranges(["a", "b"], [(0, 100), (100, 130)], 40)
    assert keys == ["a", "a", "a", "b"]
    assert ranges == [(0, 40), (40, 80), (80, 100), (100, 130)]
    assert offsets == [0, 40, 80, 0]


@pytest.mark.parametrize("scatter", [True, False], ids=["one_syscall", "reply_by_reply"])
@pytest.mark.parametrize("iov_max", [512, 5], ids=lambda n: f"iov{n}")
def test_both_receive_paths_read_the_same_state(redis_proc, monkeypatch, scatter, iov_max):
    """One connection's whole share through one scatter syscall (or several, when it has more
    buffers than one call takes) equals the reply-by-reply read, pieces and all."""
    monkeypatch.setattr(bulk_read, "SCATTER", scatter)
    monkeypatch.setattr(bulk_read, "_IOV_MAX", iov_max)
    key = ns() + "snap"

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=1, read_piece_bytes=30)
        try:
            assert await tier.put_snapshot(key, enc())
            first = (await tier.read_snapshot_into(key, opener(per_tensor=True), feed)).finish()
            again = (await tier.read_snapshot_into(key, opener(), feed)).finish()
            return first, again, tier.bulk.reconnects
        finally:
            await tier.close()

    first, again, reconnects = asyncio.run(main())
    assert_state_equal(first.tensors, STATE)
    assert_state_equal(again.tensors, STATE)
    assert reconnects == 1  # the stream stayed in step: the socket went back to the pool and was reused


@pytest.mark.parametrize("piece", [0, 30], ids=["get", "getrange"])
def test_a_missing_last_chunk_is_a_miss_without_waiting_for_the_timeout(redis_proc, piece):
    """The scatter read asks the kernel for every byte the replies should hold; a missing key's
    short reply leaves it waiting for bytes that never come, until the receive slice ends."""
    key = ns() + "snap"
    sync = redis.Redis.from_url(redis_proc.url)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=1,
                         read_piece_bytes=piece)
        try:
            assert await tier.put_snapshot(key, enc())
            gen, n, *_ = parse_manifest(sync.get(key))
            sync.delete(chunk_key(key, gen, n - 1))
            t0 = time.monotonic()
            missing = await tier.read_snapshot_into(key, opener(), feed)
            took = time.monotonic() - t0
            assert await tier.put_snapshot(key, enc())
            back = (await tier.read_snapshot_into(key, opener(), feed)).finish()
            return missing, took, back, tier.breaker.consecutive_failures, tier.num_timeouts
        finally:
            await tier.close()

    missing, took, back, failures, timeouts = asyncio.run(main())
    assert missing is None and failures == 0 and timeouts == 0
    assert took < 2.5  # half the 5 s timeout: the miss came from the reply, not from the deadline
    assert_state_equal(back.tensors, STATE)


def test_an_error_reply_for_a_chunk_is_a_miss_and_its_socket_is_not_reused(redis_proc):
    key = ns() + "snap"
    sync = redis.Redis.from_url(redis_proc.url)

    async def main():
        tier = RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=100, bulk_connections=2)
        try:
            assert await tier.put_snapshot(key, enc())
            gen, *_ = parse_manifest(sync.get(key))
            chunk = chunk_key(key, gen, 3)
            saved = sync.get(chunk)
            sync.delete(chunk)
            sync.rpush(chunk, b"x")  # GET of a list: -WRONGTYPE
            errored = await tier.read_snapshot_into(key, opener(), feed)
            errors, reconnects = tier.num_errors, tier.bulk.reconnects
            sync.delete(chunk)
            sync.set(chunk, saved)
            back = (await tier.read_snapshot_into(key, opener(), feed)).finish()
            return errored, errors, reconnects, back, tier.bulk.reconnects, tier.breaker.consecutive_failures
        finally:
            await tier.close()

    errored, errors, reconnects, back, reconnects_after, failures = asyncio.run(main())
    assert errored is None and errors == 1 and failures == 0
    assert_state_equal(back.tensors, STATE)
    assert reconnects == 2 and reconnects_after == 4  # the failed read's sockets were closed, not pooled


def test_a_reads_tasks_all_run_at_once_on_reused_threads():
    """Every per-connection task of a read runs on its own thread at the same time (a barrier of
    all of them passes), and the next read reuses those threads."""
    workers = bulk_read._Workers("test-bulk")
    try:
        for _ in range(3):
            barrier = threading.Barrier(8, timeout=5)
            names: list[str] = []

            def task(barrier: threading.Barrier = barrier, names: list[str] = names) -> None:
                barrier.wait()
                names.append(threading.current_thread().name)

            for f in workers.run([task] * 8):
                f.result(timeout=10)
            assert len(set(names)) == 8
        failing = workers.run([lambda: 1 / 0])[0]
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=10)
        assert workers.started == 8  # the failed task ran on an idle thread too
    finally:
        workers.close()
    with pytest.raises(RuntimeError, match="closed"):
        workers.run([lambda: None])
