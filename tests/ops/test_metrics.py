"""server/metrics.py: every issue-6 metric is exposed, moves with engine events, and parses as Prometheus text."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi import FastAPI, Response
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import CACHE_TIERS, Metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


REQUIRED = [
    "gla:time_to_first_token_seconds_bucket", "gla:inter_token_latency_seconds_bucket",
    "gla:e2e_request_latency_seconds_bucket", "gla:request_queue_time_seconds_bucket",
    "gla:request_prompt_tokens_bucket", "gla:request_generation_tokens_bucket",
    "gla:prompt_tokens_total", "gla:generation_tokens_total", "gla:request_success_total",
    "gla:request_failure_total", "gla:client_disconnects_total", "gla:num_requests_running",
    "gla:num_requests_waiting", "gla:state_slots_used", "gla:state_slots_total",
    "gla:state_cache_queries_total", "gla:state_cache_hits_total", "gla:state_cache_evictions_total",
    "gla:state_cache_bytes", "gla:redis_op_latency_seconds_bucket", "gla:redis_errors_total",
    "gla:state_rebuilds_total", "process_resident_memory_bytes", "python_info",
]


def test_every_issue_metric_is_exposed_before_any_event() -> None:
    names = {name for name, _ in samples(Metrics())}
    assert [n for n in REQUIRED if n not in names] == []
    for tier in CACHE_TIERS:
        assert ("gla:state_cache_hits_total", (("tier", tier),)) in samples(Metrics())


def test_request_lifecycle_records_exact_latencies_and_tokens() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock, process_metrics=False)
    m.on_request_queued("a")
    assert value(m, "gla:num_requests_waiting") == 1
    clock.now += 0.5
    m.on_request_scheduled("a")
    assert value(m, "gla:num_requests_waiting") == 0
    assert value(m, "gla:num_requests_running") == 1
    clock.now += 0.25
    m.on_first_token("a")
    for _ in range(3):
        clock.now += 0.02
        m.on_token("a")
    m.on_finish("a", "length", num_prompt_tokens=7, num_generation_tokens=4, num_cached_tokens=3)
    m.on_finish("a", "length", num_prompt_tokens=7, num_generation_tokens=4)  # idempotent

    assert value(m, "gla:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(m, "gla:time_to_first_token_seconds_sum") == pytest.approx(0.75)
    assert value(m, "gla:inter_token_latency_seconds_count") == 3
    assert value(m, "gla:inter_token_latency_seconds_sum") == pytest.approx(0.06)
    assert value(m, "gla:e2e_request_latency_seconds_sum") == pytest.approx(0.81)
    assert value(m, "gla:generation_tokens_total") == 4
    assert value(m, "gla:prompt_tokens_total") == 7
    assert value(m, "gla:prompt_tokens_cached_total") == 3
    assert value(m, "gla:request_prompt_tokens_sum") == 7
    assert value(m, "gla:request_generation_tokens_count") == 1
    assert value(m, "gla:request_success_total", finished_reason="length") == 1
    assert value(m, "gla:num_requests_running") == 0


def test_failures_disconnects_and_rejections() -> None:
    m = Metrics(process_metrics=False)
    m.on_request_queued("waiting")
    m.on_failure("waiting", "error")
    assert value(m, "gla:num_requests_waiting") == 0
    m.on_request_queued("gone")
    m.on_request_scheduled("gone")
    m.on_token("gone")
    m.on_disconnect("gone", num_prompt_tokens=2, num_generation_tokens=1)
    m.on_disconnect("gone", num_prompt_tokens=2, num_generation_tokens=1)
    m.on_rejected("rate_limited")
    assert value(m, "gla:request_failure_total", reason="error") == 1
    assert value(m, "gla:request_failure_total", reason="rate_limited") == 1
    assert value(m, "gla:client_disconnects_total") == 1
    assert value(m, "gla:request_success_total", finished_reason="abort") == 1
    assert value(m, "gla:num_requests_running") == 0


def test_state_cache_redis_and_slots() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock, process_metrics=False)
    m.set_slot_usage(3, 8)
    m.on_cache_lookup("host", hit=True)
    m.on_cache_lookup("host", hit=False)
    m.on_cache_lookup("redis", hit=False)
    m.on_cache_evict("host", 2)
    m.set_cache_bytes("host", 4096)
    m.on_state_rebuild("corrupt")
    m.on_redis_op("get", 0.003, ok=True)
    m.on_redis_op("put", 0.5, ok=False)
    with pytest.raises(ValueError, match="unknown state-cache tier"):
        m.on_cache_lookup("disk", hit=True)

    assert value(m, "gla:state_slots_used") == 3
    assert value(m, "gla:state_slots_total") == 8
    assert value(m, "gla:state_cache_queries_total", tier="host") == 2
    assert value(m, "gla:state_cache_hits_total", tier="host") == 1
    assert value(m, "gla:state_cache_queries_total", tier="redis") == 1
    assert value(m, "gla:state_cache_evictions_total", tier="host") == 2
    assert value(m, "gla:state_cache_bytes", tier="host") == 4096
    assert value(m, "gla:state_rebuilds_total", reason="corrupt") == 1
    assert value(m, "gla:redis_op_latency_seconds_sum", op="get") == pytest.approx(0.003)
    assert value(m, "gla:redis_errors_total", op="put") == 1
    assert value(m, "gla:redis_errors_total", op="get") == 0


def test_two_instances_in_one_process_do_not_clash() -> None:
    a, b = Metrics(), Metrics()
    a.on_rejected("unauthorized")
    assert value(a, "gla:request_failure_total", reason="unauthorized") == 1
    assert value(b, "gla:request_failure_total", reason="unauthorized") == 0


def test_metrics_route_over_http_moves_after_requests(serve) -> None:
    metrics = Metrics()
    app = FastAPI()

    @app.get("/metrics")
    def get_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/generate")
    def generate() -> dict[str, str]:
        metrics.on_request_queued("r")
        metrics.on_request_scheduled("r")
        metrics.on_token("r", num_tokens=5)
        metrics.on_finish("r", "stop", num_prompt_tokens=3, num_generation_tokens=5)
        return {"text": "hello"}

    base = serve(app)
    with httpx.Client(base_url=base) as client:
        before = client.get("/metrics")
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain; version=")
        client.post("/generate")
        client.post("/generate")
        after = {s.name + str(sorted(s.labels.items())): s.value
                 for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
    assert after["gla:generation_tokens_total[]"] == 10
    assert after["gla:request_success_total[('finished_reason', 'stop')]"] == 2
    assert after["gla:time_to_first_token_seconds_count[]"] == 2
    assert after["process_cpu_seconds_total[]"] > 0


def test_engine_observer_feeds_metrics_from_the_real_engine(serve) -> None:
    from server.app import create_app
    from server.metrics import EngineMetrics
    from server.settings import Settings

    app = create_app(Settings(max_num_seqs=4, max_num_batched_tokens=64, default_max_tokens=8))
    base = serve(app, lifespan="on")
    deadline = time.monotonic() + 60
    while httpx.get(base + "/ready").status_code != 200:
        assert time.monotonic() < deadline, httpx.get(base + "/health").text
        time.sleep(0.05)
    engine = app.state.server.engine
    metrics = Metrics(process_metrics=False)
    engine.observers.append(EngineMetrics(metrics, engine.stats))

    bodies = [httpx.post(base + "/generate", json={"prompt": f"To be or not {i}", "max_tokens": 6,
                                                   "temperature": 0}, timeout=60).json() for i in range(2)]
    num_tokens = sum(b["num_tokens"] for b in bodies)
    assert value(metrics, "gla:generation_tokens_total") == num_tokens
    assert value(metrics, "gla:time_to_first_token_seconds_count") == 2
    assert value(metrics, "gla:request_queue_time_seconds_count") == 2
    assert value(metrics, "gla:inter_token_latency_seconds_count") == num_tokens - 2
    assert value(metrics, "gla:e2e_request_latency_seconds_count") == 2
    finished = sum(value(metrics, "gla:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert finished == 2
    assert value(metrics, "gla:prompt_tokens_total") == sum(b["usage"]["prompt_tokens"] for b in bodies)
    assert value(metrics, "gla:num_requests_running") == 0
    assert value(metrics, "gla:state_slots_total") == 4
    assert value(metrics, "gla:state_slots_used") == 0
