"""Readers that turn the server's SSE events into a TurnResult, one per wire format.

They are pure (events and timestamps in, fields out) so the formats are unit-tested without a server.
A turn counts as complete only when the format's terminator arrived: the final event carrying
`generated_text` for /generate_stream, `[DONE]` after a finish_reason for chat completions.
"""

from __future__ import annotations

import json
import time
from typing import Any

from loadtest.records import TurnResult
from loadtest.sse import SSEEvent


def cached_tokens_of(usage: dict[str, Any] | None) -> int | None:
    """OpenAI puts cached tokens in prompt_tokens_details; gla-serve's /generate puts them at top level."""
    if not usage:
        return None
    details = usage.get("prompt_tokens_details") or {}
    value = details.get("cached_tokens", usage.get("cached_tokens"))
    return int(value) if value is not None else None


def error_message_of(payload: Any) -> str:
    """The human part of an OpenAI-shaped `{"error": {"message": ...}}` body, or the raw body."""
    if isinstance(payload, dict) and "error" in payload:
        err = payload["error"]
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(payload)[:300]


class _StreamReader:
    def __init__(self, result: TurnResult, start: float) -> None:
        self.result = result
        self._start = start
        self._last_token_at: float | None = None
        self._parts: list[str] = []
        self._final_text: str | None = None
        self._finished_at: float | None = None
        self.done = False

    def _on_token(self, text: str, now: float) -> None:
        r = self.result
        if self._last_token_at is None:
            r.ttft_s = now - self._start
        else:
            r.itl_s.append(now - self._last_token_at)
        self._last_token_at = now
        r.num_token_events += 1
        self._parts.append(text)

    def _fail(self, message: str) -> None:
        if self.result.error is None:
            self.result.error = message
        self.done = True

    def _use_usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        r = self.result
        if usage.get("prompt_tokens") is not None:
            r.prompt_tokens = int(usage["prompt_tokens"])
        if usage.get("completion_tokens") is not None:
            r.output_tokens = int(usage["completion_tokens"])
        r.cached_tokens = cached_tokens_of(usage)

    def on_event(self, event: SSEEvent, now: float) -> None:
        if event.data.strip() == "[DONE]":
            return self._on_done()
        try:
            payload = json.loads(event.data)
        except json.JSONDecodeError as exc:
            return self._fail(f"bad json: {exc.msg} in {event.data[:80]!r}")
        if not isinstance(payload, dict):
            return self._fail(f"bad json: expected an object, got {event.data[:80]!r}")
        if event.event == "error" or payload.get("error"):
            return self._fail(f"error event: {error_message_of(payload)}")
        self._on_payload(payload, now)

    def _on_done(self) -> None:
        pass

    def _on_payload(self, payload: dict[str, Any], now: float) -> None:
        raise NotImplementedError

    def feed(self, event: SSEEvent) -> None:
        """Feed a live stream's event, timed now. Events after the terminator are ignored, but callers
        still drain the stream so the server never sees an early disconnect."""
        if self.done:
            return
        self.on_event(event, time.perf_counter())
        if self.done:
            self._finished_at = time.perf_counter()

    def close(self) -> TurnResult:
        """End a live stream: complete only if its terminator was fed."""
        complete = self._finished_at is not None
        return self.finish(self._finished_at if complete else time.perf_counter(), complete)

    def finish(self, now: float, complete: bool) -> TurnResult:
        """Close the turn at `now`; `complete` says whether the format's terminator was seen."""
        r = self.result
        r.e2e_s = now - self._start
        r.text = self._final_text if self._final_text is not None else "".join(self._parts)
        if r.output_tokens == 0:
            r.output_tokens = r.num_token_events
        if r.error is None and not complete:
            r.error = "incomplete stream: ended before its final event"
        r.ok = r.error is None
        return r


class GenerateStreamReader(_StreamReader):
    """`POST /generate_stream`: `{"token": {...}, "generated_text": null}` per token, then a final event
    with `generated_text` and `details` (finish_reason, usage); errors are `error` events."""

    def _on_payload(self, payload: dict[str, Any], now: float) -> None:
        token = payload.get("token")
        if token:
            self._on_token("" if token.get("special") else str(token.get("text") or ""), now)
        if payload.get("generated_text") is not None:
            details = payload.get("details") or {}
            self.result.finish_reason = details.get("finish_reason")
            self._use_usage(details.get("usage") or payload.get("usage"))
            conversation_id = details.get("conversation_id") or payload.get("conversation_id")
            if conversation_id:
                self.result.conversation_id = str(conversation_id)
            self._final_text = str(payload["generated_text"])
            self.done = True


class ChatStreamReader(_StreamReader):
    """`POST /v1/chat/completions` with stream=true: `chat.completion.chunk` objects, an optional
    usage-only chunk (stream_options.include_usage), then `data: [DONE]`."""

    def _on_done(self) -> None:
        self.done = True
        if self.result.finish_reason is None and self.result.error is None:
            self.result.error = "incomplete stream: [DONE] without a finish_reason"

    def _on_payload(self, payload: dict[str, Any], now: float) -> None:
        for choice in payload.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                self._on_token(content, now)
            if choice.get("finish_reason"):
                self.result.finish_reason = choice["finish_reason"]
        self._use_usage(payload.get("usage"))
