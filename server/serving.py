"""What the HTTP routes share: the server's runtime state, tokenization, tenants, and running a
request to completion while watching for the client to go away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from server.conversations import DEFAULT_TENANT, ConversationKey, ConversationStore
from server.engine import AsyncEngine, RequestStream
from server.errors import APIError, BadRequest, GenerationFailed, Unavailable
from server.sequence import RequestOutput
from server.settings import Settings

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


@dataclass
class ServerState:
    """Everything a route needs, on `app.state.server`. `engine` is None until the model is loaded."""

    settings: Settings
    conversations: ConversationStore
    engine: AsyncEngine | None = None
    tokenizer: Any = None
    model_name: str = "gla"
    is_ready: bool = False  # model loaded and a real 1-token generate ran
    drainer: Any = None  # server.drain.Drainer: once draining, new requests get 503
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def is_draining(self) -> bool:
        return self.drainer is not None and self.drainer.is_draining

    def require_engine(self) -> AsyncEngine:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.is_draining:
            raise Unavailable("the server is shutting down", headers=retry, code="draining")
        if self.load_error is not None:
            raise Unavailable(f"the model failed to load: {self.load_error}", code="load_failed")
        if self.engine is None or not self.is_ready:
            raise Unavailable("the model is still loading", headers=retry)
        return self.engine

    def tokenize(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this model has no tokenizer: send prompt_token_ids", param=param)
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        return self.engine is not None and token_id in self.engine.special_ids


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def tenant_of(request: Request) -> str:
    """The tenant the auth layer (issue 6) put on `request.state.tenant`, else the default one."""
    return getattr(request.state, "tenant", None) or DEFAULT_TENANT


def conversation_key(request: Request, conversation_id: str | None) -> ConversationKey | None:
    return ConversationKey(tenant_of(request), conversation_id) if conversation_id else None


@dataclass
class Completion:
    """A finished request, gathered from its stream."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    finished_at: float | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason.value if out.finish_reason is not None else None
            self.finished_at = time.perf_counter()
            if out.error is not None:
                raise GenerationFailed(out.error)

    @property
    def latency_ms(self) -> float:
        end = self.finished_at or time.perf_counter()
        return (end - self.started_at) * 1000

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / max(self.latency_ms / 1000, 1e-9)


async def collect(stream: RequestStream, completion: Completion | None = None) -> Completion:
    completion = completion or Completion()
    async for out in stream:
        completion.add(out)
    return completion


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T], stream: RequestStream, engine: AsyncEngine) -> T:
    """Await `work` unless the client leaves first; then abort the request and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    engine.abort(stream.request_id)
    raise ClientDisconnected(stream.request_id)


def bad_request_from(exc: ValueError, param: str | None = None) -> APIError:
    return BadRequest(str(exc), param=param)
