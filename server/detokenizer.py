"""Incremental detokenization and stop strings: text deltas that never split a UTF-8 character.

Decoding a token alone loses context (SentencePiece drops a leading space at the start of a decode;
byte-fallback tokens are a fraction of a character), so each step decodes a short window of recent
tokens twice, with and without the new ones, and emits the difference. While the window ends in
U+FFFD (an incomplete byte sequence) nothing is emitted and the window grows until it completes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Context tokens decoded before the first new one, so the first delta gets its leading space.
CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


def backend_decode(tokenizer: Any) -> Callable[..., str] | None:
    """The Rust `tokenizers.Tokenizer.decode` behind a fast HF tokenizer, when calling it directly
    gives the same text: no clean-up of tokenization spaces, which the HF wrapper would apply.

    Why: the wrapper's per-call overhead (argument normalisation, `to_py_obj`) was ~75% of a
    decode, and the detokenizer decodes twice per sequence per step: 1.1 ms of a 64-sequence decode
    step's postprocess on the H200 host was mostly this (`trace_step.py`).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    decode = getattr(backend, "decode", None)
    return decode if callable(decode) else None


class IncrementalDetokenizer:
    """Turns token ids, one step at a time, into text deltas.

    Args:
        tokenizer: a Hugging Face tokenizer.
        context_token_ids: the tokens before the generated ones (the tail is used for spacing).
        skip_special_tokens: drop special tokens (EOS, BOS, ...) from the text.

    Example:
        >>> d = IncrementalDetokenizer(tok, prompt_ids)
        >>> text = "".join(d.step(t) for t in generated) + d.flush()
    """

    def __init__(self, tokenizer: Any, context_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._backend = backend_decode(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """At the end of a request: whatever is still held back, even an incomplete character."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class StopStringMatcher:
    """Finds stop strings in growing text, including ones spanning tokens, and says how much is safe.

    `safe_length` leaves out a tail that could still become a stop string, so a streamed delta
    never shows the beginning of a stop string that is later cut.
    """

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.max_len = max((len(s) for s in self.stop), default=0)

    def find(self, text: str, num_new_chars: int) -> tuple[int, str] | None:
        """Earliest stop string that ends within the last `num_new_chars` characters: (start, string)."""
        if not self.stop:
            return None
        start = max(0, len(text) - num_new_chars - self.max_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def safe_length(self, text: str) -> int:
        """Length of the prefix of `text` that cannot be the start of a stop string."""
        for k in range(min(self.max_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return len(text) - k
        return len(text)
