"""The device tier: a finished turn's state stays parked in its slot and the next turn resumes there.

Servers run with a store that keeps token logs but no states (`conversation_cache_bytes=1024`), so
a resumed turn can only come from the slot, and every check is against a replay of the whole log.
"""

from __future__ import annotations

import httpx

from server.conversations import ConversationKey, ConversationSnapshot
from tests.server.conftest import RunningServer, start_server
from tests.server.test_conversations import GREEDY, TURNS, _replay_ids, _run_conversation


def _replay(c: httpx.Client, ids: list[int]) -> dict:
    return c.post("/generate", json={"prompt_token_ids": ids, **GREEDY}).json()


def test_resume_from_the_parked_slot_equals_replay() -> None:
    srv = start_server(conversation_cache_bytes=1024)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            turns = _run_conversation(c, "parked")
            assert [t["state_cached"] for t in turns] == [False, True, True]
            assert turns[2]["usage"]["cached_tokens"] == len(_replay_ids(srv, turns, 2)) - len(
                srv.state.tokenizer(TURNS[2], add_special_tokens=False)["input_ids"]) - 1
            h = srv.health()
            assert h["device_hits"] == 2 and h["resident_conversations"] == 1
            for k in (1, 2):
                assert _replay(c, _replay_ids(srv, turns, k))["token_ids"] == turns[k]["token_ids"], k
        assert srv.health()["cache"]["states"] == 0  # the store never held a state: it was the slot
    finally:
        srv.stop()


def test_a_parked_state_gives_way_when_its_slot_is_needed() -> None:
    srv = start_server(conversation_cache_bytes=1024, max_num_seqs=1)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            first = c.post("/generate", json={"prompt": TURNS[0], "conversation_id": "evictee", **GREEDY}).json()
            assert srv.health()["resident_conversations"] == 1
            c.post("/generate", json={"prompt": "Another speaker.", **GREEDY})  # needs the only slot
            h = srv.health()
            assert h["resident_conversations"] == 0 and h["device_evictions"] == 1
            second = c.post("/generate", json={"prompt": TURNS[1], "conversation_id": "evictee", **GREEDY}).json()
            assert second["state_cached"] is False  # rebuilt from the log
            assert _replay(c, _replay_ids(srv, [first, second], 1))["token_ids"] == second["token_ids"]
    finally:
        srv.stop()


def test_a_stale_parked_state_is_never_used(server: RunningServer) -> None:
    """Another replica took a turn meanwhile: the store's log moved on, so the slot's state is stale."""
    key = ConversationKey("default", "moved-on")
    with httpx.Client(base_url=server.url, timeout=60) as c:
        c.post("/generate", json={"prompt": TURNS[0], "conversation_id": "moved-on", **GREEDY}).json()
        hits = server.health()["device_hits"]
        store = server.state.conversations
        log = list(store._entries[key].token_ids)
        extra = server.state.tokenizer(" And then another turn.", add_special_tokens=False)["input_ids"]
        store.commit(key, ConversationSnapshot(log + extra, None))  # what the other replica left
        second = c.post("/generate", json={"prompt": TURNS[1], "conversation_id": "moved-on", **GREEDY}).json()
        assert server.health()["device_hits"] == hits  # (a prefix-cache hit may still serve it)
        new = server.state.tokenizer(TURNS[1], add_special_tokens=False)["input_ids"]
        assert _replay(c, log + extra + new)["token_ids"] == second["token_ids"]


def test_scheduler_parking_never_loses_a_slot() -> None:
    """Slots only move between free, running and parked: park, re-park, claim, give way."""
    from server.sampling_params import SamplingParams
    from server.scheduler import ParkedState, Scheduler
    from server.sequence import Sequence

    sched = Scheduler(num_slots=2, max_num_batched_tokens=64, max_waiting_requests=8, max_waiting_tokens=1024)

    def run_one() -> Sequence:
        seq = Sequence("r", [1, 2], SamplingParams(max_tokens=1), input_token_ids=[1, 2])
        sched.add(seq)
        sched.schedule()
        return seq

    def all_slots() -> list[int]:
        running = [s.slot for s in sched.running if s.slot is not None]
        return sorted(sched.free_slots + running + [p.slot for p in sched.parked.values()])

    a = run_one()
    sched.finish(a, park=("conv", ParkedState(a.slot, 2, [5, 6, 7])))
    b = run_one()
    sched.finish(b, park=("conv", ParkedState(b.slot, 3, [5, 6, 7, 8])))  # a second park of one key
    assert all_slots() == [0, 1] and len(sched.parked) == 1
    c, d = run_one(), run_one()  # the second one takes the parked slot
    assert sched.num_parked_evictions == 1 and all_slots() == [0, 1]
    for s in (c, d):
        sched.finish(s)
    assert sorted(sched.free_slots) == [0, 1]
