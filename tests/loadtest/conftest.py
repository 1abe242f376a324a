"""Fixtures for the load-tool tests: a fake gla-serve (real uvicorn, loopback, fake tokens)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # loadtest/ is a top-level package that is not installed
    sys.path.insert(0, str(ROOT))

from fake_gla_server import FakeState, Faults, create_app, serve  # noqa: E402

StartServer = Callable[..., tuple[str, FakeState]]


@pytest.fixture
def start_fake_server() -> Iterator[StartServer]:
    """Factory: `url, state = start_fake_server(faults=Faults(...), token_delay_s=...)`."""
    with ExitStack() as stack:

        def start(
            faults: Faults | None = None, token_delay_s: float = 0.002, api_key: str | None = None
        ) -> tuple[str, FakeState]:
            state = FakeState(token_delay_s=token_delay_s, faults=faults or Faults(), api_key=api_key)
            url = stack.enter_context(serve(create_app(state)))
            return url, state

        yield start


@pytest.fixture
def fake_server(start_fake_server: StartServer) -> tuple[str, FakeState]:
    return start_fake_server()
