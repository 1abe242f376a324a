"""Sequence: one request's life in the engine, and RequestOutput: what one step tells its client.

Token bookkeeping of a turn: `input_token_ids` is what the model must consume before sampling
(the conversation's pending token plus this turn's prompt, or the whole log when its state must be
rebuilt, or only what follows the longest cached prefix of that); `num_prefilled` of them are
consumed. After that each sampled token is fed by the next decode step, so the last sampled token
is never consumed: it is the conversation's pending token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from server.conversations import DEFAULT_TENANT, ConversationKey
from server.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # client went away or the request was cancelled
    ERROR = "error"  # the engine failed this step


@dataclass(slots=True)
class RequestOutput:
    """One step's news for one request; the last one has `finished` set."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    text: str = ""  # new text, safe to show (complete characters, no partial stop string)
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    num_prompt_tokens: int = 0  # the whole context: conversation history + this turn's prompt
    num_cached_tokens: int = 0  # the part of it restored from a state instead of prefilled
    num_output_tokens: int = 0
    error: str | None = None


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]  # this turn's new tokens, as the client sent them
    params: SamplingParams
    input_token_ids: list[int]  # tokens to prefill (see module docstring)
    history_token_ids: list[int] = field(default_factory=list)  # the conversation log before this turn
    initial_state: dict[str, Any] | None = None  # snapshot to load into the slot before prefill
    num_restored_tokens: int = 0  # context tokens `initial_state` stands for (not fed again)
    conversation: ConversationKey | None = None
    tenant: str = DEFAULT_TENANT
    eos_token_id: int | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    reserved_slot: int | None = None  # the slot already holding this conversation's state (device tier)
    state_in_slot: bool = False  # in its slot already: resumed from `reserved_slot`, or written at admission
    resident_expected: bool = False  # `load` skipped the state: a parked slot holds it
    flight_key: Any = None  # leads prefilling this context: identical concurrent requests wait for it
    checkpoint_wanted: bool = False  # keep the state before the last input token (for those waiting)
    num_prefilled: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    num_emitted_chars: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    is_aborted: bool = False
    generator: Any = None  # torch.Generator of a seeded request (owned by the sampler's device)
    detokenizer: Any = None
    stop_matcher: Any = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_input_tokens(self) -> int:
        return len(self.input_token_ids)

    @property
    def num_remaining_prefill(self) -> int:
        return len(self.input_token_ids) - self.num_prefilled

    @property
    def is_prefill_done(self) -> bool:
        return self.num_prefilled >= len(self.input_token_ids)

    @property
    def num_cached_tokens(self) -> int:
        """Context tokens this turn did not have to prefill (restored from a snapshot)."""
        return self.num_restored_tokens if self.initial_state is not None or self.state_in_slot else 0

    @property
    def context_token_ids(self) -> list[int]:
        """Every token before the generated ones: the whole conversation plus this prompt."""
        return self.history_token_ids + self.prompt_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_log(self) -> list[int]:
        """The conversation log after this turn: history, prompt, every sampled token."""
        return self.history_token_ids + self.prompt_token_ids + self.output_token_ids
