"""Request and response bodies of every endpoint (pydantic): bounds live in the types, so bad input
is a 400 before any model work. Unknown fields are ignored, as OpenAI clients send extras freely."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.sampling_params import SamplingParams

ConversationId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]
StopStrings = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _SamplingFields(_Body):
    """Sampling fields shared by every generation endpoint (OpenAI names, vLLM-style extras)."""

    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=2**31 - 1, description="keep the k most likely tokens (0 = off)")
    min_p: float = Field(0.0, ge=0, le=1, description="drop tokens below min_p x the top probability")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="HF-style, over prompt and output")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="reproducible sampling for this request")
    stop: StopStrings = Field(None, description="stop strings, cut from the text")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")
    skip_special_tokens: bool = True
    conversation_id: ConversationId | None = Field(
        None, description="continue this conversation (created on first use); only new tokens are sent"
    )

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


# ---- /generate and /generate_stream ----------------------------------------------------------------
class GenerateRequest(_SamplingFields):
    prompt: str | None = Field(None, min_length=1, description="text prompt (or prompt_token_ids)")
    prompt_token_ids: TokenIds | None = Field(None, description="token ids instead of prompt")
    max_tokens: int | None = Field(None, ge=1, description="default: the server's default_max_tokens (512)")
    temperature: float = Field(0.7, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    logprobs: int | None = Field(None, ge=0, le=20, description="top alternatives per token (0 = sampled only)")
    add_special_tokens: bool | None = Field(
        None, description="add BOS when tokenizing `prompt` (default: only on a conversation's first turn)"
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class GenerateResponse(BaseModel):
    text: str
    num_tokens: int
    latency_ms: float
    tokens_per_second: float
    state_cached: bool
    finish_reason: str | None
    token_ids: list[int]
    conversation_id: str | None = None
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None


class StreamToken(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class StreamDetails(BaseModel):
    finish_reason: str | None
    num_tokens: int
    latency_ms: float
    tokens_per_second: float
    state_cached: bool
    conversation_id: str | None = None
    usage: Usage


class GenerateStreamResponse(BaseModel):
    token: StreamToken | None
    generated_text: str | None = None
    details: StreamDetails | None = None


# ---- OpenAI ------------------------------------------------------------------------------------------
class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAIRequest(_SamplingFields):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = Field(False, description="echo is not supported")
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = Field(None, description="suffix is not supported")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: None = Field(None, description="tools are not supported")
    add_generation_prompt: bool = True


class LogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None
    system_fingerprint: str | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatLogprobs(BaseModel):
    content: list[LogprobEntry] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: OpenAIUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "gla-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
