"""LoadConfig: every knob of a run, checked once so a typo fails before any request is sent."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

APIS = ("generate", "chat")


@dataclass(slots=True)
class LoadConfig:
    """One load-test run.

    Arrivals: with `rate` set, new conversations arrive as a Poisson process of that many per second
    (`inf` sends them all at once); otherwise `concurrency` closed-loop users each run conversations
    back to back. A conversation is `turns` requests in sequence; `num_requests` and `duration_s`
    bound the run (whichever comes first; at least one is required).
    """

    base_url: str = "http://127.0.0.1:8000"
    api: str = "generate"
    model: str | None = None
    rate: float | None = None
    concurrency: int = 8
    max_concurrency: int | None = None
    num_requests: int | None = 100
    duration_s: float | None = None
    turns: int = 1
    think_time_s: float = 0.0
    prompt_words: int = 32
    followup_words: int = 16
    shared_prefix_words: int = 0
    prompts: tuple[str, ...] = ()
    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    extra_body: dict[str, Any] = field(default_factory=dict)
    use_conversation_id: bool = True
    seed: int = 0
    request_timeout_s: float = 120.0
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.rate is not None and not (self.rate > 0):
            raise ValueError(f"rate must be > 0 conversations/s (or inf for a burst), got {self.rate}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give num_requests or duration_s (or both): a load test must be bounded")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not (0 < self.duration_s < math.inf):
            raise ValueError(f"duration_s must be a positive number of seconds, got {self.duration_s}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        for name in ("think_time_s", "shared_prefix_words"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prompt_words", "followup_words", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.request_timeout_s > 0):
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def arrival(self) -> str:
        return "poisson" if self.rate is not None else "closed"

    def to_json(self) -> dict[str, Any]:
        settings = asdict(self)
        settings["arrival"] = self.arrival
        settings["prompts"] = len(self.prompts)
        settings["api_key"] = "<set>" if self.api_key else None
        if self.rate is not None and math.isinf(self.rate):
            settings["rate"] = "inf"
        return settings
