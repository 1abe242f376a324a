"""Summary statistics of a run. Latencies come from successful turns only; errors from all turns."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.records import TurnResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so small samples stay comparable
    with other tools' reports."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution | None:
        if not values:
            return None
        ms = [v * 1000.0 for v in values]
        return cls(
            count=len(ms),
            mean=sum(ms) / len(ms),
            p50=percentile(ms, 50),
            p90=percentile(ms, 90),
            p99=percentile(ms, 99),
            max=max(ms),
        )


@dataclass(frozen=True, slots=True)
class Summary:
    num_requests: int
    num_ok: int
    num_errors: int
    error_rate: float
    errors_by_kind: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2e_ms: Distribution | None
    prompt_tokens: int | None
    cached_tokens: int | None
    cached_token_share: float | None
    num_resumed_turns: int
    num_resumed_turns_cached: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Sequence[TurnResult], duration_s: float) -> Summary:
    """`duration_s` is the run's wall time; throughput counts successful turns only."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error_kind for r in results if not r.ok)
    output_tokens = sum(r.output_tokens for r in ok)
    with_usage = [r for r in ok if r.prompt_tokens is not None and r.cached_tokens is not None]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in with_usage) if with_usage else None
    cached_tokens = sum(r.cached_tokens or 0 for r in with_usage) if with_usage else None
    resumed = [r for r in ok if r.turn_index > 0]
    resumed_with_usage = [r for r in resumed if r.cached_tokens is not None]
    return Summary(
        num_requests=len(results),
        num_ok=len(ok),
        num_errors=len(results) - len(ok),
        error_rate=(len(results) - len(ok)) / len(results) if results else 0.0,
        errors_by_kind=dict(errors.most_common()),
        duration_s=duration_s,
        requests_per_s=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / duration_s if duration_s > 0 else 0.0,
        ttft_ms=Distribution.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=Distribution.of_seconds([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=Distribution.of_seconds([gap for r in ok for gap in r.itl_s]),
        e2e_ms=Distribution.of_seconds([r.e2e_s for r in ok if r.e2e_s is not None]),
        prompt_tokens=prompt_tokens,
        cached_tokens=cached_tokens,
        cached_token_share=cached_tokens / prompt_tokens if prompt_tokens else None,
        num_resumed_turns=len(resumed),
        num_resumed_turns_cached=(
            sum(1 for r in resumed_with_usage if (r.cached_tokens or 0) > 0) if resumed_with_usage else None
        ),
    )
