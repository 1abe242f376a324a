"""A small real ASGI server that speaks gla-serve's documented streaming formats without a model.

It lets the load tool be tested end to end over real HTTP (uvicorn on a loopback port) before and
independently of the engine. "Tokens" are words. Conversations resumed by `conversation_id`, and chat
histories resent verbatim, report their earlier tokens as cached, as the real server's state cache
does. Faults are injected by request count so tests can predict them exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL_ID = "fake-gla"


@dataclass
class Faults:
    """Every n-th request (counting both streaming endpoints from 1) fails in the named way; 0 = never."""

    http_503_every: int = 0
    error_event_every: int = 0
    truncate_every: int = 0


@dataclass
class FakeState:
    token_delay_s: float = 0.002
    faults: Faults = field(default_factory=Faults)
    api_key: str | None = None
    num_requests: int = 0
    num_running: int = 0
    max_running: int = 0
    conversations: dict[str, int] = field(default_factory=dict)
    chat_states: dict[str, int] = field(default_factory=dict)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _count_tokens(text: str) -> int:
    return len(text.split())


def _history_key(messages: list[dict[str, Any]]) -> str:
    return json.dumps([[m.get("role"), m.get("content")] for m in messages])


def create_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    def admit(request: Request) -> tuple[int, JSONResponse | None]:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return 0, _error(401, "invalid API key")
        state.num_requests += 1
        n = state.num_requests
        if state.faults.http_503_every and n % state.faults.http_503_every == 0:
            return n, _error(503, "injected overload")
        return n, None

    async def accept(request: Request, input_field: str, input_type: type) -> tuple[dict, int, JSONResponse | None]:
        """Validate like the real server (OpenAI-shaped 4xx), then count the request and apply 503s."""
        body = await request.json()
        value, max_tokens = body.get(input_field), body.get("max_tokens", 16)
        if not isinstance(value, input_type) or not value:
            return body, 0, _error(422, f"{input_field} must be a non-empty {input_type.__name__}", input_field)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return body, 0, _error(422, "max_tokens must be an integer >= 1", "max_tokens")
        n, rejected = admit(request)
        return body, n, rejected

    def fault(n: int, every: int) -> bool:
        return bool(every) and n % every == 0

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "cache_size": len(state.conversations) + len(state.chat_states)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "test"}]}

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Any:
        body, n, rejected = await accept(request, "prompt", str)
        if rejected:
            return rejected
        prompt, max_tokens = body["prompt"], body.get("max_tokens", 16)
        cid = body.get("conversation_id")
        cached = state.conversations.get(cid, 0) if cid else 0
        prompt_tokens = cached + _count_tokens(prompt)

        async def events() -> AsyncIterator[str]:
            words = []
            async with running():
                for i in range(max_tokens):
                    await asyncio.sleep(state.token_delay_s)
                    if i == 1 and fault(n, state.faults.error_event_every):
                        yield "event: error\r\ndata: " + json.dumps({"error": "injected failure"}) + "\r\n\r\n"
                        return
                    if i == 1 and fault(n, state.faults.truncate_every):
                        return
                    words.append(f" w{i}")
                    token = {"id": i, "text": words[-1], "logprob": -0.5, "special": False}
                    yield "data: " + json.dumps({"token": token, "generated_text": None}) + "\r\n\r\n"
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens, "cached_tokens": cached}
                if cid:
                    state.conversations[cid] = prompt_tokens + max_tokens
                details = {"finish_reason": "length", "usage": usage, "conversation_id": cid}
                final = {"token": None, "generated_text": "".join(words), "details": details}
                yield "data: " + json.dumps(final) + "\r\n\r\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body, n, rejected = await accept(request, "messages", list)
        if rejected:
            return rejected
        messages, max_tokens = body["messages"], body.get("max_tokens", 16)
        cached = state.chat_states.get(_history_key(messages[:-1]), 0)
        prompt_tokens = sum(_count_tokens(str(m.get("content", ""))) for m in messages)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": MODEL_ID}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return "data: " + json.dumps({**base, "choices": [choice]}) + "\n\n"

        async def events() -> AsyncIterator[str]:
            words = []
            async with running():
                yield chunk({"role": "assistant", "content": ""})
                for i in range(max_tokens):
                    await asyncio.sleep(state.token_delay_s)
                    if i == 1 and fault(n, state.faults.error_event_every):
                        yield "data: " + json.dumps({"error": {"message": "injected failure"}}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if i == 1 and fault(n, state.faults.truncate_every):
                        return
                    words.append(f" w{i}")
                    yield chunk({"content": words[-1]})
                yield chunk({}, "length")
                reply = {"role": "assistant", "content": "".join(words)}
                state.chat_states[_history_key([*messages, reply])] = prompt_tokens + max_tokens
                if include_usage:
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                             "total_tokens": prompt_tokens + max_tokens,
                             "prompt_tokens_details": {"cached_tokens": cached}}
                    yield "data: " + json.dumps({**base, "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[None]:
        state.num_running += 1
        state.max_running = max(state.max_running, state.num_running)
        try:
            yield
        finally:
            state.num_running -= 1

    return app


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread; yields its base URL."""
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets, and without it Nagle's
    # algorithm holds each token until the client's delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
