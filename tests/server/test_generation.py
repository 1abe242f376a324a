"""Generation over real HTTP: streamed == non-streamed on every endpoint, batching changes nothing,
stop rules, seeds, logprobs."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.server.conftest import RunningServer, post_sse

GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}
PROMPT = "To be, or not to be, that is the question:"


def test_generate_stream_equals_generate(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, **GREEDY}
    full = client.post("/generate", json=body).json()
    events = post_sse(client, "/generate_stream", body)
    assert events[-1] == ("message", "[DONE]")
    payloads = [json.loads(d) for _, d in events[:-1]]
    assert len(payloads) == full["num_tokens"] == 24  # one event per token
    assert [p["token"]["id"] for p in payloads] == full["token_ids"]
    assert "".join(p["token"]["text"] for p in payloads) == full["text"]
    finals = [p for p in payloads if p["generated_text"] is not None]
    assert len(finals) == 1 and finals[0] is payloads[-1]
    assert finals[0]["generated_text"] == full["text"]
    assert finals[0]["details"]["finish_reason"] == full["finish_reason"] == "length"
    assert finals[0]["details"]["usage"] == full["usage"]
    assert full["usage"]["completion_tokens"] == 24 and full["usage"]["prompt_tokens"] > 0


def test_completions_stream_equals_non_stream(client: httpx.Client, server: RunningServer) -> None:
    body = {"model": server.state.model_name, "prompt": PROMPT, **GREEDY}
    full = client.post("/v1/completions", json=body).json()
    assert full["object"] == "text_completion" and full["choices"][0]["finish_reason"] == "length"
    events = post_sse(client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert text == full["choices"][0]["text"]
    assert reasons == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_chat_stream_equals_non_stream(client: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Where is the king?"}], **GREEDY}
    full = client.post("/v1/chat/completions", json=body).json()
    assert full["object"] == "chat.completion"
    events = post_sse(client, "/v1/chat/completions", {**body, "stream": True})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert text == full["choices"][0]["message"]["content"]
    assert reasons == [full["choices"][0]["finish_reason"]] == ["length"]
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # include_usage not asked


def _prompts(n: int) -> list[str]:
    words = "now is the winter of our discontent made glorious summer by this sun of york".split()
    # lengths from a few tokens to several prefill budgets (32 tokens), so prompts are split
    return [" ".join(words[(i * 7) % len(words) :] + words * (i % 5)) for i in range(n)]


def test_32_concurrent_greedy_requests_equal_each_alone(server: RunningServer) -> None:
    bodies = [{"prompt": p, "temperature": 0, "max_tokens": 6 + i % 11, "ignore_eos": True}
              for i, p in enumerate(_prompts(32))]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        alone = [c.post("/generate", json=b).json()["token_ids"] for b in bodies]

    async def together() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            rs = await asyncio.gather(*(ac.post("/generate", json=b) for b in bodies))
        return [r.json()["token_ids"] for r in rs]

    steps_before = server.health()["steps"]
    concurrent = asyncio.run(together())
    steps = server.health()["steps"] - steps_before
    assert concurrent == alone
    assert steps < sum(len(t) for t in alone) / 2  # they really were batched


def test_stop_string_spanning_tokens_is_cut(client: httpx.Client) -> None:
    full = client.post("/generate", json={"prompt": PROMPT, **GREEDY}).json()
    stream = post_sse(client, "/generate_stream", {"prompt": PROMPT, **GREEDY})
    pieces = [json.loads(d)["token"]["text"] for _, d in stream[:-1]]
    # a stop string made of the end of one token's text and the start of the next one's
    i = next(k for k in range(2, len(pieces) - 1) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 1)
    stop = pieces[i][-2:] + pieces[i + 1][:1]
    cut = full["text"].find(stop)
    body = {"prompt": PROMPT, **GREEDY, "stop": [stop]}
    res = client.post("/generate", json=body).json()
    assert res["finish_reason"] == "stop" and res["text"] == full["text"][:cut]
    ends = [len("".join(pieces[: k + 1])) for k in range(len(pieces))]
    num_tokens = next(k + 1 for k, e in enumerate(ends) if e >= cut + len(stop))
    assert len(res["token_ids"]) == num_tokens  # ended by the token completing the stop string
    events = post_sse(client, "/generate_stream", body)
    payloads = [json.loads(d) for _, d in events[:-1]]
    assert "".join(p["token"]["text"] for p in payloads) == res["text"]  # held back, never shown
    assert payloads[-1]["details"]["finish_reason"] == "stop"


def test_stop_token_ids_and_max_tokens(client: httpx.Client) -> None:
    full = client.post("/generate", json={"prompt": PROMPT, **GREEDY}).json()
    stop_id = full["token_ids"][3]
    first = full["token_ids"].index(stop_id)
    res = client.post("/generate", json={"prompt": PROMPT, **GREEDY, "stop_token_ids": [stop_id]}).json()
    assert res["finish_reason"] == "stop" and res["token_ids"] == full["token_ids"][: first + 1]
    short = client.post("/generate", json={"prompt": PROMPT, **GREEDY, "max_tokens": 1}).json()
    assert short["finish_reason"] == "length" and short["token_ids"] == full["token_ids"][:1]


def test_seeded_sampling_is_reproducible_whatever_the_batch(server: RunningServer) -> None:
    body = {"prompt": PROMPT, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": 1234,
            "max_tokens": 20, "ignore_eos": True}
    others = [{"prompt": p, "temperature": 1.0, "max_tokens": 20, "ignore_eos": True} for p in _prompts(6)]

    async def run(batch: list[dict]) -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            rs = await asyncio.gather(*(ac.post("/generate", json=b) for b in batch))
        return [r.json()["token_ids"] for r in rs]

    alone = asyncio.run(run([body]))[0]
    crowded = asyncio.run(run(others[:3] + [body] + others[3:]))[3]
    other_seed = asyncio.run(run([{**body, "seed": 99}]))[0]
    assert crowded == alone
    assert other_seed != alone


def test_logprobs(client: httpx.Client) -> None:
    res = client.post("/generate", json={"prompt": PROMPT, **GREEDY, "max_tokens": 4, "logprobs": 3}).json()
    assert len(res["logprobs"]) == 4 and all(lp <= 0 for lp in res["logprobs"])
    for lp, top in zip(res["logprobs"], res["top_logprobs"], strict=True):
        assert len(top) == 3
        assert abs(max(top.values()) - lp) < 1e-4  # greedy picks the most likely token
    cmpl = client.post("/v1/completions", json={"prompt": PROMPT, **GREEDY, "max_tokens": 4, "logprobs": 2}).json()
    lps = cmpl["choices"][0]["logprobs"]
    assert len(lps["tokens"]) == 4 and all(len(t) == 2 for t in lps["top_logprobs"])
    assert "".join(lps["tokens"]) == cmpl["choices"][0]["text"]
