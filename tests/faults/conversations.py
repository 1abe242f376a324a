"""Greedy conversations built from token ids, so the client knows the server's token log exactly.

With `prompt_token_ids` the prompt is used as given (no BOS, no chat template), so a conversation's
log is the concatenation of every turn's prompt ids and sampled ids: a resumed turn must equal a
stateless `/generate` over that log plus the new prompt (the replay).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
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
    boundaries: list[int] = field(default_factory=lambda: [0])  # log length after each committed turn

    def body(self, new_ids: list[int]) -> dict[str, Any]:
        return {"prompt_token_ids": new_ids, "conversation_id": self.conversation_id, **GREEDY}

    def committed(self, new_ids: list[int], reply: dict[str, Any]) -> None:
        self.log += new_ids + list(reply["token_ids"])
        self.turns += 1
        self.boundaries.append(len(self.log))


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


@dataclass
class LoadedConversation(Conversation):
    """A conversation driven under load: `pending` is the prompt of a turn whose reply never arrived."""

    index: int = 0
    pending: list[int] | None = None
    failures: list[str] = field(default_factory=list)


async def converse(client: httpx.AsyncClient, conv: LoadedConversation, keep_going: Callable[[], bool]) -> None:
    """Turns back to back until told to stop or a turn fails (a failed turn ends the conversation)."""
    while keep_going():
        new = prompt_ids(conv.index * 1000 + conv.turns, 6)
        conv.pending = new
        try:
            r = await client.post("/generate", json=conv.body(new))
        except httpx.HTTPError as exc:
            conv.failures.append(f"{type(exc).__name__}: {exc}")
            return
        if r.status_code != 200:
            conv.failures.append(f"http {r.status_code}: {r.text[:200]}")
            return
        conv.committed(new, r.json())
        conv.pending = None


def resume_after_fault(client: httpx.Client, conv: LoadedConversation, busy_timeout_s: float = 20,
                       lost_turns_ok: bool = False) -> int:
    """The next turn equals the replay of the committed log; returns how many acknowledged turns were lost.

    A turn that was in flight when the fault hit may or may not have committed (the client never saw
    its reply): either history is accepted. With `lost_turns_ok`, the server may also resume from an
    earlier turn boundary (acknowledged turns lost), but never from anything else, and the reply must
    equal the replay of whichever history it used. 409s (the in-flight turn's lease, until it expires)
    are waited out.
    """
    new = prompt_ids(conv.index * 1000 + 999, 5)
    histories = [conv.log]
    if conv.pending is not None:
        histories.append(conv.log + conv.pending + replay(client, conv.log, conv.pending))
    if lost_turns_ok:
        histories += [conv.log[:n] for n in conv.boundaries[:-1]]
    deadline = time.monotonic() + busy_timeout_s
    while True:
        r = client.post("/generate", json=conv.body(new))
        if r.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert r.status_code == 200, r.text
    reply = r.json()
    used = [h for h in histories if len(h) + len(new) == reply["usage"]["prompt_tokens"]]
    assert used, (conv.conversation_id, reply["usage"], [len(h) for h in histories], len(new))
    assert reply["token_ids"] == replay(client, used[0], new), conv.conversation_id
    return sum(1 for n in conv.boundaries if n > len(used[0]))
