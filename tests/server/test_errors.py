"""Bad input, overload and not-ready over real HTTP: every one a 4xx/503 ErrorResponse, never a 500,
and the server keeps answering."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest

from server.app import default_model_loader
from server.settings import Settings
from tests.server.conftest import RunningServer, sse_events, start_server

OK_BODY = {"prompt": "Hark", "temperature": 0, "max_tokens": 2}


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


BAD_REQUESTS = {
    "malformed-json": ("/generate", {"content": b'{"prompt": "a", ', "headers": {"content-type": "application/json"}},
                       None),
    "not-an-object": ("/generate", {"json": ["prompt"]}, None),
    "wrong-type": ("/generate", {"json": {"prompt": "a", "max_tokens": "many"}}, "max_tokens"),
    "prompt-type": ("/generate", {"json": {"prompt": 12}}, "prompt"),
    "negative-max-tokens": ("/generate", {"json": {"prompt": "a", "max_tokens": -1}}, "max_tokens"),
    "top-p-above-1": ("/generate", {"json": {"prompt": "a", "top_p": 1.5}}, "top_p"),
    "top-k-beyond-int64": ("/generate", {"json": {"prompt": "a", "top_k": 2**63}}, "top_k"),
    "empty-prompt": ("/generate", {"json": {"prompt": ""}}, "prompt"),
    "empty-token-ids": ("/generate", {"json": {"prompt_token_ids": []}}, "prompt"),
    "token-id-outside-vocab": ("/generate", {"json": {"prompt_token_ids": [10**9]}}, "prompt_token_ids"),
    "no-prompt": ("/generate", {"json": {"max_tokens": 3}}, None),
    "max-tokens-over-cap": ("/generate", {"json": {"prompt": "a", "max_tokens": 100_000}}, "max_tokens"),
    "bad-conversation-id": ("/generate", {"json": {"prompt": "a", "conversation_id": "no spaces/please"}},
                            "conversation_id"),
    "completions-empty-prompt": ("/v1/completions", {"json": {"prompt": ""}}, "prompt"),
    "completions-n": ("/v1/completions", {"json": {"prompt": "a", "n": 2}}, "n"),
    "chat-no-messages": ("/v1/chat/completions", {"json": {"messages": []}}, "messages"),
    "chat-bad-role": ("/v1/chat/completions", {"json": {"messages": [{"role": "wizard", "content": "x"}]}}, None),
    "chat-temperature": ("/v1/chat/completions",
                         {"json": {"messages": [{"role": "user", "content": "x"}], "temperature": -1}},
                         "temperature"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_bad_request_is_400_and_server_keeps_serving(client: httpx.Client, case: str) -> None:
    path, kwargs, param = BAD_REQUESTS[case]
    err = assert_error(client.post(path, **kwargs), 400, param)
    assert err["type"] == "invalid_request_error"
    assert client.post("/generate", json=OK_BODY).status_code == 200


def test_10mb_body_is_413(client: httpx.Client) -> None:
    big = {"prompt": "x" * (10 * 2**20)}
    err = assert_error(client.post("/generate", json=big), 413)
    assert err["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit must hold for chunked uploads too
        for _ in range(10):
            yield b"x" * 2**20

    assert_error(client.post("/generate", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert client.post("/generate", json=OK_BODY).status_code == 200


def test_unknown_model_is_404_and_unknown_route_is_json(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "gpt-7", "prompt": "a"})
    assert assert_error(r, 404, "model")["code"] == "model_not_found"
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/generate"), 405)


def test_full_queue_is_429_with_retry_after() -> None:
    srv = start_server(max_num_seqs=1, max_waiting_requests=1)
    body = {"prompt": "Hark", "temperature": 0, "max_tokens": 64, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/generate", json=body) for _ in range(6)))

    try:
        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}
        rejected = next(r for r in rs if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert assert_error(rejected, 429)["type"] == "rate_limit_error"
        srv.wait_idle()
        assert httpx.post(srv.url + "/generate", json=body).status_code == 200
    finally:
        srv.stop()


def test_ready_is_503_until_loaded_and_warmed_up() -> None:
    release = threading.Event()

    def slow_loader(settings: Settings) -> Any:
        release.wait(30)
        return default_model_loader(settings)

    srv = start_server(model_loader=slow_loader, wait_ready=False)
    try:
        r = httpx.get(srv.url + "/ready")
        assert_error(r, 503)
        assert r.headers["retry-after"] == "1"
        assert httpx.get(srv.url + "/health").json()["status"] == "loading"
        assert_error(httpx.post(srv.url + "/generate", json=OK_BODY), 503)
        release.set()
        srv.wait_ready()
        health = srv.health()
        assert health["status"] == "ok" and health["steps"] >= 1  # the warm-up generate ran
        assert httpx.post(srv.url + "/generate", json=OK_BODY).status_code == 200
    finally:
        release.set()
        srv.stop()


def test_failed_load_is_reported(server: RunningServer) -> None:
    def broken(settings: Settings) -> Any:
        raise FileNotFoundError("no such model")

    srv = start_server(model_loader=broken, wait_ready=False)
    try:
        for _ in range(100):
            if srv.state.load_error:
                break
            threading.Event().wait(0.02)
        assert httpx.get(srv.url + "/health").json()["status"] == "error"
        assert "no such model" in assert_error(httpx.get(srv.url + "/ready"), 503)["message"]
    finally:
        srv.stop()


def test_engine_failure_mid_stream_is_an_error_event_and_the_server_recovers() -> None:
    srv = start_server()
    runner = srv.state.engine.runner
    real_run, calls = runner.run, []

    def failing_run(batch: Any) -> Any:  # fault injection: the 4th step raises
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("CUDA error: an illegal memory access (at 0xdeadbeef)")
        return real_run(batch)

    runner.run = failing_run
    try:
        body = {"prompt": "Hark", "temperature": 0, "max_tokens": 50, "ignore_eos": True}
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            with c.stream("POST", "/generate_stream", json=body) as r:
                assert r.status_code == 200
                events = sse_events(r.iter_lines())
            assert events[-1] == ("message", "[DONE]")
            name, data = events[-2]
            err = json.loads(data)["error"]
            assert name == "error" and err["type"] == "server_error" and "0xdeadbeef" not in err["message"]
            assert 1 <= len(events) - 2 < 50
            srv.wait_idle()
            assert c.post("/generate", json=body).json()["num_tokens"] == 50  # still serving
    finally:
        runner.run = real_run
        srv.stop()
