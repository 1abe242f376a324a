"""Where a Redis resume's time goes, part by part, on the machine it runs on.

The H200 host read a 48 MiB fp32 state in ~50 ms through `read_snapshot_into` where this 2-core box
takes ~20 ms for the socket part alone; this splits the read into what each layer costs: crc32
alone, sockets alone (a sink that keeps no checksum), sockets + checksum (`SnapshotDecoder`, plain
or pinned), for 1-8 connections, against a Redis with and without `io-threads`.

    python benchmarks/probe_bulk_read.py [--mib 48] [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.state_cache.bulk_read import BulkReader, Endpoint, chunk_ranges  # noqa: E402
from server.state_cache.redis_tier import chunk_key  # noqa: E402
from server.state_cache.snapshot import SnapshotDecoder, encode_snapshot  # noqa: E402
from tests.state_cache.redis_proc import RedisProcess  # noqa: E402

FP = b"probe-bulk-read".ljust(32, b"\0")


class RawSink:
    """A destination with no checksum: what the sockets alone cost."""

    def __init__(self, n: int) -> None:
        self.buf = bytearray(n)
        self.view = memoryview(self.buf)

    def views(self, start: int, stop: int) -> list[memoryview]:
        return [self.view[start:stop]]

    def part_checksum(self, start: int, stop: int) -> int | None:
        return None

    def absorb(self, start: int, stop: int, part_checksum: int | None = None) -> None:
        pass


def median_ms(fn: Any, reps: int) -> dict[str, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return {"median_ms": statistics.median(ts), "min_ms": ts[0], "max_ms": ts[-1]}


def crc_rows(payload: bytes, reps: int) -> list[dict[str, Any]]:
    rows = [{"op": "crc32, 1 thread", **median_ms(lambda: zlib.crc32(payload), reps)}]
    for k in (2, 4):
        step = len(payload) // k
        parts = [memoryview(payload)[i * step : (i + 1) * step] for i in range(k)]

        def par(parts: list[memoryview] = parts) -> None:
            ts = [threading.Thread(target=zlib.crc32, args=(p,)) for p in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        rows.append({"op": f"crc32, {k} threads (no combine)", **median_ms(par, reps)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n_layers = 24
    per = args.mib * (1 << 20) // n_layers // 4
    tensors = {f"l{i}": torch.randn(per) for i in range(n_layers)}
    enc = encode_snapshot(tensors, num_tokens=32768, prefix_hash=bytes(32), fingerprint=FP)
    payload = bytes(enc.payload)
    chunk = args.chunk_mib << 20
    ranges = chunk_ranges(len(payload), chunk)
    keys = [chunk_key("probe", b"g", i) for i in range(len(ranges))]
    rows: list[dict[str, Any]] = [{"op": "cpu", "value": os.cpu_count(), "torch": torch.__version__}]
    rows += crc_rows(payload, args.reps)
    pin = torch.cuda.is_available()
    for io_threads in (1, 4):
        proc = RedisProcess(extra_args=["--io-threads", str(io_threads)])
        proc.start()
        try:
            import redis

            r = redis.Redis.from_url(proc.url)
            for key, (a, b) in zip(keys, ranges, strict=True):
                r.set(key, payload[a:b])
            ep = Endpoint.of_client(redis.asyncio.Redis.from_url(proc.url))
            assert ep is not None
            for k in (1, 4, 8, 16):
                reader = BulkReader(ep, k)
                raw = RawSink(len(payload))

                def read_raw(reader: BulkReader = reader, raw: RawSink = raw) -> None:
                    assert reader.read_into(reader.start(len(keys)), keys, ranges, raw, 10.0)

                rows.append({"op": f"sockets only, {k} conns, redis io-threads {io_threads}",
                             **median_ms(read_raw, args.reps)})
                for pinned in (False, True) if pin else (False,):
                    def read_dec(reader: BulkReader = reader, pinned: bool = pinned) -> None:
                        dec = SnapshotDecoder(enc.header_bytes, fingerprint=FP, pin_memory=pinned, per_tensor=True)
                        assert reader.read_into(reader.start(len(keys)), keys, ranges, dec, 10.0)
                        dec.finish()

                    rows.append({"op": f"sockets + decoder{' pinned' if pinned else ''}, {k} conns, "
                                       f"redis io-threads {io_threads}", **median_ms(read_dec, args.reps)})
                reader.close()
            t0 = time.perf_counter()
            got = r.mget(keys)
            rows.append({"op": f"redis-py mget (hiredis={_hiredis()}), io-threads {io_threads}",
                         "median_ms": (time.perf_counter() - t0) * 1e3})
            del got
        finally:
            proc.stop()
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps({"mib": args.mib, "rows": rows}, indent=1))


def _hiredis() -> bool:
    try:
        import hiredis  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
