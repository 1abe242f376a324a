"""The Redis tier (redis-py asyncio), shared by every replica; never raises for Redis trouble.

Each call runs under a timeout and a circuit breaker: a refused, failed or timed-out call returns
the miss value (None / False) and is counted, so an outage turns into cache misses and skipped
writes instead of failed requests, and the breaker's half-open probe brings the tier back when
Redis returns (redis-py reconnects on the next call).

A snapshot is stored as payload chunks under a fresh generation id, then a manifest (the snapshot
header plus generation and chunk count) written last with SET ... GET: a reader that sees a
manifest sees all of its chunks, and the previous generation's chunks are unlinked afterwards.

With `chunk_urls`, the chunks are spread over several Redis instances (chunk i of a generation on
shard `chunk_shard(gen, i, n)`), while manifests, token logs, leases and the prefix index stay on
`url`. Why: one redis-server writes replies from one thread (~2.6 GB/s on the H200 host), which
bounds a 48 MiB resume at ~18 ms; n shards send their parts at once. A chunk missing from its
shard (evicted, shard restarted, a replica configured with other shards) is a miss, like an
expired one, so the state is rebuilt from the log and never read wrongly.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from server.state_cache.breaker import CLOSED, OPEN, CircuitBreaker
from server.state_cache.bulk_read import BulkReader, ChunkSink, Endpoint, chunk_ranges
from server.state_cache.keys import bytes_to_tokens, tokens_to_bytes
from server.state_cache.snapshot import EncodedSnapshot

log = logging.getLogger(__name__)
T = TypeVar("T")
D = TypeVar("D")

MANIFEST_MAGIC = b"GLAMAN1\x00"
_MANIFEST = struct.Struct("<8s8sIIQ")  # magic, generation, num_chunks, chunk_bytes, payload_len
MAX_CHUNKS = 1 << 16

# Appends only when the stored log has the length the caller last saw, so a log that missed an
# append during an outage is rewritten whole instead of silently growing a hole.
_APPEND_LOG = """
local n = redis.call('STRLEN', KEYS[1])
if n ~= tonumber(ARGV[2]) then return -1 end
redis.call('APPEND', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return n + string.len(ARGV[1])
"""
# A committed turn's log (KEYS[1]) is written only if it extends the stored one (or none is stored)
# and, given a lease token, only while the turn lease (KEYS[2]) still holds it: a turn that outlived
# its lease, or ran on a stale log while Redis was unreachable, must not erase turns taken since.
# 1 written, 0 lease lost, -1 the stored log is not a prefix of the new one.
_SET_LOG_CHECKED = """
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(ARGV[1], 1, string.len(cur)) ~= cur then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# the lease, then (only if acquired) a GET of every other key: {1, v2, v3, ...} or {0}
_LEASE_AND_GET = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
local out = {1}
for i = 2, #KEYS do out[i] = redis.call('GET', KEYS[i]) end
return out
"""
_EXTEND_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def tune_malloc_for_snapshots(
    trim_threshold_bytes: int = 128 << 20, mmap_threshold_bytes: int = 32 << 20
) -> bool:
    """Lets glibc keep up to `trim_threshold_bytes` of freed heap instead of returning it to the
    OS at once; process-wide, call once at start-up (the factory does when Redis is configured).

    A snapshot read makes ~48 MiB of reply bytes (one bytes object per chunk, made by the reply
    parser) that die right after the decode. With glibc's default dynamic thresholds the heap top
    they leave is trimmed, so the next read page-faults all of it in again: ~18 ms of a 48 MiB
    resume on the CI CPU (load + restore 46 -> 29 ms with this). Allocations up to
    `mmap_threshold_bytes` (32 MiB, glibc's dynamic maximum) come from the heap. Returns False
    where mallopt is unavailable (not glibc), which changes nothing.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes)
    )


class _Unavailable:
    """Returned by `_call` when Redis could not answer; distinct from a real None reply."""


UNAVAILABLE = _Unavailable()


