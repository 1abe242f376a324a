"""Prefix reuse without conversation ids, over real HTTP: a client that resends its whole history
resumes from the longest cached prefix state and gets exactly the reply of a full prefill."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
import uvicorn

from server.app import create_app
from server.conversations import LRUConversationStore
from server.settings import Settings
from server.state_cache.factory import build_conversation_store
from server.state_cache.tiered import TieredStateCache
from tests.server.conftest import BASE_SETTINGS, RunningServer, start_server

GREEDY = {"temperature": 0, "max_tokens": 12}
QUESTIONS = ["Who goes there?", "What news from the north?", "Then let us go."]


@pytest.fixture(scope="module")
def uncached() -> Iterator[RunningServer]:
    """The reference: a budget of 0 bytes keeps no state, so every prompt is prefilled from zero."""
    srv = start_server(conversation_cache_bytes=0)
    yield srv
    srv.stop()


def _chat(srv: RunningServer, turns: int) -> list[openai.types.chat.ChatCompletion]:
    """An OpenAI client's chat: every request carries the whole history, no conversation id."""
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Answer briefly."}]
    replies = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        reply = oai.chat.completions.create(model=srv.state.model_name, messages=messages, **GREEDY)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        replies.append(reply)
    return replies


def test_chat_resending_history_resumes_from_cache_with_the_same_replies(
    server: RunningServer, uncached: RunningServer
) -> None:
    got = _chat(server, 3)
    want = _chat(uncached, 3)
    assert [r.choices[0].message.content for r in got] == [r.choices[0].message.content for r in want]
    assert [r.usage.prompt_tokens for r in got] == [r.usage.prompt_tokens for r in want]
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in got]
    assert cached[0] == 0
    # Turn k's prompt extends turn k-1's prompt: at least that much is restored, never all of it.
    for k in (1, 2):
        assert got[k - 1].usage.prompt_tokens <= cached[k] < got[k].usage.prompt_tokens, cached
    assert [r.usage.prompt_tokens_details.cached_tokens for r in want] == [0, 0, 0]


def test_tiered_store_of_gla_serve_serve_resumes_resent_history(uncached: RunningServer) -> None:
    """`gla-serve serve`'s store (host tier, no Redis here) gives the same replies from its cache."""
    srv = RunningServer(Settings(**BASE_SETTINGS))
    srv.app = create_app(srv.settings, conversations=build_conversation_store(srv.settings))
    config = uvicorn.Config(srv.app, host="127.0.0.1", port=srv.port, log_level="warning", lifespan="on")
    srv.server = uvicorn.Server(config)
    srv.thread = threading.Thread(target=srv.server.run, daemon=True)
    srv.start()
    try:
        got = _chat(srv, 2)
        cache = srv.health()["cache"]
    finally:
        srv.stop()
    want = _chat(uncached, 2)
    assert [r.choices[0].message.content for r in got] == [r.choices[0].message.content for r in want]
    assert got[1].usage.prompt_tokens_details.cached_tokens >= got[0].usage.prompt_tokens
    assert cache["lookup_hits_host"] >= 1 and cache["stores"] >= 2


def test_tiered_host_index_keeps_prompts_of_one_length_apart() -> None:
    async def run() -> None:
        cache = TieredStateCache(bytes(32), host_budget_bytes=8000)
        await cache.store("t", [1, 2, 3], _state(1))
        await cache.store("t", [1, 2, 4], _state(2))  # same anchor, same length, other tokens
        await cache.store("t", [5, 6], _state(3))  # evicts [1, 2, 3]
        hit = await cache.lookup_prefix("t", [1, 2, 4, 9])
        assert hit is not None and hit.num_tokens == 3 and float(hit.tensors["s"][0]) == 2

    asyncio.run(run())


