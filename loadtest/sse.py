"""Incremental Server-Sent Events decoder (the WHATWG event-stream rules the server and browsers follow).

Network chunks split lines and even CRLF pairs anywhere, so the decoder keeps partial lines between
`feed` calls; an event is only dispatched at its blank line, so a stream cut short never yields a
half-received event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed text chunks, get complete events back."""

    def __init__(self) -> None:
        self._buffer = ""
        self._pending_cr = False
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._has_fields = False

    def feed(self, chunk: str) -> list[SSEEvent]:
        if self._pending_cr:
            # A CR ended the previous chunk: the line was already dispatched, so an LF here is its pair.
            self._pending_cr = False
            if chunk.startswith("\n"):
                chunk = chunk[1:]
        self._buffer += chunk
        events: list[SSEEvent] = []
        for line in self._complete_lines():
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    @property
    def has_partial_event(self) -> bool:
        """True when the stream so far ends inside an event (fields read but no blank line yet)."""
        return self._has_fields or bool(self._buffer)

    def _complete_lines(self) -> Iterator[str]:
        buf = self._buffer
        start = 0
        i = 0
        n = len(buf)
        while i < n:
            ch = buf[i]
            if ch == "\n":
                yield buf[start:i]
                start = i = i + 1
            elif ch == "\r":
                if i + 1 < n:
                    yield buf[start:i]
                    i += 2 if buf[i + 1] == "\n" else 1
                    start = i
                else:
                    yield buf[start:i]
                    self._pending_cr = True
                    start = i = n
            else:
                i += 1
        self._buffer = buf[start:]

    def _process_line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_fields = True
        elif name == "event":
            self._event = value
            self._has_fields = True
        elif name == "id" and "\0" not in value:
            self._id = value
            self._has_fields = True
        return None

    def _dispatch(self) -> SSEEvent | None:
        had_data = bool(self._data)
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id)
        self._data = []
        self._event = ""
        self._has_fields = False
        return event if had_data else None


def iter_sse(chunks: Iterable[str]) -> Iterator[SSEEvent]:
    """Events from a synchronous stream of text chunks (used by the locustfile)."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)


async def aiter_sse(chunks: AsyncIterator[str]) -> AsyncIterator[SSEEvent]:
    """Events from an async stream of text chunks, e.g. `httpx.Response.aiter_text()`."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