def decode_token_log(data: bytes | None) -> list[int] | None:
    """A stored token log's ids; None when absent or not a whole number of ids (a miss)."""
    if data is None:
        return None
    try:
        return bytes_to_tokens(data)
    except ValueError:
        return None


def chunk_key(key: str, generation: bytes, index: int) -> str:
    return f"{key}:chunk:{generation.hex()}:{index}"


def chunk_shard(generation: bytes, index: int, num_shards: int) -> int:
    """The shard holding chunk `index`: consecutive chunks on consecutive shards, starting at one
    the random generation picks, so small snapshots do not all land on shard 0."""
    return (generation[0] + index) % num_shards


def piece_ranges(
    keys: Sequence[str], ranges: Sequence[tuple[int, int]], piece_bytes: int
) -> tuple[list[str], list[tuple[int, int]], list[int]]:
    """Each chunk's payload range cut into pieces of at most `piece_bytes`: per piece its chunk's
    key, its payload range and its offset inside the chunk (for GETRANGE)."""
    out_keys, out_ranges, offsets = [], [], []
    for key, (a, b) in zip(keys, ranges, strict=True):
        for p in range(a, b, piece_bytes):
            out_keys.append(key)
            out_ranges.append((p, min(p + piece_bytes, b)))
            offsets.append(p - a)
    return out_keys, out_ranges, offsets


