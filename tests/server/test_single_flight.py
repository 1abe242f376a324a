"""Identical concurrent prompts prefill once: the others wait for the first one's state.

Over real HTTP on the bundled model. The leader's 2000-token prompt takes ~125 engine steps at a
16-token budget, so requests sent once it is running arrive while it is still prefilling.
"""

from __future__ import annotations

import threading
import time

import httpx

from tests.server.conftest import start_server

PROMPT = [(7 * i) % 3000 + 5 for i in range(2000)]
BODY = {"prompt_token_ids": PROMPT, "temperature": 0, "max_tokens": 6, "ignore_eos": True}


def test_identical_concurrent_prompts_prefill_once() -> None:
    srv = start_server(max_num_batched_tokens=16)
    results: list[dict] = []
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            leader = threading.Thread(target=lambda: results.append(c.post("/generate", json=BODY).json()))
            leader.start()
            deadline = time.monotonic() + 30
            while srv.health()["running"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            followers = [threading.Thread(target=lambda: results.append(c.post("/generate", json=BODY).json()))
                         for _ in range(3)]
            for t in followers:
                t.start()
            for t in [leader, *followers]:
                t.join()
        assert len(results) == 4
        assert sorted(r["usage"]["cached_tokens"] for r in results) == [0] + [len(PROMPT) - 1] * 3
        assert all(r["token_ids"] == results[0]["token_ids"] for r in results)  # greedy: same reply
        assert srv.health()["prefill_flights_joined"] == 3
    finally:
        srv.stop()


def test_a_request_waiting_on_an_aborted_leader_prefills_itself() -> None:
    srv = start_server(max_num_batched_tokens=16)
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            with c.stream("POST", "/generate_stream", json={**BODY, "max_tokens": 1}):
                deadline = time.monotonic() + 30
                while srv.health()["running"] == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                got: list[dict] = []
                t = threading.Thread(target=lambda: got.append(c.post("/generate", json=BODY).json()))
                t.start()
                time.sleep(0.05)
            # leaving the stream early disconnects the leader mid-prefill: it is aborted
            t.join()
        assert got[0]["usage"]["cached_tokens"] == 0 and len(got[0]["token_ids"]) == 6
        assert srv.health()["prefill_flights_joined"] == 0
    finally:
        srv.stop()
