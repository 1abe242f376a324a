"""The SSE decoder must give the same events however the network splits the bytes."""

from __future__ import annotations

import pytest

from loadtest.sse import SSEDecoder, SSEEvent, iter_sse

STREAM = (
    ": comment, ignored\n"
    'data: {"token": 1}\n'
    "\n"
    "event: error\r\n"
    "data: line one\r\n"
    "data:line two\r\n"
    "\r\n"
    "id: 7\r"
    "data: cr only\r"
    "\r"
    "data\n"
    "\n"
    "event: no-data-so-not-dispatched\n"
    "\n"
    "retry: 100\n"
    "unknown: field\n"
    "data: [DONE]\n"
    "\n"
)
EXPECTED = [
    SSEEvent(data='{"token": 1}'),
    SSEEvent(data="line one\nline two", event="error"),
    SSEEvent(data="cr only", id="7"),
    SSEEvent(data="", id="7"),
    SSEEvent(data="[DONE]", id="7"),
]


def test_whole_stream() -> None:
    assert SSEDecoder().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_any_chunking_gives_the_same_events(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert list(iter_sse(chunks)) == EXPECTED


def test_crlf_split_between_chunks_is_one_line_break() -> None:
    decoder = SSEDecoder()
    assert decoder.feed("data: a\r") == []
    assert decoder.feed("\n\r") == [SSEEvent(data="a")]
    assert decoder.feed("\ndata: b\n\n") == [SSEEvent(data="b")]


def test_unterminated_event_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed('data: {"generated_text": "cut') == []
    assert decoder.has_partial_event
    assert decoder.feed("\n") == []
    assert decoder.has_partial_event
    assert decoder.feed("\n") == [SSEEvent(data='{"generated_text": "cut')]
    assert not decoder.has_partial_event


def test_only_one_leading_space_is_stripped() -> None:
    assert SSEDecoder().feed("data:   x \n\n") == [SSEEvent(data="  x ")]
