"""The app wires metrics, API keys/tenants and drain from Settings (over real HTTP)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import RunningServer, start_server

BODY = {"prompt": "Hark, who goes", "temperature": 0, "max_tokens": 5, "ignore_eos": True}


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_metrics_move_with_requests(server: RunningServer, client: httpx.Client) -> None:
    before = client.get("/metrics").text
    client.post("/generate", json=BODY)
    client.post("/generate", json={"prompt": ""})
    after = client.get("/metrics").text
    assert _metric(after, "gla:generation_tokens_total") - _metric(before, "gla:generation_tokens_total") == 5
    ok, bad = {"finished_reason": "length"}, {"reason": "invalid_request"}
    assert _metric(after, "gla:request_success_total", **ok) > _metric(before, "gla:request_success_total", **ok)
    assert _metric(after, "gla:request_failure_total", **bad) > _metric(before, "gla:request_failure_total", **bad)
    assert _metric(after, "gla:state_slots_total") == server.settings.max_num_seqs


def test_engine_steps_are_timed_by_phase(server: RunningServer, client: httpx.Client) -> None:
    """Every step is split into schedule / model / snapshot / postprocess, in /health and /metrics."""
    before_health, before = server.health(), client.get("/metrics").text
    client.post("/generate", json=BODY)  # 5 tokens: at least 5 steps
    after_health, after = server.health(), client.get("/metrics").text
    phases = ("schedule", "model", "snapshot", "postprocess")
    steps = after_health["steps"] - before_health["steps"]
    assert steps >= 5
    for phase in phases:
        n = (_metric(after, "gla:engine_step_phase_seconds_count", phase=phase)
             - _metric(before, "gla:engine_step_phase_seconds_count", phase=phase))
        assert n == steps, phase
    ms = {p: after_health["step_phase_ms"][p] - before_health["step_phase_ms"][p] for p in phases}
    assert ms["model"] > 0 and ms["snapshot"] > 0 and all(v >= 0 for v in ms.values())


def test_api_keys_and_tenant_isolation() -> None:
    srv = start_server(api_keys="sk-a:acme,sk-b:globex")
    try:
        url = srv.url
        assert httpx.post(url + "/generate", json=BODY).status_code == 401
        assert httpx.post(url + "/generate", json=BODY, headers={"Authorization": "Bearer sk-x"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # public
        a = {"Authorization": "Bearer sk-a"}
        b = {"Authorization": "Bearer sk-b"}
        turn = {**BODY, "conversation_id": "shared-name"}
        assert httpx.post(url + "/generate", json=turn, headers=a).json()["state_cached"] is False
        assert httpx.post(url + "/generate", json=turn, headers=a).json()["state_cached"] is True
        # the same id under another tenant is another conversation
        assert httpx.post(url + "/generate", json=turn, headers=b).json()["state_cached"] is False
    finally:
        srv.stop()


def test_draining_refuses_new_work_but_stays_alive() -> None:
    srv = start_server()
    try:
        assert httpx.post(srv.url + "/generate", json=BODY).status_code == 200
        srv.state.drainer.start()
        assert httpx.get(srv.url + "/ready").status_code == 503
        r = httpx.post(srv.url + "/generate", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "draining"
    finally:
        srv.stop()


def test_docs_and_index(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    expected = {"/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/health", "/ready"}
    assert expected <= set(paths)
    index = client.get("/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith(("text/html", "application/json"))
