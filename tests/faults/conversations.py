"""Greedy conversations built from token ids, so the client knows the server's token log exactly.

With `prompt_token_ids` the prompt is used as given (no BOS, no chat template), so a conversation's
log is the concatenation of every turn's prompt ids and sampled ids: a resumed turn must equal a
stateless `/generate` over that log plus the new prompt (the replay).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import httpx

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6}


def prompt_ids(seed: int, n: int = 12) -> list[int]:
    """Ordinary vocabulary ids (4096-token bundled model; ids < 16 hold the special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(16, 4096) for _ in range(n)]


@dataclass
class Conversation:
    """What the client knows was committed: the token log of every turn that returned a reply."""

    conversation_id: str
    log: list[int] = field(default_factory=list)
    turns: int = 0

    def body(self, new_ids: list[int]) -> dict[str, Any]:
        return {"prompt_token_ids": new_ids, "conversation_id": self.conversation_id, **GREEDY}

    def committed(self, new_ids: list[int], reply: dict[str, Any]) -> None:
        self.log += new_ids + list(reply["token_ids"])
        self.turns += 1


def replay(client: httpx.Client, log: list[int], new_ids: list[int]) -> list[int]:
    """The reply a resumed turn must give: the whole history sent once, statelessly."""
    r = client.post("/generate", json={"prompt_token_ids": log + new_ids, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def check_resumes(client: httpx.Client, conv: Conversation, seed: int) -> dict[str, Any]:
    """One more turn of `conv` equals the replay of its committed log (and is then committed)."""
    new = prompt_ids(seed, 5)
    expected = replay(client, conv.log, new)
    r = client.post("/generate", json=conv.body(new))
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["token_ids"] == expected, (conv.conversation_id, conv.turns)
    assert reply["usage"]["prompt_tokens"] == len(conv.log) + len(new)
    conv.committed(new, reply)
    return reply
