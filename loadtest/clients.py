"""One conversation turn over HTTP: resume by `conversation_id` on /generate_stream, or resend the
whole history on /v1/chat/completions. Every failure becomes `TurnResult.error`, never an exception,
so one bad request cannot stop a run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.config import LoadConfig
from loadtest.records import TurnResult
from loadtest.sse import aiter_sse
from loadtest.streams import ChatStreamReader, GenerateStreamReader, error_message_of

_MAX_ERROR_BODY_BYTES = 64 * 1024


@dataclass(slots=True)
class Conversation:
    index: int
    conversation_id: str
    messages: list[dict[str, str]] = field(default_factory=list)


def generate_body(cfg: LoadConfig, conv: Conversation, user_text: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": user_text,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
    }
    if cfg.turns > 1 and cfg.use_conversation_id:
        body["conversation_id"] = conv.conversation_id
    body.update(cfg.extra_body)
    return body


def chat_body(cfg: LoadConfig, conv: Conversation, user_text: str, model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [*conv.messages, {"role": "user", "content": user_text}],
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    body.update(cfg.extra_body)
    return body


async def send_turn(
    client: httpx.AsyncClient,
    cfg: LoadConfig,
    conv: Conversation,
    turn_index: int,
    user_text: str,
    model: str | None,
    run_start: float,
) -> TurnResult:
    """Send one turn, read its stream to the end, and on success advance the conversation."""
    result = TurnResult(api=cfg.api, conversation_index=conv.index, turn_index=turn_index)
    if cfg.api == "chat":
        path, body = "/v1/chat/completions", chat_body(cfg, conv, user_text, model)
    else:
        path, body = "/generate_stream", generate_body(cfg, conv, user_text)
    start = time.perf_counter()
    result.start_s = start - run_start
    reader = ChatStreamReader(result, start) if cfg.api == "chat" else GenerateStreamReader(result, start)
    try:
        async with client.stream("POST", path, json=body) as response:
            result.status_code = response.status_code
            if response.status_code != 200:
                result.error = f"http {response.status_code}: {await _error_text(response)}"
                return reader.close()
            async for event in aiter_sse(response.aiter_text()):
                reader.feed(event)
    except httpx.TimeoutException as exc:
        result.error = f"timeout: {type(exc).__name__} after {cfg.request_timeout_s:g} s"
    except httpx.HTTPError as exc:
        result.error = f"transport: {type(exc).__name__}: {exc}"
    result = reader.close()
    if result.ok:
        advance(conv, user_text, result)
    return result


async def _error_text(response: httpx.Response) -> str:
    raw = b""
    async for chunk in response.aiter_bytes():
        raw += chunk
        if len(raw) > _MAX_ERROR_BODY_BYTES:
            break
    try:
        return error_message_of(json.loads(raw))
    except ValueError:
        return raw[:300].decode("utf-8", errors="replace")


def advance(conv: Conversation, user_text: str, result: TurnResult) -> None:
    """After a successful turn: the history grows and the server's conversation id is adopted."""
    conv.messages.append({"role": "user", "content": user_text})
    conv.messages.append({"role": "assistant", "content": result.text})
    if result.conversation_id:
        conv.conversation_id = result.conversation_id