def test_generate_reports_cached_tokens_and_matches_a_full_prefill(
    server: RunningServer, uncached: RunningServer
) -> None:
    prompt = "Now is the winter of our discontent made glorious summer"
    with httpx.Client(base_url=server.url, timeout=60) as c, httpx.Client(base_url=uncached.url, timeout=60) as u:
        first = c.post("/generate", json={"prompt": prompt, **GREEDY, "ignore_eos": True}).json()
        ids = server.state.tokenizer(prompt)["input_ids"]
        assert first["usage"]["prompt_tokens"] == len(ids)
        # The first reply's state covers every token but its last sampled one.
        longer = ids + first["token_ids"] + [ids[1]]
        body = {"prompt_token_ids": longer, **GREEDY}
        second = c.post("/generate", json=body).json()
        assert second["usage"]["cached_tokens"] == len(ids) + len(first["token_ids"]) - 1
        assert second["state_cached"] is True
        reference = u.post("/generate", json=body).json()
        assert reference["usage"]["cached_tokens"] == 0
        assert second["token_ids"] == reference["token_ids"]
        # The same prompt again: its own end state gives no logits, so a shorter prefix is used.
        again = c.post("/generate", json=body).json()
        assert 0 < again["usage"]["cached_tokens"] < len(longer)
        assert again["token_ids"] == reference["token_ids"]


def test_long_prompt_split_across_steps_is_snapshotted_at_its_end(
    server: RunningServer, uncached: RunningServer
) -> None:
    base = list(range(100, 190))  # 90 tokens: three prefill steps of 32
    with httpx.Client(base_url=server.url, timeout=60) as c, httpx.Client(base_url=uncached.url, timeout=60) as u:
        c.post("/generate", json={"prompt_token_ids": base, **GREEDY, "max_tokens": 1})
        body = {"prompt_token_ids": base + [7, 8, 9], **GREEDY}
        got = c.post("/generate", json=body).json()
        want = u.post("/generate", json=body).json()
    assert got["usage"]["cached_tokens"] == len(base)
    assert got["token_ids"] == want["token_ids"]


def _state(value: float, nbytes: int = 4000) -> dict[str, torch.Tensor]:
    return {"s": torch.full((nbytes // 4,), float(value), dtype=torch.float32)}


def test_lru_prefix_index_longest_match_tenants_and_budget() -> None:
    asyncio.run(_lru_prefix_index())


async def _lru_prefix_index() -> None:
    store = LRUConversationStore(budget_bytes=10_000)
    long_ids = list(range(600))  # past two hash anchors
    store.store_prefix("a", long_ids[:5], _state(1))
    store.store_prefix("a", long_ids[:520], _state(2))
    hit = await store.lookup_prefix("a", long_ids)
    assert hit is not None and hit.num_tokens == 520 and float(hit.state["s"][0]) == 2
    hit = await store.lookup_prefix("a", long_ids[:519])
    assert hit is not None and hit.num_tokens == 5
    assert await store.lookup_prefix("b", long_ids) is None  # another tenant's state is invisible
    assert await store.lookup_prefix("a", [1] + long_ids[1:]) is None  # differs in the first token
    store.store_prefix("a", [9, 9, 9], _state(3))  # a third 4000-byte state: the least recently used (520) goes
    assert store.stats()["prefix_states"] == 2 and store.num_bytes <= 10_000
    hit = await store.lookup_prefix("a", long_ids)
    assert hit is not None and hit.num_tokens == 5
    store.store_prefix("a", [1, 2], _state(4, nbytes=20_000))  # larger than the budget: not kept
    assert await store.lookup_prefix("a", [1, 2, 3]) is None


def test_long_prompts_are_checkpointed_every_interval_tokens(uncached: RunningServer) -> None:
    """With prefix_snapshot_interval=32 a 90-token prompt, prefilled in steps of 32, leaves states
    after 32 and 64 tokens too; a prompt sharing only its first 70 tokens resumes from 64."""
    base = list(range(200, 290))
    srv = start_server(prefix_snapshot_interval=32)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c, httpx.Client(base_url=uncached.url, timeout=60) as u:
            c.post("/generate", json={"prompt_token_ids": base, **GREEDY, "max_tokens": 1})
            body = {"prompt_token_ids": base[:70] + [7, 8, 9], **GREEDY}
            got = c.post("/generate", json=body).json()
            want = u.post("/generate", json=body).json()
        assert got["usage"]["cached_tokens"] == 64
        assert got["token_ids"] == want["token_ids"]
    finally:
        srv.stop()
