"""Real servers for the server tests: uvicorn on a free port, in a thread, on the bundled tiny model.

A thread (not a subprocess) keeps start-up at a fraction of a second since torch is already
imported; the traffic still goes through a real socket, HTTP parser and ASGI stack.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.settings import Settings

# Small enough that 32 concurrent requests queue and long prompts are split across steps.
BASE_SETTINGS: dict[str, Any] = {
    "max_num_seqs": 8,
    "max_num_batched_tokens": 32,
    "max_tokens_cap": 4096,
    "max_prompt_tokens": 2048,
    "default_max_tokens": 16,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A gla-serve app served by uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, settings: Settings, model_loader: Callable[[Settings], Any] | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, model_loader=model_loader)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.server

    def start(self, wait_ready: bool = True, timeout_s: float = 60) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready(deadline - time.monotonic())
        return self

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while httpx.get(self.url + "/ready").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready: {httpx.get(self.url + '/health').json()}")
            time.sleep(0.02)

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health").json()

    def wait_idle(self, timeout_s: float = 10) -> dict[str, Any]:
        """Until no request is running or waiting and every slot is free (or fail)."""
        deadline = time.monotonic() + timeout_s
        while True:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0 and h["free_slots"] == h["max_num_seqs"]:
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not go idle: {h}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(model_loader: Callable[[Settings], Any] | None = None, wait_ready: bool = True,
                 **overrides: Any) -> RunningServer:
    return RunningServer(Settings(**{**BASE_SETTINGS, **overrides}), model_loader).start(wait_ready)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def sse_events(lines: Iterator[str]) -> list[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body, in order."""
    events: list[tuple[str, str]] = []
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        events.append((name, "\n".join(data)))
    return events


def post_sse(client: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())
