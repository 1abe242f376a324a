"""Graceful drain on SIGTERM: stop taking work, let in-flight requests finish, flush, exit 0.

Kubernetes sends SIGTERM and keeps routing traffic to the pod for a few seconds until the endpoint
update propagates. uvicorn's own SIGTERM handling closes the listening socket at once, so those late
requests would see "connection refused". `DrainingServer` instead keeps listening while draining:
`/ready` answers 503 (the pod leaves the Service), new requests get a 503 that clients can retry on
another replica, in-flight streams run to completion up to a deadline, then flush callbacks (e.g.
state-cache writes to Redis) run and uvicorn shuts down normally, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from server.auth import is_public, send_json_error

log = logging.getLogger("gla.drain")

FlushCallback = Callable[[], Awaitable[Any] | Any]


class Drainer:
    """Drain state shared by the middleware, the server and the app (e.g. a /ready handler).

    Args:
        deadline_s: how long in-flight requests may run after draining starts.
        flush_timeout_s: budget for all flush callbacks together, after the in-flight wait.

    Example:
        drainer = Drainer(deadline_s=settings.drain_timeout_s)
        drainer.add_flush_callback(state_cache.flush)        # async or sync
        app.add_middleware(DrainMiddleware, drainer=drainer)
        DrainingServer(uvicorn.Config(app, host=..., port=...), drainer).run()
    """

    def __init__(self, deadline_s: float = 30.0, flush_timeout_s: float = 10.0) -> None:
        if deadline_s < 0 or flush_timeout_s < 0:
            raise ValueError("drain deadline and flush timeout must be >= 0 seconds")
        self.deadline_s = deadline_s
        self.flush_timeout_s = flush_timeout_s
        self.is_draining = False
        self.in_flight = 0
        self._flush_callbacks: list[FlushCallback] = []
        self._idle: asyncio.Event | None = None

    def add_flush_callback(self, callback: FlushCallback) -> None:
        self._flush_callbacks.append(callback)

    def start(self) -> None:
        """Refuse new work from now on; safe to call from a signal handler."""
        self.is_draining = True

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drain(self) -> bool:
        """Start draining, wait for in-flight requests up to the deadline, then flush.

        Returns:
            True if every in-flight request finished before the deadline.
        """
        self.start()
        started = time.monotonic()
        log.info("draining: %d requests in flight, deadline %.1fs", self.in_flight, self.deadline_s)
        self._idle = asyncio.Event()
        if self.in_flight == 0:
            self._idle.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.deadline_s)
            finished = True
            log.info("drained in %.2fs", time.monotonic() - started)
        except TimeoutError:
            finished = False
            log.warning("drain deadline of %.1fs passed with %d requests in flight",
                        self.deadline_s, self.in_flight)
        await self._flush()
        return finished

    async def _flush(self) -> None:
        end = time.monotonic() + self.flush_timeout_s
        for callback in self._flush_callbacks:
            name = getattr(callback, "__qualname__", repr(callback))
            try:
                if inspect.iscoroutinefunction(callback):
                    pending: Awaitable[Any] = callback()
                else:
                    pending = asyncio.to_thread(callback)  # a blocking flush must not stall the loop
                await asyncio.wait_for(pending, timeout=max(0.0, end - time.monotonic()))
            except TimeoutError:
                log.error("flush %s did not finish within the flush timeout", name)
            except Exception:
                # One failing flush (say Redis is down) must not stop the others or the exit.
                log.exception("flush %s failed", name)


class DrainMiddleware:
    """Counts in-flight requests and, while draining, answers 503 to new ones and to `ready_path`.

    `exempt_paths` (liveness, metrics) keep answering normally during the drain: a pod that is
    finishing its streams is alive, and its last metrics are worth scraping.
    """

    def __init__(self, app: ASGIApp, drainer: Drainer, ready_path: str = "/ready",
                 exempt_paths: Iterable[str] = ("/health", "/metrics"), retry_after_s: int = 1,
                 on_reject: Callable[[str], Any] | None = None) -> None:
        self.app = app
        self.drainer = drainer
        self.ready_path = ready_path
        self.exempt_paths = tuple(exempt_paths)
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"], self.exempt_paths):
            await self.app(scope, receive, send)
            return
        if self.drainer.is_draining:
            if scope["path"] != self.ready_path and self.on_reject is not None:
                self.on_reject("draining")
            await send_json_error(send, 503, "The server is shutting down; retry on another replica.",
                                  "service_unavailable", "draining",
                                  {"Retry-After": str(self.retry_after_s), "Connection": "close"})
            return
        self.drainer.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drainer.request_finished()


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains (see the module docstring) instead of closing at once.

    SIGINT and a second SIGTERM keep uvicorn's behaviour: shut down now.
    """

    def __init__(self, config: uvicorn.Config, drainer: Drainer) -> None:
        super().__init__(config)
        self.drainer = drainer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._loop is not None and not self.drainer.is_draining \
                and not self.should_exit:
            # Not recorded as a captured signal: uvicorn would re-raise it after shutdown and the
            # process would die with 143 instead of exiting 0.
            self.drainer.start()
            self._loop.call_soon_threadsafe(self._start_drain_task)
            return
        super().handle_exit(sig, frame)

    def _start_drain_task(self) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not await self.drainer.drain():
            # Requests still running past the deadline: let uvicorn cancel them quickly.
            self.config.timeout_graceful_shutdown = 1
        self.should_exit = True
