"""Prefix snapshots are bounded per engine step (a 48 MiB device-to-host copy each for a 1.3B model).

Drives the real engine on the bundled model in-process: requests added back to back without yielding
to the event loop are ingested together, so their prompts all end in the same step.
"""

from __future__ import annotations

import asyncio

import pytest

from model import load_checkpoint, load_tokenizer
from model.loader import bundled_model_path
from server.conversations import LRUConversationStore
from server.engine import AsyncEngine
from server.sampling_params import SamplingParams
from server.settings import Settings

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13], [14, 15, 16]]


async def _run(budget: int) -> tuple[int, int, dict]:
    model = load_checkpoint(bundled_model_path())
    engine = AsyncEngine(model, load_tokenizer(bundled_model_path()),
                         Settings(max_num_seqs=4, prefix_snapshot_bytes_per_step=budget),
                         LRUConversationStore(2**30))
    await engine.start()
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        streams = [await engine.add_request(p, params) for p in PROMPTS]  # no await yields between
        for s in streams:
            async for _ in s:
                pass
        for _ in range(100):  # prefix states are indexed just after the step's tokens are dispatched
            if engine.conversations.stats()["prefix_states"]:
                break
            await asyncio.sleep(0.01)
        return engine.num_steps, engine.num_prefix_snapshots_skipped, engine.conversations.stats()
    finally:
        await engine.stop()


@pytest.mark.parametrize("budget,stored", [(1, 1), (2**30, 3)], ids=["one-per-step", "unbounded"])
def test_prefix_snapshots_per_step_stay_within_the_byte_budget(budget: int, stored: int) -> None:
    steps, skipped, stats = asyncio.run(_run(budget))
    assert steps == 1  # the three prompts were prefilled (and their one token sampled) together
    assert stats["prefix_states"] == stored and skipped == len(PROMPTS) - stored