def parse_manifest(data: bytes) -> tuple[bytes, int, int, int, bytes]:
    """(generation, num_chunks, chunk_bytes, payload_len, snapshot header bytes); ValueError if bad."""
    if len(data) < _MANIFEST.size:
        raise ValueError("manifest truncated")
    magic, gen, num_chunks, chunk_bytes, payload_len = _MANIFEST.unpack_from(data)
    if magic != MANIFEST_MAGIC or num_chunks > MAX_CHUNKS or chunk_bytes == 0:
        raise ValueError("bad manifest")
    if num_chunks != -(-payload_len // chunk_bytes):
        raise ValueError("manifest chunk count does not match its payload length")
    return gen, num_chunks, chunk_bytes, payload_len, data[_MANIFEST.size :]


class RedisTier:
    """Async Redis access for the state cache.

    Args:
        url: redis://[:password@]host:port/db or rediss://... for TLS (certificate options go in
            `client_kwargs`, e.g. ssl_ca_certs, ssl_cert_reqs).
        ttl_s: default time to live of every entry.
        op_timeout_s: limit for one small command (token log, lease, manifest).
        min_bandwidth_bytes_s: snapshot transfers get `op_timeout_s + nbytes / this` seconds.
        chunk_bytes: payload chunk size; one SET per chunk keeps Redis responsive to others.
        bulk_connections: plain sockets per `read_snapshot_into` (bulk_read.py); 0 reads through
            redis-py's MGET instead.
        read_piece_bytes: the bulk reader asks for each chunk in GETRANGE pieces of at most this
            many bytes (0: one GET per chunk). Redis 6 copies a reply into a buffer of its size
            before sending it, and with libc malloc a multi-MiB buffer is a fresh mmap every
            time (page faults in the server's one thread); smaller replies reuse its heap.
        failure_threshold, base_backoff_s, max_backoff_s: circuit breaker (see breaker.py).
        client_kwargs: extra arguments for `redis.asyncio.from_url`.
        chunk_urls: Redis instances that hold the snapshots' payload chunks, spread chunk by chunk
            (default: `url` holds them). Every replica must list the same URLs in the same order.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 24 * 3600,
        op_timeout_s: float = 0.25,
        connect_timeout_s: float = 0.5,
        min_bandwidth_bytes_s: float = 50e6,
        chunk_bytes: int = 4 << 20,
        failure_threshold: int = 3,
        base_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_connections: int = 64,
        bulk_connections: int = 16,
        read_piece_bytes: int = 1 << 20,
        client_kwargs: dict[str, Any] | None = None,
        chunk_urls: Sequence[str] = (),
    ) -> None:
        if ttl_s <= 0 or op_timeout_s <= 0 or chunk_bytes <= 0:
            raise ValueError("ttl_s, op_timeout_s and chunk_bytes must be positive")
        if read_piece_bytes < 0:
            raise ValueError("read_piece_bytes must be >= 0")
        self.read_piece_bytes = read_piece_bytes
        self.ttl_ms = int(ttl_s * 1000)
        self.op_timeout_s = op_timeout_s
        self.min_bandwidth_bytes_s = min_bandwidth_bytes_s
        self.chunk_bytes = chunk_bytes
        self.breaker = CircuitBreaker(failure_threshold, base_backoff_s, max_backoff_s)
        kwargs: dict[str, Any] = dict(
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=max(10.0, op_timeout_s),
            retry=Retry(NoBackoff(), 0),  # the breaker decides when to try again, not redis-py
            retry_on_timeout=False,
            max_connections=max_connections,
            client_name="gla-serve-state-cache",
        )
        kwargs.update(client_kwargs or {})
        self._client = aioredis.from_url(url, **kwargs)
        # where the chunks live; the primary client when no chunk_urls are given
        self._shards: list[aioredis.Redis] = [aioredis.from_url(u, **kwargs) for u in chunk_urls] or [self._client]
        self._append_log = self._client.register_script(_APPEND_LOG)
        self._release_lease = self._client.register_script(_RELEASE_LEASE)
        self._set_log_checked = self._client.register_script(_SET_LOG_CHECKED)
        self._extend_lease = self._client.register_script(_EXTEND_LEASE)
        self._lease_and_get = self._client.register_script(_LEASE_AND_GET)
        self.num_errors = 0
        self.num_timeouts = 0
        self.num_refused = 0
        self.snapshot_hits = 0
        self.snapshot_misses = 0
        self.snapshot_writes = 0
        self.snapshot_write_failures = 0
        self.bytes_read = 0
        self.bytes_written = 0
        # on_op(what, seconds, ok) after every call that went out (Prometheus; see server/metrics.py)
        self.on_op: Callable[[str, float, bool], None] | None = None
        # the bulk path needs every shard to be one it can speak to (Endpoint.of_client)
        endpoints = [Endpoint.of_client(c) for c in self._shards] if bulk_connections > 0 else []
        ready = [e for e in endpoints if e is not None]
        whole = bool(ready) and len(ready) == len(endpoints)
        self.bulk = BulkReader(ready, bulk_connections, connect_timeout_s) if whole else None

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def _by_shard(self, gen: bytes, indices: Sequence[int]) -> dict[int, list[int]]:
        """The chunk indices each shard holds, in order."""
        out: dict[int, list[int]] = {}
        for i in indices:
            out.setdefault(chunk_shard(gen, i, len(self._shards)), []).append(i)
        return out

    async def _mget_chunks(self, key: str, gen: bytes, indices: Sequence[int]) -> list[bytes | None]:
        """The chunks `indices` (None where missing), one MGET per shard, all shards at once."""
        groups = self._by_shard(gen, indices)
        replies = await asyncio.gather(*[
            self._shards[s].mget([chunk_key(key, gen, i) for i in idx]) for s, idx in groups.items()
        ])
        got: dict[int, bytes | None] = {}
        for idx, parts in zip(groups.values(), replies, strict=True):
            got.update(zip(idx, parts, strict=True))
        return [got[i] for i in indices]

    @property
    def is_available(self) -> bool:
        """False while the breaker is open (calls would be refused)."""
        return self.breaker.state != OPEN

    async def close(self) -> None:
        await self._client.aclose()
        for c in self._shards:
            if c is not self._client:
                await c.aclose()
        if self.bulk is not None:
            self.bulk.close()

    def _ttl(self, ttl_s: float | None) -> int:
        return self.ttl_ms if ttl_s is None else max(1, int(ttl_s * 1000))

    def _transfer_timeout(self, nbytes: int) -> float:
        return self.op_timeout_s + nbytes / self.min_bandwidth_bytes_s

    async def _call(
        self, what: str, fn: Callable[[aioredis.Redis], Awaitable[T]], timeout_s: float | None = None
    ) -> T | _Unavailable:
        if not self.breaker.allow():
            self.num_refused += 1
            return UNAVAILABLE
        was = self.breaker.state
        start = time.perf_counter()
        ok = False
        try:
            async with asyncio.timeout(timeout_s or self.op_timeout_s):
                result = await fn(self._client)
            ok = True
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except ResponseError as e:
            # Redis answered, so it is up: count the error without tripping the breaker.
            self.num_errors += 1
            self.breaker.record_success()
            log.warning("redis %s: %s", what, e)
            return UNAVAILABLE
        except (RedisError, OSError, TimeoutError) as e:
            if isinstance(e, TimeoutError):
                self.num_timeouts += 1
            else:
                self.num_errors += 1
            self.breaker.record_failure()
            if self.breaker.state == OPEN and was != OPEN:
                log.warning("redis unavailable (%s: %r); state cache tier off for now", what, e)
                await self._drop_connections()
            return UNAVAILABLE
        finally:
            if self.on_op is not None:
                self.on_op(what, time.perf_counter() - start, ok)
        if was != CLOSED:
            log.warning("redis reachable again; state cache tier back on")
        self.breaker.record_success()
        return result

    async def _drop_connections(self) -> None:
        for c in {id(c): c for c in (self._client, *self._shards)}.values():
            try:
                await c.connection_pool.disconnect()
            except (RedisError, OSError):  # pragma: no cover - best effort
                pass
        if self.bulk is not None:
            self.bulk.drop_idle()

    async def ping(self) -> bool:
        return (await self._call("ping", lambda r: r.ping())) is True

    # -- small values -----------------------------------------------------------------------------
    async def get_bytes(self, key: str) -> bytes | None:
        res = await self._call("get", lambda r: r.get(key))
        return None if isinstance(res, _Unavailable) else res

    async def set_bytes(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        res = await self._call("set", lambda r: r.set(key, value, px=self._ttl(ttl_s)))
        return res is True

    async def pttl_ms(self, key: str) -> int | None:
        """Remaining time to live in ms (None when missing, unavailable or without expiry)."""
        res = await self._call("pttl", lambda r: r.pttl(key))
        return res if isinstance(res, int) and res >= 0 else None

    # -- snapshots --------------------------------------------------------------------------------
    async def put_snapshot(self, key: str, enc: EncodedSnapshot, ttl_s: float | None = None) -> bool:
        """Chunks first, manifest last; True when the whole snapshot is readable under `key`."""
        ttl_ms = self._ttl(ttl_s)
        gen = os.urandom(8)
        chunks = enc.chunks(self.chunk_bytes)
        manifest = (
            _MANIFEST.pack(MANIFEST_MAGIC, gen, len(chunks), self.chunk_bytes, len(enc.payload))
            + enc.header_bytes
        )

        async def write_shard(shard: int, indices: list[int]) -> None:
            pipe = self._shards[shard].pipeline(transaction=False)
            for i in indices:
                pipe.set(chunk_key(key, gen, i), chunks[i], px=ttl_ms)
            await pipe.execute()

        async def write(r: aioredis.Redis) -> bytes | None:
            groups = self._by_shard(gen, range(len(chunks)))
            await asyncio.gather(*[write_shard(s, idx) for s, idx in groups.items()])
            return await r.set(key, manifest, px=ttl_ms, get=True)

        old = await self._call("put_snapshot", write, self._transfer_timeout(enc.nbytes))
        if isinstance(old, _Unavailable):
            self.snapshot_write_failures += 1
            return False
        self.snapshot_writes += 1
        self.bytes_written += enc.nbytes
        if old:
            await self._unlink_chunks(key, old)
        return True

    async def _unlink_chunks(self, key: str, manifest: bytes) -> None:
        try:
            gen, n, *_ = parse_manifest(manifest)
        except ValueError:
            return
        if n:
            groups = self._by_shard(gen, range(n))
            await self._call("unlink", lambda _: asyncio.gather(*[
                self._shards[s].unlink(*[chunk_key(key, gen, i) for i in idx]) for s, idx in groups.items()
            ]))

    async def get_snapshot(
        self, key: str, accept_header: Callable[[bytes], None] | None = None
    ) -> tuple[bytes, list[bytes]] | None:
        """(header bytes, payload chunks in order) or None on a miss, a torn write or an outage.

        The chunks are returned as Redis sent them, not joined: `decode_snapshot` checksums them
        in order and copies each once into the state's memory (joining 48 MiB cost ~19 ms).
        `accept_header` sees the header before the payload is fetched and may raise (e.g. a
        `SnapshotError` for another model's fingerprint) to stop early; that exception propagates.
        """
        got = await self._manifest(key)
        if got is None:
            return None
        manifest_len, (gen, n, _, payload_len, header) = got
        if accept_header is not None:
            accept_header(header)
        if n == 0:
            return header, []
        # One MGET per shard: with hiredis, 2-6 concurrent MGETs over the pool or a pipeline of
        # GETs were no faster on loopback (the reply parse, not Redis, is the bottleneck).
        parts = await self._call(
            "get_snapshot", lambda _: self._mget_chunks(key, gen, range(n)), self._transfer_timeout(payload_len)
        )
        if isinstance(parts, _Unavailable) or any(p is None for p in parts):
            # Chunks expired or were replaced between the manifest read and now: a miss.
            self.snapshot_misses += 1
            return None
        self.snapshot_hits += 1
        self.bytes_read += sum(len(p) for p in parts) + manifest_len
        return header, parts

    async def _manifest(self, key: str) -> tuple[int, tuple[bytes, int, int, int, bytes]] | None:
        """(its size in bytes, the parsed manifest (see `parse_manifest`)); a missing or
        malformed one is a miss. The caller counts the size as read once it accepts the header,
        so a refused header (another model's blob) leaves `bytes_read` as it was."""
        manifest = await self.get_bytes(key)
        if manifest is None:
            self.snapshot_misses += 1
            return None
        try:
            parsed = parse_manifest(manifest)
        except ValueError:
            self.snapshot_misses += 1
            return None
        return len(manifest), parsed

    async def stream_snapshot(
        self,
        key: str,
        open_decoder: Callable[[bytes], D],
        feed: Callable[[D, list[bytes]], Awaitable[None]],
        group: int = 2,
    ) -> D | None:
        """Like `get_snapshot`, but the chunks go to `feed(decoder, parts)` `group` at a time as
        they arrive, and the next group is fetched while `feed` runs, so the decode (checksum and
        copy, in a worker thread) overlaps the transfer instead of following it.

        `open_decoder` gets the header first and may raise (another model's fingerprint) to stop
        before any payload is read. Returns the decoder once every chunk was fed, or None on a
        miss, a torn write or an outage; a partly fed decoder is then dropped, never returned.
        Errors raised by `feed` (a corrupt payload) propagate.
        """
        got = await self._manifest(key)
        if got is None:
            return None
        manifest_len, (gen, n, chunk_bytes, _, header) = got
        decoder = open_decoder(header)
        self.bytes_read += manifest_len
        timeout = self._transfer_timeout(chunk_bytes * group)
        pending: asyncio.Future[None] | None = None
        try:
            for i in range(0, n, max(1, group)):
                batch = range(i, min(n, i + max(1, group)))
                parts = await self._call("get_snapshot", lambda _, b=batch: self._mget_chunks(key, gen, b), timeout)
                if isinstance(parts, _Unavailable) or any(p is None for p in parts):
                    # chunks expired or were replaced since the manifest was read: a miss
                    self.snapshot_misses += 1
                    return None
                self.bytes_read += sum(len(p) for p in parts)
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(feed(decoder, parts))
            if pending is not None:
                await pending
            pending = None
        finally:
            if pending is not None and not pending.done():
                # the decoder is dropped; its worker finishes on its own, and its outcome is moot
                pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.snapshot_hits += 1
        return decoder

    async def read_snapshot_into(
        self,
        key: str,
        open_decoder: Callable[[bytes], D],
        feed: Callable[[D, list[bytes]], Awaitable[None]],
        on_transfer: Callable[[], None] | None = None,
    ) -> D | None:
        """Like `stream_snapshot`, but the chunks land in the decoder's own memory: the decoder
        must be a `ChunkSink` (`SnapshotDecoder`), and `bulk_read` fills it over plain sockets,
        each chunk checksummed by its reader thread. Without a bulk reader (bulk_connections=0,
        or a URL it does not handle) this is `stream_snapshot(key, open_decoder, feed)`.
        `on_transfer()` is called on the loop once the payload's requests are sent.

        Returns the filled decoder, or None on a miss, a torn write, an outage or a timeout (a
        partly filled decoder is dropped). `open_decoder` may raise to refuse the header;
        a chunk of the wrong length raises `SnapshotCorrupt`.
        """
        if self.bulk is None:
            if on_transfer is not None:
                on_transfer()
            return await self.stream_snapshot(key, open_decoder, feed)
        got = await self._manifest(key)
        if got is None:
            return None
        manifest_len, (gen, n, chunk_bytes, payload_len, header) = got
        decoder = open_decoder(header)
        self.bytes_read += manifest_len
        sink: ChunkSink = decoder  # type: ignore[assignment]
        keys = [chunk_key(key, gen, i) for i in range(n)]
        ranges = chunk_ranges(payload_len, chunk_bytes)
        offsets = None
        shards = [chunk_shard(gen, i, len(self._shards)) for i in range(n)]
        if self.read_piece_bytes and self.read_piece_bytes < chunk_bytes:
            shard_of = dict(zip(keys, shards, strict=True))
            keys, ranges, offsets = piece_ranges(keys, ranges, self.read_piece_bytes)
            shards = [shard_of[k] for k in keys]
        timeout = self._transfer_timeout(payload_len)
        bulk = self.bulk

        async def fetch(_: aioredis.Redis) -> bool:
            read = bulk.start(len(keys))
            # the caller's CPU work waits until the requests are out and the reader threads woken
            loop = asyncio.get_running_loop()
            sent = None if on_transfer is None else functools.partial(loop.call_soon_threadsafe, on_transfer)
            try:
                return await asyncio.to_thread(bulk.read_into, read, keys, ranges, sink, timeout, offsets, shards,
                                               sent)
            except asyncio.CancelledError:
                read.abort()  # the worker threads stop at once; the sockets are not reused
                raise

        ok = await self._call("read_snapshot", fetch, timeout)
        if ok is not True:
            self.snapshot_misses += 1
            return None
        self.snapshot_hits += 1
        self.bytes_read += payload_len
        return decoder

    async def delete_snapshot(self, key: str) -> None:
        old = await self._call("getdel", lambda r: r.getdel(key))
        if isinstance(old, bytes):
            await self._unlink_chunks(key, old)

    # -- prefix anchors ---------------------------------------------------------------------------
    async def add_anchor_member(self, key: str, length: int, ttl_s: float | None = None) -> bool:
        async def add(r: aioredis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.sadd(key, length)
            pipe.pexpire(key, self._ttl(ttl_s))
            return await pipe.execute()

        return not isinstance(await self._call("anchor_add", add), _Unavailable)

    async def anchor_members(self, keys: Sequence[str]) -> list[set[int]] | None:
        """The cached lengths under each anchor key, in one round trip; None when unavailable."""

        async def members(r: aioredis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.smembers(k)
            return await pipe.execute()

        res = await self._call("anchor_members", members)
        if isinstance(res, _Unavailable):
            return None
        return [{int(m) for m in s} for s in res]

    async def remove_anchor_member(self, key: str, length: int) -> None:
        await self._call("anchor_rem", lambda r: r.srem(key, length))

    # -- token log --------------------------------------------------------------------------------
    async def get_token_log(self, key: str) -> list[int] | None:
        return decode_token_log(await self.get_bytes(key))

    async def set_token_log(self, key: str, token_ids: Sequence[int], ttl_s: float | None = None) -> bool:
        return await self.set_bytes(key, tokens_to_bytes(token_ids), ttl_s)

    async def set_token_log_checked(
        self, key: str, token_ids: Sequence[int], lease_key: str | None = None, lease_token: str | None = None,
        ttl_s: float | None = None,
    ) -> str | None:
        """Writes a committed turn's whole log, atomically checked (`_SET_LOG_CHECKED`): "written";
        "lease_lost" when `lease_key` no longer holds `lease_token`; "diverged" when the stored log
        is not a prefix of `token_ids` (another turn was committed since this one's log was read);
        None when Redis cannot say."""
        data = tokens_to_bytes(token_ids)
        res = await self._call(
            "set_log_checked",
            lambda r: self._set_log_checked(keys=[key, lease_key or key], args=[data, lease_token or "",
                                                                              self._ttl(ttl_s)], client=r),
        )
        if isinstance(res, _Unavailable):
            return None
        return {1: "written", 0: "lease_lost", -1: "diverged"}.get(res, "diverged")

    async def append_token_log(
        self, key: str, new_ids: Sequence[int], expected_len: int, ttl_s: float | None = None
    ) -> bool:
        """Appends if the stored log has `expected_len` ids; False on mismatch or outage."""
        data = tokens_to_bytes(new_ids)
        res = await self._call(
            "append_log",
            lambda r: self._append_log(keys=[key], args=[data, 4 * expected_len, self._ttl(ttl_s)], client=r),
        )
        return isinstance(res, int) and res >= 0

    # -- turn lease -------------------------------------------------------------------------------
    async def acquire_lease(self, key: str, token: str, ttl_s: float) -> bool | None:
        """True if acquired, False if someone holds it, None if Redis cannot say."""
        return (await self.acquire_lease_and_get(key, token, ttl_s, []))[0]

    async def acquire_lease_and_get(
        self, key: str, token: str, ttl_s: float, read_keys: Sequence[str]
    ) -> tuple[bool | None, list[bytes | None]]:
        """`acquire_lease` and, once it is acquired, a GET of each of `read_keys`, in one script
        (`_LEASE_AND_GET`): a turn on a replica needs the lease, the token log and the
        conversation's pointer, and each call of its own is another round trip through redis-py
        (0.4-0.5 ms each on the H200 host; a redis-py pipeline cost more than two calls on the CPU
        VM). The GETs run after the SET, atomically, so they see what the lease's holder would
        read next. (True, values), (False, []) when another turn holds the lease, (None, []) when
        Redis cannot say."""
        res = await self._call(
            "lease",
            lambda r: self._lease_and_get(keys=[key, *read_keys], args=[token, max(1, int(ttl_s * 1000))], client=r),
        )
        if isinstance(res, _Unavailable):
            return None, []
        if not isinstance(res, list) or not res or res[0] != 1:
            return False, []
        values = [v if isinstance(v, bytes) else None for v in res[1:]]
        return True, values + [None] * (len(read_keys) - len(values))

    async def release_lease(self, key: str, token: str) -> bool:
        res = await self._call("unlease", lambda r: self._release_lease(keys=[key], args=[token], client=r))
        return res == 1

    async def extend_lease(self, key: str, token: str, ttl_s: float) -> bool:
        res = await self._call(
            "extend_lease",
            lambda r: self._extend_lease(keys=[key], args=[token, max(1, int(ttl_s * 1000))], client=r),
        )
        return res == 1

    def stats(self) -> dict[str, int | str]:
        return {
            "redis_snapshot_hits": self.snapshot_hits,
            "redis_snapshot_misses": self.snapshot_misses,
            "redis_snapshot_writes": self.snapshot_writes,
            "redis_snapshot_write_failures": self.snapshot_write_failures,
            "redis_bytes_read": self.bytes_read,
            "redis_bytes_written": self.bytes_written,
            "redis_errors": self.num_errors,
            "redis_timeouts": self.num_timeouts,
            "redis_refused": self.num_refused,
            "redis_breaker_state": self.breaker.state,
            "redis_breaker_opens": self.breaker.num_opens,
            "redis_chunk_shards": len(self._shards),
        }
