"""Prometheus metrics for gla-serve, named like vLLM's with a `gla:` prefix.

Every metric lives on a registry owned by one `Metrics` object, so several apps in one process (tests,
benchmarks) never clash on prometheus-client's global registry. The engine reports events through the
small `on_*` methods (one line per event); request timings are derived here from those events, so the
engine keeps no extra clocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PREFIX = "gla:"
CACHE_TIERS = ("device", "host", "redis")
STEP_PHASES = ("schedule", "model", "snapshot", "postprocess")
# Pre-created label values: their series exist at 0 from the start, so rate() and ratios work
# before the first event instead of showing "no data".
FINISHED_REASONS = ("stop", "length", "abort")
FAILURE_REASONS = ("error", "queue_full", "rate_limited", "unauthorized", "draining", "invalid_request")
REDIS_OPS = ("get", "put", "delete", "log", "lease", "index", "other")
# RedisTier's call names -> the `op` label: snapshot reads, writes and deletes, token logs, turn leases,
# the prefix index (anchor sets); pointers, pings and TTL reads are "other".
REDIS_OP_OF_CALL = {
    "read_snapshot": "get", "get_snapshot": "get", "stream_snapshot": "get", "put_snapshot": "put",
    "getdel": "delete", "unlink": "delete", "append_log": "log", "set_log_checked": "log",
    "lease": "lease", "unlease": "lease", "extend_lease": "lease",
    "anchor_add": "index", "anchor_members": "index", "anchor_rem": "index",
}
REBUILD_REASONS = ("missing", "corrupt", "fingerprint")
REFUSED_LOG_REASONS = ("lease_lost", "diverged")

_STEP_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                      2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS_S = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                      60.0, 120.0, 240.0, 480.0, 960.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
                  100_000, 200_000)
_REDIS_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class _RequestTimes:
    queued_at: float
    scheduled_at: float | None = None
    last_token_at: float | None = None


class Metrics:
    """All gla-serve metrics plus the per-request bookkeeping that turns engine events into latencies.

    Args:
        registry: where the metrics are registered; a fresh `CollectorRegistry` by default.
        process_metrics: also export `process_*` (CPU, memory, fds) and `python_*` (GC, version).
        clock: monotonic seconds; injectable so tests can assert exact latencies.

    Example:
        metrics = Metrics()
        metrics.on_request_queued("r1")
        metrics.on_request_scheduled("r1")
        metrics.on_token("r1")                      # the first token also records TTFT
        metrics.on_finish("r1", "stop", num_prompt_tokens=12, num_generation_tokens=1)
        body, content_type = metrics.render()       # for GET /metrics
    """

    def __init__(self, registry: CollectorRegistry | None = None, process_metrics: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, _RequestTimes] = {}
        self._num_waiting = 0
        self._num_running = 0
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, registry=r, buckets=buckets)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS_S)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of one request.",
            _LATENCY_BUCKETS_S)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to finish of a request.", _REQUEST_BUCKETS_S)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time a request waited before the engine scheduled it.",
            _REQUEST_BUCKETS_S)
        self.engine_step_phase = histogram(
            "engine_step_phase_seconds", "Time of each engine step by phase: schedule, model (prefill, "
            "decode and sampling up to the step's host sync), snapshot, postprocess.", _STEP_BUCKETS_S,
            ("phase",))
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt length of finished requests, in tokens.", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens of finished requests.", _TOKEN_BUCKETS)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.prompt_tokens_cached = counter(
            "prompt_tokens_cached", "Prompt tokens served from a cached state instead of prefill.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.request_success = counter(
            "request_success", "Requests that finished, by finish reason.", ("finished_reason",))
        self.request_failure = counter(
            "request_failure", "Requests that failed or were rejected, by reason.", ("reason",))
        self.client_disconnects = counter(
            "client_disconnects", "Requests aborted because the client went away.")

        self.num_requests_running = gauge("num_requests_running", "Requests holding a state slot.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.state_slots_used = gauge("state_slots_used", "State-pool slots in use.")
        self.state_slots_total = gauge("state_slots_total", "State-pool slots allocated at start.")

        self.state_cache_queries = counter(
            "state_cache_queries", "State-cache lookups, by tier.", ("tier",))
        self.state_cache_hits = counter("state_cache_hits", "State-cache lookups that hit, by tier.",
                                        ("tier",))
        self.state_cache_evictions = counter(
            "state_cache_evictions", "States evicted from a tier.", ("tier",))
        self.state_cache_bytes = gauge("state_cache_bytes", "Bytes of state held in a tier.", ("tier",))
        self.redis_op_latency = histogram(
            "redis_op_latency_seconds", "Latency of Redis operations, by op.", _REDIS_BUCKETS_S, ("op",))
        self.redis_errors = counter("redis_errors", "Redis operations that failed, by op.", ("op",))
        self.redis_up = gauge(
            "redis_up", "1 while calls go out to a Redis instance, 0 while its circuit breaker is open (the tier "
            "is off: states miss, leases and logs stay local), by instance (states, logs).", ("instance",))
        self.state_rebuilds = counter(
            "state_rebuilds", "States rebuilt by prefilling the token log, by reason.", ("reason",))
        self.token_log_writes_refused = counter(
            "token_log_writes_refused", "Committed turns whose token log Redis refused, so as not to erase a turn "
            "taken since: the turn's lease was lost, or its log did not extend the stored one.", ("reason",))

        for phase in STEP_PHASES:
            self.engine_step_phase.labels(phase)
        for reason in FINISHED_REASONS:
            self.request_success.labels(reason)
        for reason in FAILURE_REASONS:
            self.request_failure.labels(reason)
        for tier in CACHE_TIERS:
            for family in (self.state_cache_queries, self.state_cache_hits, self.state_cache_evictions,
                           self.state_cache_bytes):
                family.labels(tier)
        for op in REDIS_OPS:
            self.redis_op_latency.labels(op)
            self.redis_errors.labels(op)
        for reason in REBUILD_REASONS:
            self.state_rebuilds.labels(reason)
        for reason in REFUSED_LOG_REASONS:
            self.token_log_writes_refused.labels(reason)

        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # -- request lifecycle: queued -> scheduled -> token* -> finish | failure ------------------------

    def on_request_queued(self, request_id: str) -> None:
        with self._lock:
            self._requests[request_id] = _RequestTimes(queued_at=self._clock())
            self._num_waiting += 1
            self.num_requests_waiting.set(self._num_waiting)

    def on_request_scheduled(self, request_id: str) -> None:
        """The request got a state slot; its queue time ends here."""
        with self._lock:
            times = self._requests.get(request_id)
            if times is None or times.scheduled_at is not None:
                return
            times.scheduled_at = self._clock()
            self._num_waiting -= 1
            self._num_running += 1
            self.num_requests_waiting.set(self._num_waiting)
            self.num_requests_running.set(self._num_running)
        self.request_queue_time.observe(times.scheduled_at - times.queued_at)

    def on_token(self, request_id: str, num_tokens: int = 1) -> None:
        """Tokens emitted for a request in one engine step; the first call also records TTFT."""
        now = self._clock()
        with self._lock:
            times = self._requests.get(request_id)
            if times is None:
                return
            previous, times.last_token_at = times.last_token_at, now
        if previous is None:
            self.time_to_first_token.observe(now - times.queued_at)
        else:
            self.inter_token_latency.observe(now - previous)
        self.generation_tokens.inc(num_tokens)

    def on_first_token(self, request_id: str, num_tokens: int = 1) -> None:
        """Alias of `on_token` for call sites that know the token is the first one."""
        self.on_token(request_id, num_tokens)

    def on_finish(self, request_id: str, finished_reason: str, num_prompt_tokens: int,
                  num_generation_tokens: int, num_cached_tokens: int = 0) -> None:
        """The request ended normally (`stop`, `length`) or was aborted (`abort`). Idempotent."""
        times = self._pop(request_id)
        if times is not None:
            self._finish(self._clock() - times.queued_at, finished_reason, num_prompt_tokens,
                         num_generation_tokens, num_cached_tokens)

    def _finish(self, e2e_s: float, finished_reason: str, num_prompt_tokens: int,
                num_generation_tokens: int, num_cached_tokens: int) -> None:
        self.e2e_request_latency.observe(e2e_s)
        self.request_success.labels(finished_reason).inc()
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.prompt_tokens_cached.inc(num_cached_tokens)

    def on_failure(self, request_id: str | None, reason: str) -> None:
        """A request failed inside the engine, or was rejected before it (request_id None). Idempotent."""
        if request_id is not None and self._pop(request_id) is None:
            return
        self.request_failure.labels(reason).inc()

    def on_rejected(self, reason: str) -> None:
        """A request refused at the edge (401, 429, 503) before it reached the engine."""
        self.on_failure(None, reason)

    def on_disconnect(self, request_id: str, num_prompt_tokens: int, num_generation_tokens: int,
                      num_cached_tokens: int = 0) -> None:
        """The client went away: counted as a disconnect and finished with reason `abort`. Idempotent."""
        times = self._pop(request_id)
        if times is not None:
            self.client_disconnects.inc()
            self._finish(self._clock() - times.queued_at, "abort", num_prompt_tokens, num_generation_tokens,
                         num_cached_tokens)

    def _pop(self, request_id: str) -> _RequestTimes | None:
        with self._lock:
            times = self._requests.pop(request_id, None)
            if times is None:
                return None
            if times.scheduled_at is None:
                self._num_waiting -= 1
                self.num_requests_waiting.set(self._num_waiting)
            else:
                self._num_running -= 1
                self.num_requests_running.set(self._num_running)
            return times

    # -- state pool and state cache -----------------------------------------------------------------

    def set_slot_usage(self, used: int, total: int) -> None:
        self.state_slots_used.set(used)
        self.state_slots_total.set(total)

    def on_cache_lookup(self, tier: str, hit: bool) -> None:
        self.state_cache_queries.labels(_tier(tier)).inc()
        if hit:
            self.state_cache_hits.labels(tier).inc()

    def on_cache_evict(self, tier: str, num_states: int = 1) -> None:
        self.state_cache_evictions.labels(_tier(tier)).inc(num_states)

    def set_cache_bytes(self, tier: str, num_bytes: int) -> None:
        self.state_cache_bytes.labels(_tier(tier)).set(num_bytes)

    def on_state_rebuild(self, reason: str) -> None:
        """A state was missing, corrupt or from another model and was rebuilt from the token log."""
        self.state_rebuilds.labels(reason).inc()

    def on_redis_op(self, op: str, seconds: float, ok: bool) -> None:
        """One Redis call returned after `seconds`; a failed one (timeout, refused connection, error
        reply) also counts as an error. `op` is a label of REDIS_OPS (see REDIS_OP_OF_CALL)."""
        self.redis_op_latency.labels(op).observe(seconds)
        if not ok:
            self.redis_errors.labels(op).inc()

    # -- exposition ---------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type, for a `/metrics` route."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _is_up(tier: Any) -> float:
    return float(tier.is_available)


def _tier(tier: str) -> str:
    # A typo here would silently create a new series that no dashboard panel shows.
    if tier not in CACHE_TIERS:
        raise ValueError(f"unknown state-cache tier {tier!r}; expected one of {CACHE_TIERS}")
    return tier


class EngineMetrics:
    """`server.engine.EngineObserver` that feeds `Metrics` from the engine's own sequence timestamps.

    Wiring is one line: `engine.observers.append(EngineMetrics(metrics, engine.stats))`. Running,
    waiting and slot gauges are read from `stats()` (the dict /health shows) at scrape time, so they
    are exact even between engine steps.
    """

    def __init__(self, metrics: Metrics, stats: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.metrics = metrics
        self._last_token_at: dict[str, float] = {}
        if stats is not None:
            metrics.num_requests_running.set_function(lambda: stats()["running"])
            metrics.num_requests_waiting.set_function(lambda: stats()["waiting"])
            metrics.state_slots_total.set_function(lambda: stats()["max_num_seqs"])
            metrics.state_slots_used.set_function(lambda: stats()["max_num_seqs"] - stats()["free_slots"])
            metrics.state_cache_bytes.labels("device").set_function(
                lambda: stats().get("resident_conversations", 0) * stats().get("state_bytes_per_slot", 0))

    def on_step(self, seqs: list[Any], num_prefill_tokens: int, now: float) -> None:
        """`seqs` each sampled one token this step (finished ones included: the engine reports
        `on_finish` for them just before this call)."""
        m = self.metrics
        for seq in seqs:
            last = self._last_token_at.get(seq.request_id)
            if last is None:
                m.time_to_first_token.observe((seq.first_token_time or now) - seq.arrival_time)
                if seq.first_scheduled_time is not None:
                    m.request_queue_time.observe(seq.first_scheduled_time - seq.arrival_time)
            else:
                m.inter_token_latency.observe(now - last)
            if seq.is_finished:
                self._last_token_at.pop(seq.request_id, None)
            else:
                self._last_token_at[seq.request_id] = now
        m.generation_tokens.inc(len(seqs))

    def on_cache_lookup(self, tier: str, hit: bool) -> None:
        self.metrics.on_cache_lookup(tier, hit)

    def on_step_phases(self, phases: Mapping[str, float]) -> None:
        for phase, seconds in phases.items():
            self.metrics.engine_step_phase.labels(phase).observe(seconds)

    def on_cache_evict(self, tier: str, num_states: int) -> None:
        self.metrics.on_cache_evict(tier, num_states)

    def on_finish(self, seq: Any, now: float) -> None:
        reason = str(seq.finish_reason)
        if reason in ("abort", "error"):  # ended outside a step: no on_step follows for it
            self._last_token_at.pop(seq.request_id, None)
        if reason == "error":
            self.metrics.request_failure.labels("error").inc()
            return
        if reason == "abort":
            self.metrics.client_disconnects.inc()
        self.metrics._finish(now - seq.arrival_time, reason,
                             len(seq.history_token_ids) + len(seq.prompt_token_ids),
                             len(seq.output_token_ids), seq.num_cached_tokens)


class StateCacheMetrics:
    """Feeds the tiered conversation store's events (server/state_cache) into `Metrics`.

    The store keeps plain counters for /health; this turns the same events into the Prometheus
    series the dashboard charts (host and Redis hits, host evictions, Redis latency and errors by
    op, rebuilds by reason) as they happen, so a scrape sees rates, not snapshots. Wiring is one
    line: `StateCacheMetrics(metrics, store)`; hooks already set on the store are kept and chained.
    """

    def __init__(self, metrics: Metrics, store: Any) -> None:
        self.metrics = metrics
        cache = store.cache
        self._has_host = cache.host.budget_bytes > 0
        self._has_redis = cache.redis is not None
        self._cache_event = cache.on_event
        cache.on_event = self.on_cache_event
        self._rebuild = store.on_rebuild
        store.on_rebuild = self.on_rebuild
        for instance, tier in (("states", cache.redis), ("logs", cache.log_redis)):
            if tier is not None:
                metrics.redis_up.labels(instance).set_function(partial(_is_up, tier))
        self._redis_ops: dict[int, Callable[[str, float, bool], None] | None] = {}
        for tier in {id(t): t for t in (cache.redis, cache.log_redis) if t is not None}.values():
            self._redis_ops[id(tier)] = tier.on_op  # chained, whatever was there before
            tier.on_op = partial(self.on_redis_op, id(tier))
        metrics.state_cache_bytes.labels("host").set_function(lambda: cache.host.bytes_used)

    def on_cache_event(self, name: str, amount: int) -> None:
        """A `TieredStateCache` counter moved: every lookup asks each configured tier (host, Redis)."""
        m = self.metrics
        if name == "lookups":
            if self._has_host:
                m.state_cache_queries.labels("host").inc(amount)
            if self._has_redis:
                m.state_cache_queries.labels("redis").inc(amount)
        elif name == "lookup_hits_host":
            m.state_cache_hits.labels("host").inc(amount)
        elif name == "lookup_hits_redis":
            m.state_cache_hits.labels("redis").inc(amount)
        elif name == "host_evictions":
            m.on_cache_evict("host", amount)
        elif name == "token_log_writes_fenced":
            m.token_log_writes_refused.labels("lease_lost").inc(amount)
        elif name == "token_log_writes_diverged":
            m.token_log_writes_refused.labels("diverged").inc(amount)
        if self._cache_event is not None:
            self._cache_event(name, amount)

    def on_redis_op(self, tier: int, what: str, seconds: float, ok: bool) -> None:
        """A Redis call returned (either instance: states, or token logs and leases)."""
        self.metrics.on_redis_op(REDIS_OP_OF_CALL.get(what, "other"), seconds, ok)
        chained = self._redis_ops.get(tier)
        if chained is not None:
            chained(what, seconds, ok)

    def on_rebuild(self, reason: str) -> None:
        self.metrics.on_state_rebuild(reason)
        if self._rebuild is not None:
            self._rebuild(reason)
