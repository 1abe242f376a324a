"""A 48 MiB snapshot read in a process of its own, under the conditions a server differs in.

Why: inside the server the Redis tier's read of a 1.3B state took ~40-50 ms where
`bench_state_cache.py --resume-only` takes ~25 ms. This isolates the read (`BulkReader.read_into`)
and varies what could explain that: the destination (a plain buffer, or `SnapshotDecoder` into
pinned per-tensor memory with per-chunk crc32), idle time before each read (0 or 50 ms, a
person's think time), the chunk size (4 or 1 MiB), the sockets per read (16 or 32), and whether
4 MiB chunks are asked for whole (GET) or in GETRANGE pieces of 1 MiB or 256 KiB.

    python benchmarks/probe_read_conditions.py [redis-server args, e.g. --io-threads 4]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_bulk_read import RawSink  # noqa: E402

from server.state_cache.bulk_read import BulkReader, Endpoint, chunk_ranges  # noqa: E402
from server.state_cache.redis_tier import chunk_key, piece_ranges  # noqa: E402
from server.state_cache.snapshot import SnapshotDecoder, encode_snapshot  # noqa: E402
from tests.state_cache.redis_proc import RedisProcess  # noqa: E402

FP = b"probe-read-conditions".ljust(32, b"\0")


def main() -> None:
    tensors = {f"l{i}": torch.randn(4, 512, 256) for i in range(24)}  # the 1.3B shape's 48 MiB
    enc = encode_snapshot(tensors, num_tokens=5, prefix_hash=bytes(32), fingerprint=FP)
    payload = bytes(enc.payload)
    n = len(payload)
    pin = torch.cuda.is_available()
    if pin:  # torch's pinned cache warmed, as the engine does at start
        for _ in range(3):
            [torch.empty(4, 512, 256, pin_memory=True) for _ in range(24)]
    proc = RedisProcess(extra_args=sys.argv[1:])
    proc.start()
    try:
        r = redis.Redis.from_url(proc.url)
        ep = Endpoint.of_client(redis.asyncio.Redis.from_url(proc.url))
        assert ep is not None
        written = set()
        for cmib, piece in ((4, 0), (4, 1 << 20), (4, 256 << 10), (1, 0)):
            ranges = chunk_ranges(n, cmib << 20)
            keys = [chunk_key(f"p{cmib}", b"g", i) for i in range(len(ranges))]
            if cmib not in written:
                written.add(cmib)
                for key, (a, b) in zip(keys, ranges, strict=True):
                    r.set(key, payload[a:b])
            offsets = None
            if piece:
                keys, ranges, offsets = piece_ranges(keys, ranges, piece)
            for conns in (16, 32):
                reader = BulkReader(ep, conns)
                for sink_kind in ("raw", "decoder"):
                    for think in (0, 0.05):
                        ts = []
                        for _ in range(8):
                            time.sleep(think)
                            sink = RawSink(n) if sink_kind == "raw" else SnapshotDecoder(
                                enc.header_bytes, fingerprint=FP, pin_memory=pin, per_tensor=True)
                            t0 = time.perf_counter()
                            assert reader.read_into(reader.start(len(keys)), keys, ranges, sink, 10.0, offsets)
                            ts.append((time.perf_counter() - t0) * 1e3)
                        how = f"GETRANGE {piece >> 10} KiB" if piece else "GET"
                        print(f"chunk {cmib} MiB {how:15s} conns {conns} {sink_kind:8s} think {think * 1e3:3.0f} ms: "
                              f"median {statistics.median(ts[2:]):.1f} ms  {[round(t, 1) for t in ts]}", flush=True)
                reader.close()
        print(r.info("memory")["mem_allocator"], r.info("server")["redis_version"])
    finally:
        proc.stop()


if __name__ == "__main__":
    main()
