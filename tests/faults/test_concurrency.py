"""64 concurrent streams, 512 requests, through the load tool: nothing fails, nothing is cut short."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from loadtest import LoadConfig, run_load, summarize
from tests.server.conftest import RunningServer, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wide_server() -> Iterator[RunningServer]:
    # 32 slots for 64 streams: half of them wait in the queue, so admission is exercised too.
    srv = start_server(max_num_seqs=32, max_num_batched_tokens=512)
    yield srv
    srv.stop()


def test_64_concurrent_streams_500_requests_all_complete(wide_server: RunningServer) -> None:
    cfg = LoadConfig(base_url=wide_server.url, concurrency=64, num_requests=512, max_tokens=4,
                     prompt_words=8, temperature=0, request_timeout_s=120)
    run = asyncio.run(run_load(cfg))
    summary = summarize(run.results, run.duration_s)
    errors = [r.error for r in run.results if not r.ok]
    assert summary.num_errors == 0, errors[:5]
    assert len(run.results) == 512
    assert all(r.ok and r.finish_reason in ("stop", "length") for r in run.results)
    assert all(1 <= r.output_tokens <= 4 for r in run.results)
    wide_server.wait_idle()
