"""server/auth.py over real HTTP: keys and tenants, 401 bodies, public paths, per-tenant 429 limits."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from server.auth import AuthMiddleware, KeyStore, TenantLimiter, TenantLimits, is_public
from server.metrics import Metrics

KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-fedcba9876543210"


def make_app(keys: KeyStore | None, limiter: TenantLimiter | None = None,
             metrics: Metrics | None = None) -> FastAPI:
    app = FastAPI()
    notes: dict[tuple[str, str], str] = {}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, str]:
        return {"tenant": request.state.tenant}

    @app.put("/notes/{note_id}")
    async def put_note(note_id: str, request: Request) -> dict[str, str]:
        notes[(request.state.tenant, note_id)] = (await request.body()).decode()
        return {"ok": "1"}

    @app.get("/notes/{note_id}")
    def get_note(note_id: str, request: Request) -> dict[str, str]:
        if (request.state.tenant, note_id) not in notes:
            raise HTTPException(404, "no such note")
        return {"text": notes[(request.state.tenant, note_id)]}

    @app.get("/slow")
    async def slow(s: float = 0.6) -> dict[str, str]:
        await asyncio.sleep(s)
        return {"done": "1"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            for i in range(5):
                await asyncio.sleep(0.1)
                yield f"data: {i}\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/use")
    def use(tokens: int, request: Request) -> dict[str, str]:
        assert limiter is not None
        limiter.charge(request.state.tenant, tokens)
        return {"charged": str(tokens)}

    app.add_middleware(AuthMiddleware, keys=keys, limiter=limiter,
                       on_reject=metrics.on_rejected if metrics else None)
    return app


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    return error


def test_auth_off_every_request_is_default_tenant(serve) -> None:
    base = serve(make_app(KeyStore.load()))
    r = httpx.get(base + "/whoami")
    assert r.status_code == 200 and r.json() == {"tenant": "default"}


def test_auth_on_missing_wrong_and_right_keys(serve, caplog) -> None:
    metrics = Metrics(process_metrics=False)
    keys = KeyStore.load(inline=f"{KEY_A}:alpha,{KEY_B}:bravo")
    base = serve(make_app(keys, metrics=metrics))
    with caplog.at_level(logging.DEBUG):
        missing = httpx.get(base + "/whoami")
        wrong = httpx.get(base + "/whoami", headers=auth(KEY_A + "x"))
        basic = httpx.get(base + "/whoami", headers={"Authorization": f"Basic {KEY_A}"})
        right_a = httpx.get(base + "/whoami", headers=auth(KEY_A))
        right_b = httpx.get(base + "/whoami", headers={"authorization": f"bearer {KEY_B}"})
    for response in (missing, wrong, basic):
        error = assert_openai_error(response, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert right_a.json() == {"tenant": "alpha"}
    assert right_b.json() == {"tenant": "bravo"}
    assert "401 /whoami" in caplog.text
    assert KEY_A not in caplog.text and KEY_A[:12] not in repr(keys)
    body, _ = metrics.render()
    assert 'gla:request_failure_total{reason="unauthorized"} 3.0' in body.decode()


def test_public_paths_stay_open(serve) -> None:
    base = serve(make_app(KeyStore.load(inline=f"{KEY_A}:alpha")))
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/openapi.json").status_code == 200
    assert httpx.get(base + "/docs").status_code == 200
    assert httpx.get(base + "/healthz").status_code == 401  # a prefix of a word is not public
    assert is_public("/static/app.js", ["/", "/static"]) and not is_public("/v1/models", ["/"])


def test_tenants_are_isolated(serve) -> None:
    base = serve(make_app(KeyStore.load(inline=f"{KEY_A}:alpha,{KEY_B}:bravo")))
    with httpx.Client(base_url=base) as client:
        assert client.put("/notes/n1", content="alpha's secret", headers=auth(KEY_A)).status_code == 200
        assert client.get("/notes/n1", headers=auth(KEY_A)).json() == {"text": "alpha's secret"}
        assert client.get("/notes/n1", headers=auth(KEY_B)).status_code == 404


def test_concurrency_limit_per_tenant_counts_streams_until_their_last_byte(serve) -> None:
    keys = KeyStore.load(inline=f"{KEY_A}:alpha,{KEY_B}:bravo")
    limiter = TenantLimiter(TenantLimits(max_concurrency=1))
    base = serve(make_app(keys, limiter))

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            slow = asyncio.create_task(client.get("/slow", headers=auth(KEY_A)))
            while limiter.in_flight("alpha") == 0:
                await asyncio.sleep(0.01)
            busy = await client.get("/whoami", headers=auth(KEY_A))
            other = await client.get("/whoami", headers=auth(KEY_B))
            assert (await slow).status_code == 200
            after = await client.get("/whoami", headers=auth(KEY_A))
            assert_openai_error(busy, 429, "concurrency_limit_exceeded")
            assert busy.headers["retry-after"] == "1"
            assert other.status_code == 200 and after.status_code == 200

            async with client.stream("GET", "/stream", headers=auth(KEY_A)) as stream:
                lines = stream.aiter_lines()
                assert (await anext(lines)) == "data: 0"
                during = await client.get("/whoami", headers=auth(KEY_A))
                rest = [line async for line in lines if line]
            assert rest == ["data: 1", "data: 2", "data: 3", "data: 4"]
            assert_openai_error(during, 429, "concurrency_limit_exceeded")
            # the slot is released just after the last byte, which the client may read first
            deadline = time.monotonic() + 5
            while limiter.in_flight("alpha") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert (await client.get("/whoami", headers=auth(KEY_A))).status_code == 200

    asyncio.run(scenario())
    # the server releases the slot just after its last byte, which the client may read first
    deadline = time.monotonic() + 5
    while limiter.in_flight("alpha") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert limiter.in_flight("alpha") == 0


def test_token_rate_limit_answers_429_with_retry_after(serve) -> None:
    keys = KeyStore.load(inline=f"{KEY_A}:alpha,{KEY_B}:bravo")
    limiter = TenantLimiter(TenantLimits(max_tokens_per_minute=60))  # 1 token/s, bucket of 60
    base = serve(make_app(keys, limiter))
    with httpx.Client(base_url=base) as client:
        assert client.post("/use?tokens=90", headers=auth(KEY_A)).status_code == 200
        limited = client.get("/whoami", headers=auth(KEY_A))
        error = assert_openai_error(limited, 429, "token_rate_limit_exceeded")
        assert error["type"] == "rate_limit_error"
        assert 30 <= int(limited.headers["retry-after"]) <= 32  # 30 tokens of debt + 1, at 1 token/s
        assert client.get("/whoami", headers=auth(KEY_B)).status_code == 200


def test_token_bucket_refills_over_time() -> None:
    now = [0.0]
    limiter = TenantLimiter(TenantLimits(max_tokens_per_minute=600), clock=lambda: now[0])  # 10 tokens/s
    assert limiter.try_acquire("t") is None
    limiter.release("t")
    limiter.charge("t", 620)
    rejection = limiter.try_acquire("t")
    assert rejection is not None and rejection.retry_after_s == 3  # (20 + 1) tokens at 10/s
    now[0] = 2.2
    assert limiter.try_acquire("t") is None
    now[0] = 1000.0
    limiter.charge("t", 599)  # refill is capped at one minute of tokens
    assert limiter.try_acquire("t") is None
    limiter.charge("t", 2)
    assert limiter.try_acquire("t") is not None


def test_per_tenant_overrides_from_a_json_key_file(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": {KEY_A: "alpha", KEY_B: "bravo"},
                                "tenants": {"alpha": {"max_concurrency": 2}}}))
    keys = KeyStore.load(file=path)
    limiter = TenantLimiter(TenantLimits(max_concurrency=1), keys.tenant_limits)
    assert keys.authenticate(KEY_A) == "alpha" and keys.authenticate("nope") is None
    assert [limiter.try_acquire("alpha") for _ in range(3)][-1] is not None
    assert limiter.try_acquire("alpha") is not None
    assert limiter.try_acquire("bravo") is None and limiter.try_acquire("bravo") is not None


@pytest.mark.parametrize("text", [
    f"# comment\n{KEY_A}:alpha\n\n{KEY_B} bravo\nsk-lonely\n",
    json.dumps({KEY_A: "alpha", KEY_B: "bravo", "sk-lonely": "default"}),
])
def test_key_file_formats(tmp_path, text: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    keys = KeyStore.load(file=path)
    assert keys.authenticate(KEY_A) == "alpha"
    assert keys.authenticate(KEY_B) == "bravo"
    assert keys.authenticate("sk-lonely") == "default"
    assert repr(keys) == "KeyStore(3 keys, tenants=['alpha', 'bravo', 'default'])"


@pytest.mark.parametrize(("text", "message"), [
    ('{"keys": ["a"]}', "expected"),
    ('{"k": "t",', "invalid JSON"),
    ('{"keys": {"k": "t"}, "tenants": {"t": {"max_burst": 3}}}', "limits of tenant 't'"),
    (f"{KEY_A}:\n", "entry 1 is not KEY:TENANT"),
])
def test_bad_key_files_raise_clear_errors_without_the_key(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        KeyStore.load(file=path)
    assert KEY_A not in str(info.value)
    with pytest.raises(ValueError, match="cannot read API key file"):
        KeyStore.load(file=tmp_path / "missing")
