"""Reads a snapshot's chunks from Redis straight into the state's memory, over plain sockets.

Why: through redis-py + hiredis every chunk of a 48 MiB state becomes a `bytes` reply object
(allocated, page-faulted, parsed on the event loop) and is then copied again into the decoder's
tensors. Here a few sockets each send pipelined GETs for their share of the chunks and
`recv_into` the destination (pinned memory on CUDA) directly: no reply objects, no second copy.
Each reader thread checksums its own chunks as they land, and the coordinator combines those
crc32s in payload order (`crc.py`), so only the last chunk's checksum follows the last byte.
Several connections matter: Redis writes at most 64 KiB per client per event-loop turn, so one
connection leaves it idle between turns (2-core CI box, 48 MiB over loopback: one socket
31 ms, four 17 ms, redis-py MGET 51 ms without and ~18 ms with the malloc tuning).

Only plain GET replies are spoken (RESP2 bulk strings), after AUTH and SELECT. TLS uses the
`ssl.SSLContext` redis-py builds from the same URL and options, so certificates behave the same.
Anything unusual (a credential provider, an unknown connection class) means no bulk reader, and
the tier falls back to MGET.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, ResponseError

from server.state_cache.snapshot import SnapshotCorrupt

log = logging.getLogger(__name__)

_MAX_LINE = 128  # a bulk-string header is "$<up to 20 digits>\r\n"; error lines are cut here
_IOV_MAX = 512  # buffers per recvmsg_into (Linux takes up to 1024)
RECV_SLICE_S = 0.05  # longest wait in one receive syscall before the reader looks at what it has
# plain sockets receive each connection's replies in one scatter syscall (`_Conn.recv_share`);
# GLA_BULK_SCATTER=0 reads them reply by reply (header line, payload, CRLF) as before, to compare
# (H200, 8 shards: read 8.1-10.0 ms with 16 sockets, 9.8 ms against 11.3 with 32; one
# syscall per reply instead, removed since, 9.8-10.9 ms)
SCATTER = os.environ.get("GLA_BULK_SCATTER", "1") != "0"


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))


class ChunkSink(Protocol):
    """Where the payload goes (`SnapshotDecoder`): writable views of a byte range, a range's own
    checksum (any thread, once written; None if the checksum does not combine), and a call that
    takes a written range into the payload checksum, in payload order."""

    def views(self, start: int, stop: int) -> list[memoryview]: ...

    def part_checksum(self, start: int, stop: int) -> int | None: ...

    def absorb(self, start: int, stop: int, part_checksum: int | None = None) -> None: ...


@dataclass(frozen=True)
class Endpoint:
    """How to open one authenticated connection to the Redis that redis-py is configured for."""

    host: str | None
    port: int
    path: str | None  # unix socket
    db: int
    username: str | None
    password: str | None
    ssl_context: ssl.SSLContext | None
    server_hostname: str | None

    @classmethod
    def of_client(cls, client: Any) -> Endpoint | None:
        """From a `redis.asyncio.Redis`'s pool; None where the bulk path does not apply."""
        pool = client.connection_pool
        conn_cls, kw = pool.connection_class, dict(pool.connection_kwargs)
        if kw.get("credential_provider") is not None or kw.get("protocol") not in (None, 2, "2"):
            return None
        common = dict(db=int(kw.get("db") or 0), username=kw.get("username"), password=kw.get("password"))
        if issubclass(conn_cls, UnixDomainSocketConnection):
            return cls(host=None, port=0, path=kw["path"], ssl_context=None, server_hostname=None, **common)
        host, port = kw.get("host", "localhost"), int(kw.get("port", 6379))
        ctx = None
        if issubclass(conn_cls, SSLConnection):
            try:
                ctx = conn_cls(**kw).ssl_context.get()  # redis-py's own certificate handling
            except Exception as e:  # noqa: BLE001 - any trouble here only costs the fast path
                log.warning("no bulk snapshot reads over TLS: %r", e)
                return None
        elif conn_cls.__name__ != "Connection":
            return None
        return cls(host=host, port=port, path=None, ssl_context=ctx, server_hostname=host, **common)


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class _Conn:
    """One socket that speaks just enough RESP2 for AUTH, SELECT and GET.

    Why the buffer and the blocking whole-chunk reads: each `recv` releases and retakes the GIL,
    and in a serving process a reader thread that wants the GIL back can wait out another
    thread's switch interval (5 ms). A byte-at-a-time header parser and partial `recv_into`s
    made a 48 MiB read cost hundreds of such hand-offs (35 -> 150 ms on the 2-core box next to
    one busy Python thread). Here a header costs one small `recv`, and a plain socket takes a
    chunk's payload in one blocking `recv_into(MSG_WAITALL)`, its timeout kept by SO_RCVTIMEO.
    """

    _BUF = 4096

    def __init__(self, ep: Endpoint, timeout_s: float) -> None:
        if ep.path is not None:
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(timeout_s)
            raw.connect(ep.path)
        else:
            raw = socket.create_connection((ep.host, ep.port), timeout=timeout_s)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray(self._BUF)
        self._start = self._end = 0  # buffered, not yet consumed: _buf[_start:_end]
        # plain sockets take a reply's payload in one blocking recv (TLS ones cannot)
        self.waitall = ep.ssl_context is None and hasattr(socket, "MSG_WAITALL")
        self._applied: tuple[float, bool] | None = None  # (timeout, SCATTER) the socket is set for
        try:
            self.sock: socket.socket = (
                ep.ssl_context.wrap_socket(raw, server_hostname=ep.server_hostname) if ep.ssl_context else raw
            )
            hello: list[bytes] = []
            if ep.password is not None:
                auth = [b"AUTH"] + ([ep.username.encode()] if ep.username else []) + [ep.password.encode()]
                hello.append(_command(*auth))
            if ep.db:
                hello.append(_command(b"SELECT", str(ep.db).encode()))
            if hello:
                self.sock.sendall(b"".join(hello))
                for _ in hello:
                    line = self.readline()
                    if not line.startswith(b"+"):
                        raise AuthenticationError(line.decode(errors="replace"))
        except BaseException:
            raw.close()
            raise

    def set_timeout(self, timeout_s: float) -> None:
        """Every blocking call below gives up after `timeout_s` (a stuck Redis is an OSError);
        `recv_share` waits in slices of at most `RECV_SLICE_S`, its deadline kept by the caller."""
        if (timeout_s, SCATTER) == self._applied:  # a pooled socket keeps its settings: no syscalls
            return
        self._applied = (timeout_s, SCATTER)
        if not self.waitall:
            self.sock.settimeout(timeout_s)
            return
        # MSG_WAITALL needs a blocking socket (a Python timeout makes it non-blocking), so the
        # kernel keeps the timeout instead
        self.sock.settimeout(None)
        recv_s = min(timeout_s, RECV_SLICE_S) if SCATTER else timeout_s
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(recv_s))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))

    def readline(self) -> bytes:
        """One reply line without its CRLF."""
        while True:
            end = self._buf.find(b"\r\n", self._start, self._end)
            if end >= 0:
                line = bytes(self._buf[self._start : end])
                self._start = end + 2
                return line
            if self._end - self._start > _MAX_LINE:
                raise ResponseError(f"unexpected reply {bytes(self._buf[self._start : self._start + 40])!r}")
            if self._start:  # keep the partial line at the front
                rest = self._end - self._start
                self._buf[:rest] = self._buf[self._start : self._end]
                self._start, self._end = 0, rest
            got = self.sock.recv_into(memoryview(self._buf)[self._end :])
            if got == 0:
                raise ConnectionError("redis closed the connection")
            self._end += got

    def recv_exactly(self, view: memoryview) -> None:
        n = len(view)
        pos = min(n, self._end - self._start)  # what the header's recv already pulled in
        if pos:
            view[:pos] = self._buf[self._start : self._start + pos]
            self._start += pos
        flags = socket.MSG_WAITALL if self.waitall else 0
        while pos < n:
            got = self.sock.recv_into(view[pos:], n - pos, flags)
            if got == 0:
                raise ConnectionError("redis closed the connection mid-reply")
            pos += got

    def recv_share(self, bufs: list[memoryview], deadline: float, check: Callable[[int], None]) -> None:
        """Fills `bufs` in order from the socket, each syscall taking as many of them as it can.

        Why: a piece read as header line, payload and trailer cost three `recv`s, and each one
        gives the GIL back and must win it again (a hand-off to a sleeping thread is a wake-up of
        0.13-0.19 ms on the idle H200 host). With the replies' lengths known in advance, one
        `recvmsg_into(MSG_WAITALL)` scatters a socket's replies (headers into small buffers,
        payloads into the state, CRLFs) in a single syscall. (The read stays bound by how fast the
        Redis servers deliver: a receive loop in C without the GIL was no faster.)

        `check(n)` runs after each syscall with the bytes received so far and raises on a reply
        that does not match its expected header (so a short reply, say a missing key's, is caught
        after at most one `RECV_SLICE_S`, when the kernel returns what it has).
        """
        total = sum(b.nbytes for b in bufs)
        got, i, off = 0, 0, 0  # bytes so far; the first unfilled buffer and how much of it is filled
        while got < total:
            iov = [bufs[i][off:], *bufs[i + 1 : i + _IOV_MAX]]
            try:
                n = self.sock.recvmsg_into(iov, 0, socket.MSG_WAITALL)[0]
            except BlockingIOError:  # SO_RCVTIMEO: nothing arrived in this slice
                n = -1
            if n == 0:
                raise ConnectionError("redis closed the connection mid-reply")
            if n > 0:
                got += n
                n += off
                while i < len(bufs) and n >= bufs[i].nbytes:
                    n -= bufs[i].nbytes
                    i += 1
                off = n
                check(got)
            if got < total and time.monotonic() > deadline:
                raise TimeoutError("bulk snapshot read timed out")

    def is_stale(self) -> bool:
        """True when an idle connection has something to read: Redis closed it (restart, timeout),
        or bytes of an earlier reply are left over."""
        if self._end > self._start:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover - best effort
            pass


