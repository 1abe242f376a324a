"""Synthetic conversations: deterministic per (seed, conversation index), so two runs send the same text.

Words come from a small fixed vocabulary so any tokenizer splits them into a predictable number of
tokens (about one to two per word); a shared prefix makes every first turn start alike, the workload
that exercises a prefix state cache.
"""

from __future__ import annotations

import random

_VOCABULARY = (
    "the a of and to in is it that was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made live where after back "
    "little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need house "
    "picture try us again animal point mother world near build self earth father head stand own page"
).split()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_VOCABULARY) for _ in range(count))


class PromptSource:
    """User messages for each conversation; `prompts` (e.g. lines of a file) replace generated text."""

    def __init__(
        self,
        seed: int,
        prompt_words: int,
        followup_words: int,
        shared_prefix_words: int = 0,
        prompts: tuple[str, ...] = (),
    ) -> None:
        self._seed = seed
        self._prompt_words = prompt_words
        self._followup_words = followup_words
        self._prompts = prompts
        self._prefix = words(random.Random(f"prefix-{seed}"), shared_prefix_words) if shared_prefix_words else ""

    def conversation(self, index: int, turns: int) -> list[str]:
        rng = random.Random(f"conversation-{self._seed}-{index}")
        messages = []
        for turn in range(turns):
            if self._prompts:
                text = rng.choice(self._prompts)
            else:
                text = words(rng, self._prompt_words if turn == 0 else self._followup_words)
            if turn == 0 and self._prefix:
                text = f"{self._prefix} {text}"
            messages.append(text)
        return messages
