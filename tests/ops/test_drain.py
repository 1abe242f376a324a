"""server/drain.py: SIGTERM to a real uvicorn process while a stream is in flight."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.drain import Drainer
from tests.ops.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def drain_app(tmp_path: Path, deadline_s: float) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    port, flush_file = free_port(), tmp_path / "flushed.txt"
    proc = subprocess.Popen([sys.executable, "-m", "tests.ops.drain_app", str(port), str(flush_file),
                             str(deadline_s)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"drain app did not start: {proc.communicate()[0]}")
            time.sleep(0.05)
        yield proc, base, flush_file
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_lets_the_stream_finish_refuses_new_work_and_exits_0(tmp_path: Path) -> None:
    with drain_app(tmp_path, deadline_s=20) as (proc, base, flush_file):
        with httpx.Client(base_url=base, timeout=10) as client, \
                client.stream("GET", "/stream", params={"n": 12, "interval": 0.1}) as stream:
            lines = stream.iter_lines()
            assert next(lines) == "data: 0"
            proc.send_signal(signal.SIGTERM)
            with httpx.Client(base_url=base, timeout=5) as other:
                ready = other.get("/ready")
                for _ in range(100):  # the signal is handled at uvicorn's next tick (<= 0.1 s)
                    if ready.status_code == 503:
                        break
                    time.sleep(0.05)
                    ready = other.get("/ready")
                new = other.get("/stream", params={"n": 1})
                health = other.get("/health")
            received = [line for line in lines if line]
            assert not flush_file.exists()  # flushing waits for the stream
        assert ready.status_code == 503
        assert new.status_code == 503 and new.json()["error"]["code"] == "draining"
        assert new.headers["retry-after"] == "1"
        assert health.status_code == 200
        assert received == [f"data: {i}" for i in range(1, 12)] + ["data: [DONE]"]
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, output
    assert flush_file.read_text() == "async flush, 0 in flight\nsync flush\n"
    assert "flush" in output and "redis is down" in output  # the failing flush is logged, not fatal


def test_deadline_cuts_a_stream_that_runs_too_long_and_still_exits_0(tmp_path: Path) -> None:
    with drain_app(tmp_path, deadline_s=0.5) as (proc, base, flush_file):
        started = time.monotonic()
        with httpx.Client(base_url=base, timeout=10) as client, \
                client.stream("GET", "/stream", params={"n": 200, "interval": 0.05}) as stream:
            lines = stream.iter_lines()
            assert next(lines) == "data: 0"
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in lines:
                    pass
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, output
        assert time.monotonic() - started < 6
    assert "drain deadline of 0.5s passed with 1 requests in flight" in output
    assert flush_file.read_text().startswith("async flush, 1 in flight")


def test_drain_with_nothing_in_flight_flushes_at_once() -> None:
    calls: list[str] = []

    async def slow_flush() -> None:
        await asyncio.sleep(10)

    drainer = Drainer(deadline_s=5, flush_timeout_s=0.2)
    drainer.add_flush_callback(lambda: calls.append("sync"))
    drainer.add_flush_callback(slow_flush)
    started = time.monotonic()
    assert asyncio.run(drainer.drain()) is True
    assert drainer.is_draining and calls == ["sync"]
    assert time.monotonic() - started < 2


def test_negative_deadline_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        Drainer(deadline_s=-1)


def test_in_flight_counter_waits_for_requests() -> None:
    async def scenario() -> bool:
        drainer = Drainer(deadline_s=2)
        drainer.request_started()
        asyncio.get_running_loop().call_later(0.1, drainer.request_finished)
        return await drainer.drain()

    assert asyncio.run(scenario()) is True
