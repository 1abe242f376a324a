"""What one request (one conversation turn) measured; the unit every statistic is computed from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class TurnResult:
    """Times are seconds on the client's monotonic clock; `start_s` is relative to the run start."""

    api: str
    conversation_index: int
    turn_index: int
    start_s: float = 0.0
    ok: bool = False
    error: str | None = None
    status_code: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_token_events: int = 0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    conversation_id: str | None = None
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: the decode speed one user sees."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def error_kind(self) -> str | None:
        """The error with details stripped, to count errors by kind ("http 429", "timeout", ...)."""
        if self.error is None:
            return None
        return self.error.split(":", 1)[0]

    def to_json(self, include_text: bool = False) -> dict[str, Any]:
        record = asdict(self)
        record["tpot_s"] = self.tpot_s
        if not include_text:
            record.pop("text")
        return record
