"""Both wire formats, fed event by event with controlled timestamps."""

from __future__ import annotations

import json

import pytest

from loadtest.records import TurnResult
from loadtest.sse import SSEEvent
from loadtest.streams import ChatStreamReader, GenerateStreamReader, cached_tokens_of


def _data(payload: object) -> SSEEvent:
    return SSEEvent(data=json.dumps(payload))


def _token(i: int, text: str, special: bool = False) -> SSEEvent:
    return _data({"token": {"id": i, "text": text, "logprob": -1.0, "special": special}, "generated_text": None})


def _generate_final(usage: dict | None = None, **details: object) -> SSEEvent:
    return _data({"token": None, "generated_text": "Hello world", "details": {"usage": usage, **details}})


def _reader(kind: type) -> GenerateStreamReader | ChatStreamReader:
    return kind(TurnResult(api="x", conversation_index=0, turn_index=1), start=10.0)


def test_generate_stream_timings_tokens_and_usage() -> None:
    reader = _reader(GenerateStreamReader)
    reader.on_event(_token(1, "Hello"), 10.25)
    reader.on_event(_token(2, " world"), 10.30)
    reader.on_event(_token(3, "</s>", special=True), 10.40)
    assert not reader.done
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "cached_tokens": 9}
    reader.on_event(_generate_final(usage, finish_reason="eos_token", conversation_id="c1"), 10.5)
    assert reader.done
    r = reader.finish(10.5, complete=True)
    assert r.ok and r.error is None
    assert r.ttft_s == pytest.approx(0.25)
    assert r.itl_s == pytest.approx([0.05, 0.10])
    assert r.e2e_s == pytest.approx(0.5)
    assert r.tpot_s == pytest.approx(0.125)
    assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (12, 3, 9)
    assert r.finish_reason == "eos_token"
    assert r.conversation_id == "c1"
    assert r.text == "Hello world"


def test_generate_stream_final_event_may_carry_the_last_token() -> None:
    reader = _reader(GenerateStreamReader)
    reader.on_event(_token(1, "a"), 10.1)
    final = {"token": {"id": 2, "text": "b", "special": False}, "generated_text": "ab", "details": {}}
    reader.on_event(_data(final), 10.2)
    r = reader.finish(10.2, complete=reader.done)
    assert r.ok and r.output_tokens == 2 and r.num_token_events == 2
    assert r.cached_tokens is None and r.prompt_tokens is None


@pytest.mark.parametrize(
    "event",
    [
        SSEEvent(data=json.dumps({"error": "boom"}), event="error"),
        _data({"error": {"message": "boom", "type": "server_error"}}),
    ],
    ids=["error-event-type", "error-payload"],
)
def test_generate_stream_error_event(event: SSEEvent) -> None:
    reader = _reader(GenerateStreamReader)
    reader.on_event(_token(1, "a"), 10.1)
    reader.on_event(event, 10.2)
    r = reader.finish(10.2, complete=False)
    assert not r.ok
    assert r.error_kind == "error event" and "boom" in (r.error or "")


def test_stream_without_terminator_is_incomplete() -> None:
    reader = _reader(GenerateStreamReader)
    reader.on_event(_token(1, "a"), 10.1)
    r = reader.finish(10.3, complete=False)
    assert not r.ok and r.error_kind == "incomplete stream"


def test_bad_json_is_an_error() -> None:
    reader = _reader(ChatStreamReader)
    reader.on_event(SSEEvent(data="{not json"), 10.1)
    assert not reader.finish(10.1, complete=reader.done).ok


def _chunk(delta: dict, finish: str | None = None) -> SSEEvent:
    return _data({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]})


def test_chat_stream_role_chunk_is_not_a_token_and_usage_chunk_is_read() -> None:
    reader = _reader(ChatStreamReader)
    reader.on_event(_chunk({"role": "assistant", "content": ""}), 10.05)
    reader.on_event(_chunk({"content": "Hi"}), 10.2)
    reader.on_event(_chunk({"content": " there"}), 10.26)
    reader.on_event(_chunk({}, "stop"), 10.27)
    usage = {"prompt_tokens": 30, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 24}}
    reader.on_event(_data({"object": "chat.completion.chunk", "choices": [], "usage": usage}), 10.28)
    assert not reader.done
    reader.on_event(SSEEvent(data="[DONE]"), 10.3)
    r = reader.finish(10.3, complete=reader.done)
    assert r.ok
    assert r.ttft_s == pytest.approx(0.2)
    assert r.itl_s == pytest.approx([0.06])
    assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (30, 2, 24)
    assert r.finish_reason == "stop" and r.text == "Hi there"


def test_chat_stream_done_without_finish_reason_is_incomplete() -> None:
    reader = _reader(ChatStreamReader)
    reader.on_event(_chunk({"content": "Hi"}), 10.2)
    reader.on_event(SSEEvent(data="[DONE]"), 10.3)
    r = reader.finish(10.3, complete=reader.done)
    assert not r.ok and r.error_kind == "incomplete stream"


def test_chat_stream_error_then_done_keeps_the_error() -> None:
    reader = _reader(ChatStreamReader)
    reader.on_event(_chunk({"content": "Hi"}), 10.2)
    reader.on_event(_data({"error": {"message": "engine died"}}), 10.25)
    reader.on_event(SSEEvent(data="[DONE]"), 10.3)
    r = reader.finish(10.3, complete=reader.done)
    assert not r.ok and r.error == "error event: engine died"


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        ({"prompt_tokens": 5}, None),
        ({"cached_tokens": 3}, 3),
        ({"prompt_tokens_details": {"cached_tokens": 4}}, 4),
        ({"prompt_tokens_details": None, "cached_tokens": 0}, 0),
    ],
)
def test_cached_tokens_of(usage: dict | None, expected: int | None) -> None:
    assert cached_tokens_of(usage) == expected
