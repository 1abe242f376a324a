"""A minimal HTTP/1.1 SSE client on asyncio streams, for latency benchmarks.

Why: httpx (pure-Python h11 underneath) spent ~1.2 ms of a resumed turn's 6.9 ms on the H200 host
building and sending the request alone (`trace_resume.py`), more than the server's route and
admission together. A benchmark of the server's latency should charge it as little client as
possible, so the resume and TTFT benchmarks can use this instead: one keep-alive connection, a JSON
POST, the chunked SSE reply read line by line. It speaks only what those requests need.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


class RawSSEClient:
    """One keep-alive connection to host:port; `post_sse` runs one streaming request at a time."""

    def __init__(self, url: str) -> None:
        host, _, port = url.split("//", 1)[1].rstrip("/").partition(":")
        self.host, self.port = host, int(port or 80)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_sse(self, path: str, body: dict[str, Any],
                       token_times: list[float] | None = None) -> tuple[float | None, dict[str, Any]]:
        """POST `body` as JSON; returns (perf_counter time of the first event carrying a token, the
        last event's JSON). With `token_times`, appends the arrival time of every token event.
        Raises RuntimeError on a non-200 status."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader = self.reader
        assert reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Accept: text/event-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        status = await reader.readline()
        chunked, length = False, None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name.lower() == "content-length":
                length = int(value)
        if b" 200 " not in status:
            text = (await reader.readexactly(length)) if length else b""
            await self.close()
            raise RuntimeError(f"{status.decode().strip()}: {text[:500]!r}")
        if not chunked:
            await self.close()
            raise RuntimeError("expected a chunked SSE reply")
        first: float | None = None
        last: dict[str, Any] = {}
        pending = b""
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return first, last
            if b'"token":{' in chunk:
                now = time.perf_counter()
                first = now if first is None else first
                if token_times is not None:
                    token_times.extend([now] * chunk.count(b'"token":{'))
            pending += chunk[:-2]
            *events, pending = pending.split(b"\n\n")
            for ev in events:
                for line in ev.splitlines():
                    if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
                        last = json.loads(line[5:])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None
