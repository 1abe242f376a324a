"""The CUDA serving path end to end (gpu marker): the bundled model on the GPU behind real HTTP.

These cover what the CPU suite cannot: staged snapshots (device copies moved to the host on a side
stream), the device tier and graphed prefill, each through a 3-turn conversation whose every turn
must equal a replay of the whole history, and identical concurrent prompts.
"""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from tests.server.conftest import start_server
from tests.server.test_conversations import GREEDY, _replay_ids, _run_conversation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODES = {
    "device-tier": {},  # graphed decode and prefill, states parked in their slots
    "host-copies": {"resident_conversations": False},
    "eager-prefill": {"cuda_graph_prefill": False},
    "no-graphs": {"cuda_graphs": False, "resident_conversations": False},
}


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_cuda_conversation_resume_equals_replay(mode: str) -> None:
    srv = start_server(device="cuda", dtype="float32", **MODES[mode])  # fp32: replay must match exactly
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            turns = _run_conversation(c, f"gpu-{mode}")
            assert [t["state_cached"] for t in turns] == [False, True, True]
            for k in (1, 2):
                body = {"prompt_token_ids": _replay_ids(srv, turns, k), **GREEDY}
                assert c.post("/generate", json=body).json()["token_ids"] == turns[k]["token_ids"], k
            if mode == "device-tier":
                assert srv.health()["device_hits"] == 2
    finally:
        srv.stop()


def test_cuda_identical_concurrent_prompts_share_one_prefill() -> None:
    srv = start_server(device="cuda", dtype="float32", max_num_batched_tokens=16)
    prompt = [(7 * i) % 3000 + 5 for i in range(2000)]
    body = {"prompt_token_ids": prompt, "temperature": 0, "max_tokens": 6, "ignore_eos": True}
    out: list[dict] = []
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            threads = [threading.Thread(target=lambda: out.append(c.post("/generate", json=body).json()))
                       for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert all(r["token_ids"] == out[0]["token_ids"] for r in out)
        joined = srv.health()["prefill_flights_joined"]
        assert sum(r["usage"]["cached_tokens"] == len(prompt) - 1 for r in out) == joined
    finally:
        srv.stop()
