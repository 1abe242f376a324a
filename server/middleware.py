"""ASGI middleware: the request body size limit, enforced before FastAPI parses anything.

The body is buffered (at most `max_body_bytes`) and replayed to the app, so a chunked upload is
bounded as well as one with a Content-Length. An oversized body is read and discarded (up to a
bound) before the 413 is sent, because clients that are still writing would otherwise see a reset
connection instead of the error.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLarge

_MAX_DRAIN_BYTES = 64 * 2**20


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = self._content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # disconnected before the body arrived: let the app see it
                await self.app(scope, _replay([], receive, first=message), send)
                return
            body = message.get("body", b"")
            size += len(body)
            chunks.append(body)
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send, more=message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, receive), send)

    @staticmethod
    def _content_length(scope: Scope) -> int | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def _reject(self, scope: Scope, receive: Receive, send: Send, more: bool = True) -> None:
        drained = 0
        while more and drained < _MAX_DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        err = PayloadTooLarge(
            f"request body is larger than the limit of {self.max_body_bytes} bytes", param="body"
        )
        response = err.response()
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _replay(chunks: list[bytes], receive: Receive, first: Message | None = None) -> Receive:
    """A receive() that returns the buffered body once, then defers to the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if first is not None:
                return first
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await receive()

    return replay
