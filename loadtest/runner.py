"""Drives a run: Poisson or closed-loop arrivals of conversations, each a sequence of turns."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.clients import Conversation, send_turn
from loadtest.config import LoadConfig
from loadtest.records import TurnResult
from loadtest.workload import PromptSource

OnResult = Callable[[TurnResult, int], None]
"""Called after every turn with the result and the number of requests still in flight."""


@dataclass(slots=True)
class LoadRun:
    config: LoadConfig
    results: list[TurnResult]
    duration_s: float
    model: str | None
    server: dict[str, Any] = field(default_factory=dict)


class TurnBudget:
    """How many more turns may start: bounded by a count, a deadline, or both."""

    def __init__(self, num_requests: int | None, deadline: float | None) -> None:
        self._left = num_requests if num_requests is not None else math.inf
        self.deadline = deadline

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def reserve(self, turns: int) -> int:
        """Claim up to `turns` turns for a new conversation; 0 means the run is over."""
        if self.expired() or self._left <= 0:
            return 0
        granted = int(min(turns, self._left))
        self._left -= granted
        return granted


async def server_info(client: httpx.AsyncClient) -> tuple[dict[str, Any], str | None]:
    """Best effort: /health for the report, /v1/models for the chat `model` field."""
    info: dict[str, Any] = {}
    model = None
    for path in ("/health", "/v1/models"):
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await client.get(path, timeout=10.0)
            if response.status_code == 200:
                info[path.strip("/").replace("/", "_")] = response.json()
    models = (info.get("v1_models") or {}).get("data") or []
    if models and isinstance(models[0], dict):
        model = models[0].get("id")
    return info, model


class _Run:
    def __init__(self, cfg: LoadConfig, client: httpx.AsyncClient, model: str | None, on_result: OnResult):
        self.cfg = cfg
        self.client = client
        self.model = model
        self.on_result = on_result
        self.prompts = PromptSource(
            cfg.seed, cfg.prompt_words, cfg.followup_words, cfg.shared_prefix_words, cfg.prompts
        )
        self.results: list[TurnResult] = []
        self.in_flight = 0
        self.run_id = uuid.uuid4().hex[:8]
        self.limiter = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self.start = time.perf_counter()
        deadline = self.start + cfg.duration_s if cfg.duration_s is not None else None
        self.budget = TurnBudget(cfg.num_requests, deadline)
        self.last_end = self.start

    async def conversation(self, index: int, turns: int) -> None:
        conv = Conversation(index=index, conversation_id=f"loadtest-{self.run_id}-{index}")
        think = random.Random(f"think-{self.cfg.seed}-{index}")
        for turn_index, text in enumerate(self.prompts.conversation(index, turns)):
            if turn_index > 0:
                if self.cfg.think_time_s > 0:
                    await asyncio.sleep(think.expovariate(1.0 / self.cfg.think_time_s))
                if self.budget.expired():
                    return
            result = await self._turn(conv, turn_index, text)
            if not result.ok:
                return  # the server kept the conversation as it was; later turns would not match it

    async def _turn(self, conv: Conversation, turn_index: int, text: str) -> TurnResult:
        async with self.limiter if self.limiter else contextlib.nullcontext():
            self.in_flight += 1
            try:
                result = await send_turn(self.client, self.cfg, conv, turn_index, text, self.model, self.start)
            finally:
                self.in_flight -= 1
        self.results.append(result)
        self.last_end = time.perf_counter()
        self.on_result(result, self.in_flight)
        return result

    async def poisson(self) -> None:
        rate = self.cfg.rate
        assert rate is not None
        arrivals = random.Random(f"arrivals-{self.cfg.seed}")
        tasks = []
        for index in itertools.count():
            turns = self.budget.reserve(self.cfg.turns)
            if turns == 0:
                break
            tasks.append(asyncio.create_task(self.conversation(index, turns)))
            delay = arrivals.expovariate(rate) if math.isfinite(rate) else 0.0
            if self.budget.deadline is not None:
                delay = min(delay, max(0.0, self.budget.deadline - time.perf_counter()))
            await asyncio.sleep(delay)
        await asyncio.gather(*tasks)

    async def closed_loop(self) -> None:
        indices = itertools.count()

        async def user() -> None:
            while turns := self.budget.reserve(self.cfg.turns):
                await self.conversation(next(indices), turns)

        await asyncio.gather(*(user() for _ in range(self.cfg.concurrency)))


async def run_load(cfg: LoadConfig, on_result: OnResult | None = None) -> LoadRun:
    """Run the load described by `cfg` against `cfg.base_url` and return every turn's measurements.

    Example:
        run = asyncio.run(run_load(LoadConfig(base_url="http://127.0.0.1:8000", num_requests=50)))
        summary = summarize(run.results, run.duration_s)
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=min(10.0, cfg.request_timeout_s))
    # Without TCP_NODELAY, Nagle's algorithm and delayed ACKs can add ~40 ms to a request.
    transport = httpx.AsyncHTTPTransport(
        limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    async with httpx.AsyncClient(
        base_url=cfg.base_url, timeout=timeout, transport=transport, headers=headers
    ) as client:
        server, discovered = await server_info(client)
        model = cfg.model or discovered
        run = _Run(cfg, client, model, on_result or (lambda result, in_flight: None))
        await (run.poisson() if cfg.arrival == "poisson" else run.closed_loop())
    return LoadRun(cfg, run.results, run.last_end - run.start, model, server)
