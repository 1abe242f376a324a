"""Conversations over real HTTP: resume == replay, disconnects free slots and commit nothing, 409."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from server.conversations import ConversationKey, ConversationSnapshot, LRUConversationStore
from server.errors import ConversationBusy
from tests.server.conftest import RunningServer, sse_events, start_server

TURNS = ["Good morrow, sir.", "What news from the north?", "Then let us go."]
GREEDY = {"temperature": 0, "max_tokens": 8}


def _run_conversation(client: httpx.Client, conversation_id: str) -> list[dict]:
    return [client.post("/generate", json={"prompt": t, "conversation_id": conversation_id, **GREEDY}).json()
            for t in TURNS]


def _replay_ids(server: RunningServer, turns: list[dict], upto: int) -> list[int]:
    """The whole token history before turn `upto`'s reply: BOS only at the very start."""
    tok = server.state.tokenizer
    ids: list[int] = []
    for k in range(upto + 1):
        ids += tok(TURNS[k], add_special_tokens=(k == 0))["input_ids"]
        if k < upto:
            ids += turns[k]["token_ids"]
    return ids


def test_resume_equals_replay(server: RunningServer, client: httpx.Client) -> None:
    turns = _run_conversation(client, "resume-replay")
    assert [t["state_cached"] for t in turns] == [False, True, True]
    usage = turns[2]["usage"]
    assert usage["prompt_tokens"] == len(_replay_ids(server, turns, 2))  # the whole context
    new = server.state.tokenizer(TURNS[2], add_special_tokens=False)["input_ids"]
    assert usage["prompt_tokens"] - usage["cached_tokens"] == len(new) + 1  # prefilled: pending token + new
    for k in (1, 2):
        replay = client.post("/generate", json={"prompt_token_ids": _replay_ids(server, turns, k), **GREEDY}).json()
        assert replay["token_ids"] == turns[k]["token_ids"], k
        assert replay["text"] == turns[k]["text"]


def test_resume_after_state_eviction_rebuilds_from_the_log() -> None:
    # keeps token logs, never a state, and no state stays parked in its device slot either
    srv = start_server(conversation_cache_bytes=1024, resident_conversations=False)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            turns = _run_conversation(c, "evicted")
            assert [t["state_cached"] for t in turns] == [False, False, False]
            replay = c.post("/generate", json={"prompt_token_ids": _replay_ids(srv, turns, 2), **GREEDY}).json()
        assert replay["token_ids"] == turns[2]["token_ids"]
        stats = srv.health()["cache"]
        assert stats["conversations"] == 1 and stats["states"] == 0
    finally:
        srv.stop()


def _log_of(server: RunningServer, conversation_id: str) -> list[int]:
    snap = server.state.conversations._entries[ConversationKey("default", conversation_id)]
    return list(snap.token_ids)


def test_disconnect_mid_stream_frees_the_slot_and_keeps_the_conversation(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for cid in ("cut", "control"):
            c.post("/generate", json={"prompt": TURNS[0], "conversation_id": cid, **GREEDY})
        log_before = _log_of(server, "cut")
        steps_before = server.health()["steps"]
        body = {"prompt": TURNS[1], "conversation_id": "cut", "temperature": 0, "max_tokens": 4000, "ignore_eos": True}
        with c.stream("POST", "/generate_stream", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # three token events
            assert sum(line.startswith("data:") for line in got) == 3
        server.wait_idle()
        assert server.health()["steps"] - steps_before < 2000  # aborted long before max_tokens
        assert _log_of(server, "cut") == log_before
        again = c.post("/generate", json={"prompt": TURNS[1], "conversation_id": "cut", **GREEDY}).json()
        control = c.post("/generate", json={"prompt": TURNS[1], "conversation_id": "control", **GREEDY}).json()
        assert again["token_ids"] == control["token_ids"]


def test_disconnect_of_a_non_streaming_request_frees_the_slot(server: RunningServer) -> None:
    steps_before = server.health()["steps"]
    body = {"prompt": TURNS[0], "temperature": 0, "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.15) as c:
        c.post("/generate", json=body)
    server.wait_idle()
    assert server.health()["steps"] - steps_before < 2000


def test_concurrent_turn_on_one_conversation_is_409(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"prompt": TURNS[0], "conversation_id": "busy", "temperature": 0, "max_tokens": 4000,
                "ignore_eos": True}
        with c.stream("POST", "/generate_stream", json=body) as r:
            lines = r.iter_lines()  # kept referenced: a dropped iterator closes the connection (an abort)
            next(lines)
            second = c.post("/generate", json={**body, "max_tokens": 4})
            assert second.status_code == 409
            err = second.json()["error"]
            assert err["code"] == "conversation_busy" and err["param"] == "conversation_id"
            assert set(err) == {"message", "type", "param", "code"}
        server.wait_idle()
        after = c.post("/generate", json={**body, "max_tokens": 4})
        assert after.status_code == 200 and after.json()["state_cached"] is False  # the cut turn left nothing


def test_stream_of_a_conversation_reports_it(client: httpx.Client) -> None:
    with client.stream("POST", "/generate_stream", json={"prompt": TURNS[0], "conversation_id": "s1", **GREEDY}) as r:
        events = sse_events(r.iter_lines())
    final = json.loads(events[-2][1])
    assert final["details"]["conversation_id"] == "s1"
    nxt = client.post("/generate", json={"prompt": TURNS[1], "conversation_id": "s1", **GREEDY}).json()
    assert nxt["state_cached"] is True


def _snap(n_tokens: int, state_bytes: int) -> ConversationSnapshot:
    return ConversationSnapshot(list(range(n_tokens)), {"s": torch.zeros(state_bytes // 4)})


def test_lru_store_drops_states_first_then_whole_conversations() -> None:
    store = LRUConversationStore(budget_bytes=3000)
    keys = [ConversationKey("default", f"c{i}") for i in range(3)]
    for k in keys:
        store.commit(k, _snap(10, 800))  # 880 bytes each
    assert store.stats()["states"] == 3
    store.commit(ConversationKey("default", "c3"), _snap(10, 800))  # over budget: LRU state goes
    assert store._entries[keys[0]].state is None and store._entries[keys[1]].state is not None
    assert len(store) == 4 and store.num_bytes <= 3000
    store.commit(ConversationKey("default", "big"), _snap(350, 0))  # 2800 bytes of log
    assert store.num_bytes <= 3000 and store.stats()["evictions"] >= 1
    assert keys[0] not in store  # the least recently used went first


def test_lru_store_lease() -> None:
    store = LRUConversationStore(budget_bytes=10**6)
    key = ConversationKey("t", "x")
    store.acquire(key)
    with pytest.raises(ConversationBusy):
        store.acquire(key)
    assert store.acquire(ConversationKey("other-tenant", "x")) is None  # tenants are separate
    store.release(key)
    store.acquire(key)


def test_slow_client_does_not_block_others(server: RunningServer) -> None:
    """A stream nobody reads must not stall the engine for everyone else."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"prompt": TURNS[0], "temperature": 0, "max_tokens": 64, "ignore_eos": True}
        with c.stream("POST", "/generate_stream", json=body):
            t0 = time.monotonic()
            res = c.post("/generate", json={"prompt": TURNS[1], **GREEDY}).json()
            assert res["num_tokens"] == 8 and time.monotonic() - t0 < 10
    server.wait_idle()
