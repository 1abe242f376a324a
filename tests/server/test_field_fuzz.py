"""Every request field of every generation route, set to values at and past the edges of its type:
each answer is a 200 or a 4xx ErrorResponse naming the problem, never a 500, and the server keeps
serving. (A top_k of 2**63 once reached the sampler and came back as a 500.)"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.server.test_errors import OK_BODY

EDGES: list[Any] = [
    None, True, -1, 0, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 1e308, -1e308, 1e-320, "x", "", [], {},
    [2**63], [-1], [[1]], ["a"], "a" * 20_000,
]
ROUTES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "/generate": ({"prompt": "hi", "max_tokens": 2}, [
        "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
        "stop_token_ids", "logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "conversation_id", "ignore_eos", "skip_special_tokens"]),
    "/v1/completions": ({"prompt": "hi", "max_tokens": 2}, [
        "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "n", "echo", "stream",
        "presence_penalty", "frequency_penalty", "user", "model"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, [
        "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "logprobs",
        "top_logprobs", "n", "stream", "stream_options", "user", "model", "tools", "response_format"]),
}
CASES = [(route, field) for route, (_, fields) in ROUTES.items() for field in fields]


@pytest.mark.parametrize(("route", "field"), CASES, ids=[f"{r.rsplit('/', 1)[-1]}-{f}" for r, f in CASES])
def test_edge_values_are_answered_never_a_500(client: httpx.Client, route: str, field: str) -> None:
    base, _ = ROUTES[route]
    for value in EDGES:
        r = client.post(route, json={**base, field: value})
        assert r.status_code < 500, (field, value, r.status_code, r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and error["type"], (field, value, r.text[:300])
    assert client.post("/generate", json=OK_BODY).status_code == 200
