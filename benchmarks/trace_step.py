"""Where an engine decode step's wall time goes, host and GPU, at batch 1, 16 and 64.

Why: over HTTP at one stream the H200's inter-token latency is ~2.2 ms while the batch-1 decode
graph replays in ~1.34 ms, and the engine's "model" phase alone is ~1.8 ms: about 0.5 ms of host
work per step sits in series with the GPU. This runs the real `AsyncEngine` in-process (gla-1.3B
shape, random bf16 weights, CUDA graphs) and stamps each decode step: host time from the step's
start to the graph replay, the replay call, the sampler (which ends in the step's one host sync),
postprocess, and the loop's time between steps; plus the GPU time of the graph replay (CUDA events
around it) and of everything from the replay to the sync.

    python benchmarks/trace_step.py --batches 1 16 64 --out trace-step.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e_server import build_model  # noqa: E402

STEPS: list[dict[str, Any]] = []
CUR: dict[str, Any] = {}
LOOP: dict[str, float] = {}


def instrument(engine: Any) -> None:
    """Wrap the engine's step, the runner, the graphed decoder and the sampler with stamps."""
    runner = engine.runner
    step, run, sampler = engine._step, runner.run, runner.sampler
    decoder = runner.graphed_decoder
    cuda = torch.cuda.is_available()

    def event() -> Any:
        ev = torch.cuda.Event(enable_timing=True) if cuda else None
        if ev is not None:
            ev.record()
        return ev

    def timed_step() -> Any:
        CUR.clear()
        CUR.update({"loop_" + k: v for k, v in LOOP.items()})  # the loop's work since the last step
        LOOP.clear()
        CUR["step_in"] = time.perf_counter()
        out = step()
        CUR["step_out"] = time.perf_counter()
        STEPS.append(dict(CUR))
        return out

    def timed_run(batch: Any) -> Any:
        CUR["run_in"] = time.perf_counter()
        CUR["decode_batch"] = len(batch.decode)
        CUR["prefill_seqs"] = len(batch.prefill)
        out = run(batch)
        CUR["run_out"] = time.perf_counter()
        return out

    def timed_decoder(input_ids: Any, slots: Any) -> torch.Tensor:
        CUR["replay_in"] = time.perf_counter()
        ev0 = event()
        out = replay(input_ids, slots)
        CUR["ev"] = (ev0, event())
        CUR["replay_out"] = time.perf_counter()
        return out

    def timed_sampler(logits: torch.Tensor, rows: Any) -> Any:
        CUR["sample_in"] = time.perf_counter()
        out = sampler(logits, rows)
        CUR["ev_end"] = event()
        CUR["sample_out"] = time.perf_counter()
        return out

    def stamp(fn: Any, name: str) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            if name + "_in" in LOOP:  # e.g. _ingest's own _dispatch: the first call counts
                return fn(*a, **k)
            LOOP[name + "_in"] = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                LOOP[name + "_out"] = time.perf_counter()
        return wrapped

    for name in ("_dispatch", "_flush_prefix_stores", "_ingest"):
        setattr(engine, name, stamp(getattr(engine, name), name.strip("_")))
    engine._step = timed_step
    runner.run = timed_run
    runner.sampler = timed_sampler
    if decoder is not None:  # the engine replays from host lists
        replay = decoder.replay_lists
        decoder.replay_lists = timed_decoder
    else:  # CPU: the eager decode, timed in its place
        decode = runner.model.decode
        replay = lambda ids, slots: decode(ids, runner.pool, slots)  # noqa: E731
        runner.model.decode = lambda ids, pool, slots: timed_decoder(ids, slots)


def summarise(steps: list[dict[str, Any]]) -> dict[str, float]:
    """Medians (ms) over pure decode steps of the given batch, in step order."""
    rows: dict[str, list[float]] = {}

    def add(name: str, v: float) -> None:
        rows.setdefault(name, []).append(v)

    for prev, s in zip(steps, steps[1:], strict=False):
        if "ev" not in s or s.get("prefill_seqs"):
            continue
        ev0, ev1 = s["ev"]
        add("step_wall", 1e3 * (s["step_out"] - s["step_in"]))
        add("between_steps", 1e3 * (s["step_in"] - prev["step_out"]))
        if {"loop_dispatch_in", "loop_ingest_out"} <= s.keys():  # between_steps, split
            add("to_loop", 1e3 * (s["loop_dispatch_in"] - prev["step_out"]))
            add("dispatch", 1e3 * (s["loop_dispatch_out"] - s["loop_dispatch_in"]))
            if "loop_flush_prefix_stores_in" in s:
                add("yield_to_streams", 1e3 * (s["loop_flush_prefix_stores_in"] - s["loop_dispatch_out"]))
            add("ingest", 1e3 * (s["loop_ingest_out"] - s["loop_ingest_in"]))
            add("to_worker", 1e3 * (s["step_in"] - s["loop_ingest_out"]))
        add("schedule", 1e3 * (s["run_in"] - s["step_in"]))
        add("host_before_replay", 1e3 * (s["replay_in"] - s["run_in"]))
        add("replay_call", 1e3 * (s["replay_out"] - s["replay_in"]))
        add("replay_to_sampler", 1e3 * (s["sample_in"] - s["replay_out"]))
        add("sampler_incl_sync", 1e3 * (s["sample_out"] - s["sample_in"]))
        add("postprocess", 1e3 * (s["step_out"] - s["run_out"]))
        if ev0 is not None:
            ev1.synchronize()
            add("gpu_graph", ev0.elapsed_time(ev1))
            add("gpu_replay_to_host_sync", ev0.elapsed_time(s["ev_end"]))
        add("itl", 1e3 * (s["step_out"] - prev["step_out"]))
    return {k: statistics.median(v) for k, v in rows.items()} | {"steps": len(rows.get("itl", []))}


async def run_batch(engine: Any, batch: int, new_tokens: int, vocab: int) -> dict[str, float]:
    from server.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [torch.randint(3, vocab, (64,)).tolist() for _ in range(batch)]
    STEPS.clear()
    streams = [await engine.add_request(p, params) for p in prompts]
    for s in streams:
        async for _ in s:
            pass
    steps = [s for s in STEPS if s.get("decode_batch") == batch]
    return summarise(steps)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from model import load_tokenizer
    from server.conversations import LRUConversationStore
    from server.engine import AsyncEngine
    from server.settings import Settings

    cuda = torch.cuda.is_available()
    model = build_model(not cuda, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    tokenizer = load_tokenizer(None)
    settings = Settings(device="cuda" if cuda else "cpu", max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
                        max_tokens_cap=4096, log_level="warning")
    engine = AsyncEngine(model, tokenizer, settings, LRUConversationStore(2**30))
    await engine.start()
    await engine.warmup()
    instrument(engine)
    out = {}
    for b in args.batches:
        await run_batch(engine, b, 16, len(tokenizer))  # warm-up of this batch's shapes
        out[str(b)] = res = await run_batch(engine, b, args.new_tokens, len(tokenizer))
        print(f"B={b}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    await engine.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.out).write_text(json.dumps({
            "benchmark": "trace_step", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": commit, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "model": "gla-1.3B shape, random bf16", "new_tokens": args.new_tokens, "ms_medians": res}, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
