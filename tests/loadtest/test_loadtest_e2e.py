"""The load tool over real HTTP against the fake server (uvicorn on a loopback port) for a few seconds."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_gla_server import Faults

from loadtest import LoadConfig, run_load, summarize


def _run(cfg: LoadConfig):
    run = asyncio.run(run_load(cfg))
    return run, summarize(run.results, run.duration_s)


def test_multi_turn_by_conversation_id_closed_loop(fake_server) -> None:
    url, state = fake_server
    cfg = LoadConfig(base_url=url, api="generate", concurrency=4, num_requests=24, turns=3, max_tokens=6)
    run, s = _run(cfg)
    assert (s.num_requests, s.num_ok, s.num_errors) == (24, 24, 0)
    assert state.max_running <= 4 and state.num_running == 0
    assert len(state.conversations) == 8  # 24 requests / 3 turns, each under its own id
    by_turn = {t: [r for r in run.results if r.turn_index == t] for t in range(3)}
    assert all(len(v) == 8 for v in by_turn.values())
    assert all(r.cached_tokens == 0 for r in by_turn[0])
    assert all((r.cached_tokens or 0) > 0 for r in by_turn[1] + by_turn[2])
    assert all(r.output_tokens == 6 and r.ttft_s is not None and len(r.itl_s) == 5 for r in run.results)
    assert s.num_resumed_turns_cached == s.num_resumed_turns == 16
    assert s.cached_token_share is not None and 0.5 < s.cached_token_share < 1
    assert s.output_tokens == 24 * 6 and s.output_tokens_per_s > 0
    assert s.ttft_ms is not None and 0 < s.ttft_ms.p50 <= s.ttft_ms.p90 <= s.ttft_ms.p99
    assert run.model == "fake-gla" and run.server["health"]["status"] == "ok"


def test_multi_turn_by_resending_history_poisson(fake_server) -> None:
    url, state = fake_server
    cfg = LoadConfig(base_url=url, api="chat", rate=40.0, num_requests=18, turns=3, max_tokens=5, seed=3)
    run, s = _run(cfg)
    assert (s.num_ok, s.num_errors) == (18, 0)
    assert not state.conversations  # nothing went through conversation_id
    resumed = [r for r in run.results if r.turn_index > 0]
    assert resumed and all((r.cached_tokens or 0) > 0 for r in resumed)
    assert all(r.finish_reason == "length" and r.text.strip() for r in run.results)
    # Poisson arrivals: conversations start at different times, not all at t=0.
    first_turn_starts = sorted(r.start_s for r in run.results if r.turn_index == 0)
    assert first_turn_starts[-1] - first_turn_starts[0] > 0.02


def test_single_turn_burst_with_concurrency_cap(start_fake_server) -> None:
    url, state = start_fake_server(token_delay_s=0.02)  # requests long enough to overlap on a busy CPU
    cfg = LoadConfig(base_url=url, rate=float("inf"), max_concurrency=5, num_requests=20, max_tokens=4)
    _, s = _run(cfg)
    assert (s.num_ok, s.num_errors) == (20, 0)
    assert state.max_running == 5
    assert s.num_resumed_turns == 0 and s.cached_token_share == 0.0
    assert not state.conversations  # single turn: no conversation_id sent


def test_duration_bounds_the_run(fake_server) -> None:
    url, _ = fake_server
    cfg = LoadConfig(base_url=url, concurrency=3, num_requests=None, duration_s=1.0, max_tokens=4)
    start = time.perf_counter()
    run, s = _run(cfg)
    assert 1.0 <= time.perf_counter() - start < 3.0
    assert s.num_ok > 10 and s.num_errors == 0
    # No request is admitted after the deadline; its send time trails the admission by a few µs,
    # or by a scheduling stall on a loaded CI box (hence 0.2 s of slack; without the bound requests
    # would keep starting until the run ends at ~3 s)
    assert max(r.start_s for r in run.results) < 1.2


def test_faults_are_counted_by_kind(start_fake_server) -> None:
    url, state = start_fake_server(Faults(http_503_every=5, error_event_every=7, truncate_every=11))
    cfg = LoadConfig(base_url=url, api="generate", concurrency=1, num_requests=40, max_tokens=4)
    run, s = _run(cfg)
    # One user sends requests one after another, so request n is the n-th the server saw; a 503 wins
    # over the stream faults, an error event over truncation.
    ns = range(1, 41)
    expected = {
        "http 503": sum(1 for n in ns if n % 5 == 0),
        "error event": sum(1 for n in ns if n % 7 == 0 and n % 5),
        "incomplete stream": sum(1 for n in ns if n % 11 == 0 and n % 5 and n % 7),
    }
    assert s.errors_by_kind == expected
    assert s.num_errors == sum(expected.values()) and s.num_ok == 40 - s.num_errors
    failed_503 = [r for r in run.results if r.error_kind == "http 503"]
    assert all(r.status_code == 503 and "injected overload" in (r.error or "") for r in failed_503)
    assert state.num_running == 0


def test_failed_turn_ends_its_conversation(start_fake_server) -> None:
    url, _ = start_fake_server(Faults(http_503_every=2))
    cfg = LoadConfig(base_url=url, api="chat", concurrency=1, num_requests=6, turns=3, max_tokens=3)
    run, s = _run(cfg)
    # Every 2nd request fails: turn 1 of each conversation. Its turn 2 is never sent, and the budget of
    # 6 requests was reserved as two conversations of 3 turns, so the run ends after 4 requests.
    assert [(r.conversation_index, r.turn_index, r.ok) for r in run.results] == [
        (0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False)
    ]
    assert s.num_requests == 4


def test_api_key_is_sent_as_bearer_token(start_fake_server) -> None:
    url, _ = start_fake_server(api_key="sk-test")
    _, s = _run(LoadConfig(base_url=url, num_requests=3, max_tokens=2, api_key="sk-test"))
    assert (s.num_ok, s.num_errors) == (3, 0)
    _, s = _run(LoadConfig(base_url=url, num_requests=3, max_tokens=2))
    assert s.errors_by_kind == {"http 401": 3}
    assert LoadConfig(api_key="sk-test").to_json()["api_key"] == "<set>"
    assert "sk-test" not in repr(LoadConfig(api_key="sk-test"))


def test_unreachable_server_is_a_transport_error() -> None:
    cfg = LoadConfig(base_url="http://127.0.0.1:9", num_requests=2, concurrency=1, request_timeout_s=5)
    _, s = _run(cfg)
    assert s.num_errors == 2 and list(s.errors_by_kind) == ["transport"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "localhost:8000"},
        {"api": "grpc"},
        {"rate": 0.0},
        {"num_requests": None, "duration_s": None},
        {"turns": 0},
        {"max_tokens": 0},
        {"duration_s": float("inf")},
    ],
)
def test_bad_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LoadConfig(**kwargs)
