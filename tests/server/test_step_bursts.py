"""Step bursts (`step_bursts`): steps run back to back on the worker thread, outputs still stream.

On CUDA they are on by default; here they are forced on against a server with them off, through
real HTTP: the same greedy tokens, every token its own SSE event delivered before the stream's end,
and requests that arrive or leave mid-burst are admitted or aborted as usual.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.server.conftest import start_server

PROMPTS = ["ROMEO:", "JULIET: O Romeo", "First Citizen:\nBefore we proceed"]


async def _stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[list[int], list[float]]:
    ids, times = [], []
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"token"' in line:
                event = json.loads(line[5:])
                if event.get("token"):
                    ids.append(event["token"]["id"])
                    times.append(time.perf_counter())
    return ids, times


async def _run(url: str) -> list[tuple[list[int], list[float]]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        first = asyncio.create_task(_stream(c, PROMPTS[0], 24))
        await asyncio.sleep(0.05)  # the others arrive while the first one decodes
        rest = [asyncio.create_task(_stream(c, p, 12)) for p in PROMPTS[1:]]
        # one that leaves mid-generation: its abort must end the burst and free the slot
        async with c.stream("POST", "/generate_stream", json={"prompt": "KING:", "max_tokens": 200}) as r:
            async for line in r.aiter_lines():
                if '"token"' in line:
                    break
        return [await first] + [await t for t in rest]


def test_bursts_stream_the_same_tokens_one_event_per_token() -> None:
    results = {}
    for bursts in (False, True):
        srv = start_server(step_bursts=bursts)
        try:
            assert srv.state.engine._bursts is bursts
            results[bursts] = asyncio.run(_run(srv.url))
            health = srv.wait_idle()
            assert (health["burst_steps"] > 0) is bursts, health
        finally:
            srv.stop()
    for (ids_off, _), (ids_on, times) in zip(results[False], results[True], strict=True):
        assert ids_on == ids_off and ids_on
        assert len(set(times)) > 1  # streamed as generated, not delivered in one piece at the end

