"""Percentiles against numpy's definition, and the summary's bookkeeping on hand-made results."""

from __future__ import annotations

import random

import numpy as np
import pytest

from loadtest.records import TurnResult
from loadtest.stats import Distribution, percentile, summarize


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(n: int, q: float) -> None:
    values = [random.Random(n).lognormvariate(0, 1) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_is_in_milliseconds() -> None:
    d = Distribution.of_seconds([0.001, 0.002, 0.003, 0.004])
    assert d is not None
    assert (d.count, d.mean, d.p50, d.max) == (4, pytest.approx(2.5), pytest.approx(2.5), pytest.approx(4.0))
    assert Distribution.of_seconds([]) is None


def _ok(turn: int, ttft: float, e2e: float, tokens: int, prompt: int | None, cached: int | None) -> TurnResult:
    r = TurnResult(api="generate", conversation_index=0, turn_index=turn, ok=True, ttft_s=ttft, e2e_s=e2e,
                   output_tokens=tokens, prompt_tokens=prompt, cached_tokens=cached)
    r.itl_s = [(e2e - ttft) / max(tokens - 1, 1)] * (tokens - 1)
    return r


def _failed(error: str) -> TurnResult:
    return TurnResult(api="generate", conversation_index=1, turn_index=0, ok=False, error=error)


def test_summary() -> None:
    results = [
        _ok(0, 0.1, 0.5, 5, prompt=10, cached=0),
        _ok(1, 0.2, 0.6, 5, prompt=20, cached=15),
        _ok(2, 0.3, 0.7, 5, prompt=30, cached=25),
        _ok(1, 0.4, 0.4, 1, prompt=None, cached=None),
        _failed("http 429: queue full"),
        _failed("http 429: queue full"),
        _failed("timeout: ReadTimeout after 5 s"),
    ]
    s = summarize(results, duration_s=2.0)
    assert (s.num_requests, s.num_ok, s.num_errors) == (7, 4, 3)
    assert s.error_rate == pytest.approx(3 / 7)
    assert s.errors_by_kind == {"http 429": 2, "timeout": 1}
    assert s.requests_per_s == pytest.approx(2.0)
    assert s.output_tokens == 16 and s.output_tokens_per_s == pytest.approx(8.0)
    assert s.ttft_ms is not None and s.ttft_ms.p50 == pytest.approx(250.0)
    assert s.e2e_ms is not None and s.e2e_ms.max == pytest.approx(700.0)
    # TPOT needs two tokens: the one-token turn is left out.
    assert s.tpot_ms is not None and s.tpot_ms.count == 3 and s.tpot_ms.mean == pytest.approx(100.0)
    assert s.itl_ms is not None and s.itl_ms.count == 12
    # Only turns that reported usage count toward the cached share.
    assert (s.prompt_tokens, s.cached_tokens) == (60, 40)
    assert s.cached_token_share == pytest.approx(40 / 60)
    assert (s.num_resumed_turns, s.num_resumed_turns_cached) == (3, 2)
    assert s.to_json()["ttft_ms"]["p99"] == pytest.approx(s.ttft_ms.p99)


def test_summary_of_nothing() -> None:
    s = summarize([], duration_s=0.0)
    assert s.num_requests == 0 and s.error_rate == 0.0 and s.requests_per_s == 0.0
    assert s.ttft_ms is None and s.cached_token_share is None and s.num_resumed_turns_cached is None