class _Read:
    """One `read_into` in flight: its connections (so `abort` can cut them) and its outcome."""

    def __init__(self, n: int) -> None:
        self.done = [threading.Event() for _ in range(n)]
        self.checksums: list[int | None] = [None] * n  # each chunk's own, from its reader thread
        self.error: BaseException | None = None
        self.missing = False
        self.aborted = False
        self.conns: list[_Conn] = []
        self.lock = threading.Lock()

    def fail(self, e: BaseException | None, missing: bool = False) -> None:
        with self.lock:
            if self.error is None and not self.missing:
                self.error, self.missing = e, missing
        for ev in self.done:
            ev.set()

    def abort(self) -> None:
        self.aborted = True
        self.fail(TimeoutError("bulk snapshot read abandoned"))
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Workers:
    """Threads that run a read's per-connection tasks, each on its own thread, all at once.

    Why not a ThreadPoolExecutor: it starts a thread only when its count of idle threads says none
    is free, and that count runs ahead of the threads really waiting (each finished task adds one),
    so on the H200 host a read's 24 tasks ran on 19 threads and the last ones waited for earlier
    ones to finish. Here a task goes to an idle thread or a new one, never into a queue.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._idle: list[queue.SimpleQueue[tuple[Callable[[], None], Future[None]] | None]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.started = 0

    def run(self, tasks: Sequence[Callable[[], None]]) -> list[Future[None]]:
        futures: list[Future[None]] = []
        for task in tasks:
            fut: Future[None] = Future()
            with self._lock:
                if self._closed:
                    raise RuntimeError("bulk reader closed")
                inbox = self._idle.pop() if self._idle else None
                if inbox is None:
                    self.started += 1
                    inbox = queue.SimpleQueue()
                    threading.Thread(target=self._loop, args=(inbox,), daemon=True,
                                     name=f"{self._name}-{self.started}").start()
            inbox.put((task, fut))
            futures.append(fut)
        return futures

    def _loop(self, inbox: queue.SimpleQueue[tuple[Callable[[], None], Future[None]] | None]) -> None:
        while (item := inbox.get()) is not None:
            task, fut = item
            error: BaseException | None = None
            try:
                task()
            except BaseException as e:  # noqa: BLE001 - handed to the reader through the future
                error = e
            with self._lock:  # idle again before the reader hears of it: its next read finds this thread
                closed = self._closed
                if not closed:
                    self._idle.append(inbox)
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(None)
            del item, task, fut, error  # nothing of this read stays referenced while the thread idles
            if closed:
                return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)


class BulkReader:
    """Pooled plain connections and reader threads for `RedisTier.read_snapshot_into`.

    Args:
        endpoints: where Redis is (`Endpoint.of_client`); several when a snapshot's chunks are
            spread over shards (`RedisTier` chunk_urls), each read piece naming its shard.
        connections: sockets per read, split evenly over the shards (at least one each); a
            shard's i-th piece goes to its connection i % (its share). On the H200 host, with
            each socket's replies in one receive, 8 shards read 48 MiB as fast with 16 sockets
            in all as with 32 or faster (64 measured slower in an earlier session).
        connect_timeout_s: connect + AUTH limit for a new socket.
    """

    def __init__(
        self, endpoints: Endpoint | Sequence[Endpoint], connections: int = 4, connect_timeout_s: float = 0.5
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.endpoints = [endpoints] if isinstance(endpoints, Endpoint) else list(endpoints)
        if not self.endpoints:
            raise ValueError("at least one endpoint")
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[list[_Conn]] = [[] for _ in self.endpoints]
        self._lock = threading.Lock()
        self.per_shard = -(-connections // len(self.endpoints))
        self._pool = _Workers("gla-redis-bulk")
        self.reads = 0
        self.reconnects = 0

    def _checkout(self, timeout_s: float, shard: int = 0) -> _Conn:
        idle = self._idle[shard]
        while True:
            with self._lock:
                conn = idle.pop() if idle else None
            if conn is None:
                self.reconnects += 1
                conn = _Conn(self.endpoints[shard], self.connect_timeout_s)
                break
            if not conn.is_stale():
                break
            conn.close()
        conn.set_timeout(timeout_s)
        return conn

    def _checkin(self, conns: Sequence[_Conn], shard: int = 0) -> None:
        idle = self._idle[shard]
        with self._lock:
            idle.extend(conns)
            extra = idle[2 * self.per_shard :]
            del idle[2 * self.per_shard :]
        for c in extra:
            c.close()

    def drop_idle(self) -> None:
        """Closes pooled connections (the tier calls this when its breaker opens)."""
        with self._lock:
            idle = [c for pool in self._idle for c in pool]
            for pool in self._idle:
                pool.clear()
        for c in idle:
            c.close()

    def close(self) -> None:
        self.drop_idle()
        self._pool.close()

    def start(self, n: int) -> _Read:
        return _Read(n)

    def read_into(
        self,
        read: _Read,
        keys: Sequence[str],
        ranges: Sequence[tuple[int, int]],
        sink: ChunkSink,
        timeout_s: float,
        offsets: Sequence[int] | None = None,
        shards: Sequence[int] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> bool:
        """Blocking (run it in a thread): fetches chunk `keys[i]` into `sink.views(*ranges[i])`;
        with `offsets`, only the part of `keys[i]` that starts at `offsets[i]` (GETRANGE), so a
        chunk can arrive as several pieces (`redis_tier.piece_ranges`); with `shards`, piece i
        comes from `endpoints[shards[i]]` (default: the first endpoint). `on_sent()` is called
        once every request is on its way.

        Returns True once every chunk has landed and been absorbed in order, False when a chunk is
        missing (expired or replaced since the manifest was read: a miss). Raises
        `SnapshotCorrupt` for a chunk of the wrong length, `ResponseError` for an error reply, and
        OSError / TimeoutError for connection trouble (the caller's breaker counts those); after
        any of them the sink holds a partial payload and must be dropped.
        """
        deadline = time.monotonic() + timeout_s
        if shards is None:
            shards = [0] * len(keys)
        elif len(shards) != len(keys) or any(not 0 <= s < len(self.endpoints) for s in shards):
            raise ValueError("shards must name an endpoint for every key")
        # per connection: its shard and the pieces it asks for, round-robin within each shard
        plan: list[tuple[int, list[int]]] = []
        for shard in range(len(self.endpoints)):
            mine = [i for i, s in enumerate(shards) if s == shard]
            k = min(self.per_shard, len(mine))
            plan.extend((shard, mine[j::k]) for j in range(k))
        if offsets is None:
            commands = [_command(b"GET", key.encode()) for key in keys]
        else:
            commands = [_command(b"GETRANGE", key.encode(), b"%d" % off, b"%d" % (off + b - a - 1))
                        for key, off, (a, b) in zip(keys, offsets, ranges, strict=True)]
        # each socket's requests go out from here as soon as it is checked out, before any reader
        # thread runs: the Redis servers start replying while the threads are still being woken
        # (each needs the GIL once to start), and the replies wait in the receive buffers meanwhile
        try:
            conns = self._send(plan, commands, timeout_s)
        except BaseException as e:
            read.fail(e)
            raise
        with read.lock:
            read.conns = conns
        if read.aborted:  # abandoned while connecting
            for c in conns:
                c.close()
            raise TimeoutError("bulk snapshot read abandoned")
        getrange = offsets is not None
        futures = self._pool.run([
            functools.partial(self._share_worker, read, conn, indices, ranges, sink, getrange, deadline)
            if conn.waitall and SCATTER else
            functools.partial(self._worker, read, conn, indices, ranges, sink, getrange)
            for conn, (_, indices) in zip(conns, plan, strict=True)
        ])
        if on_sent is not None:
            on_sent()
        ok = False
        try:
            for i, (start, stop) in enumerate(ranges):
                if not read.done[i].wait(max(0.0, deadline - time.monotonic())):
                    read.fail(TimeoutError("bulk snapshot read timed out"))
                if read.missing:
                    return False
                if read.error is not None:
                    raise read.error
                sink.absorb(start, stop, read.checksums[i])
            ok = True
            return True
        finally:
            if not ok:
                read.abort()  # unblocks the workers; their sockets are closed below, not pooled
            for f in futures:
                try:
                    f.result(timeout=max(0.1, deadline - time.monotonic()) if ok else None)
                except BaseException:  # noqa: BLE001 - the first error is already in `read`
                    ok = False
            if ok:
                self.reads += 1
                for shard in range(len(self.endpoints)):
                    self._checkin([c for c, (s, _) in zip(conns, plan, strict=True) if s == shard], shard)
            else:
                for c in conns:
                    c.close()

    def _send(self, plan: Sequence[tuple[int, list[int]]], commands: Sequence[bytes], timeout_s: float) -> list[_Conn]:
        """Checks out one connection per plan entry and sends it its requests (closes them all and
        raises on any failure)."""
        conns: list[_Conn] = []
        try:
            for shard, indices in plan:
                conns.append(self._checkout(timeout_s, shard))
                conns[-1].sock.sendall(b"".join(commands[i] for i in indices))
        except BaseException:
            for c in conns:
                c.close()
            raise
        return conns

    @staticmethod
    def _worker(
        read: _Read,
        conn: _Conn,
        indices: list[int],
        ranges: Sequence[tuple[int, int]],
        sink: ChunkSink,
        getrange: bool,
    ) -> None:
        """Receives the replies to the requests `read_into` sent on `conn`, in order, reply by
        reply (TLS sockets, or `GLA_BULK_SCATTER=0`; the socket's timeout bounds each receive)."""
        try:
            for i in indices:
                if read.error is not None or read.missing:
                    raise ConnectionAbortedError("another connection of this read failed")
                line = conn.readline()
                start, stop = ranges[i]
                # GET answers nil for a missing key, GETRANGE an empty string (an empty GET reply
                # stays a wrong length: corrupt)
                if line == b"$-1" or (getrange and line == b"$0" and stop > start):
                    read.fail(None, missing=True)
                    raise ConnectionAbortedError("chunk missing")
                if not line.startswith(b"$"):
                    raise ResponseError(line[1:].decode(errors="replace") if line.startswith(b"-") else
                                        f"unexpected reply {line[:40]!r}")
                if int(line[1:]) != stop - start:
                    raise SnapshotCorrupt(f"snapshot chunk {i} is {int(line[1:])} bytes, expected {stop - start}")
                for view in sink.views(start, stop):
                    conn.recv_exactly(view)
                if conn.readline() != b"":
                    raise ResponseError("bulk reply not terminated by CRLF")
                # checksummed here, in parallel, so only the last chunk's crc follows the last byte
                read.checksums[i] = sink.part_checksum(start, stop)
                read.done[i].set()
        except BaseException as e:
            read.fail(e)
            raise

    @staticmethod
    def _share_worker(
        read: _Read,
        conn: _Conn,
        indices: list[int],
        ranges: Sequence[tuple[int, int]],
        sink: ChunkSink,
        getrange: bool,
        deadline: float,
    ) -> None:
        """`_worker` for a plain socket: its replies all land through one `recv_share` (headers
        in small buffers checked against the lengths asked for, payloads in place, CRLFs), so one
        GIL hand-off starts it and one ends it however many pieces it carries; each piece is
        checked and checksummed as the bytes received pass its end."""
        try:
            bufs: list[memoryview] = []
            pieces: list[tuple[int, bytes, bytearray, bytearray, int, int]] = []  # i, want, header, crlf, begin, end
            pos = 0
            for i in indices:
                start, stop = ranges[i]
                want = b"$%d\r\n" % (stop - start)
                header, trailer = bytearray(len(want)), bytearray(2)
                end = pos + len(want) + stop - start + 2
                pieces.append((i, want, header, trailer, pos, end))
                bufs += [memoryview(header), *sink.views(start, stop), memoryview(trailer)]
                pos = end
            done = 0

            def check(got: int) -> None:
                nonlocal done
                if read.error is not None or read.missing:
                    raise ConnectionAbortedError("another connection of this read failed")
                while done < len(pieces):
                    i, want, header, trailer, begin, end = pieces[done]
                    seen = min(got - begin, len(want))
                    if seen <= 0:
                        return
                    if header[:seen] != want[:seen]:
                        _bad_reply(read, i, want, bytes(header[:seen]), getrange)
                    if got < end:
                        return
                    if trailer != b"\r\n":
                        raise ResponseError("bulk reply not terminated by CRLF")
                    read.checksums[i] = sink.part_checksum(*ranges[i])
                    read.done[i].set()
                    done += 1

            conn.recv_share(bufs, deadline, check)
        except BaseException as e:
            read.fail(e)
            raise


def _bad_reply(read: _Read, index: int, want: bytes, got: bytes, getrange: bool) -> None:
    """Raises for a reply whose first bytes differ from the header asked for (after them, the
    stream is out of step, so the connection is dropped with the read)."""
    expected = int(want[1:-2])
    if got.startswith(b"$-") or (getrange and got.startswith(b"$0") and expected):
        # GET answers nil for a missing key, GETRANGE an empty string (an empty GET reply stays
        # a wrong length: corrupt)
        read.fail(None, missing=True)
        raise ConnectionAbortedError("chunk missing")
    if got.startswith(b"-"):
        raise ResponseError(got[1:].split(b"\r")[0].decode(errors="replace"))
    digits = got[1:].split(b"\r")[0]
    if got.startswith(b"$") and digits.isdigit():
        at_least = "" if b"\r" in got else "at least "
        raise SnapshotCorrupt(f"snapshot chunk {index} is {at_least}{int(digits)} bytes, expected {expected}")
    raise ResponseError(f"unexpected reply {got[:40]!r}")


def chunk_ranges(payload_len: int, chunk_bytes: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_bytes, payload_len)) for a in range(0, payload_len, chunk_bytes)]
