"""OpenAI-compatible `/v1/models`, `/v1/completions` and `/v1/chat/completions` (stream or not)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from server.chat_template import chat_prompt_token_ids, without_bos
from server.engine import AsyncEngine, RequestStream
from server.errors import BadRequest, ErrorResponse, NotFound
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    LogprobEntry,
    ModelCard,
    ModelList,
    OpenAIUsage,
    PromptTokensDetails,
    _OpenAIRequest,
)
from server.sequence import RequestOutput
from server.serving import (
    Completion,
    ServerState,
    bad_request_from,
    collect,
    conversation_key,
    server_state,
    tenant_of,
    until_disconnect,
)
from server.streaming import sse_frame, sse_response

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 429, 503)}


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=server_state(request).model_name)])


def _check_model(state: ServerState, body: _OpenAIRequest) -> None:
    if body.model is not None and body.model != state.model_name:
        raise NotFound(
            f"model {body.model!r} is not served here; GET /v1/models lists {state.model_name!r}",
            param="model", code="model_not_found",
        )


def _usage(c: Completion) -> OpenAIUsage:
    n = len(c.token_ids)
    return OpenAIUsage(
        prompt_tokens=c.num_prompt_tokens,
        completion_tokens=n,
        total_tokens=c.num_prompt_tokens + n,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=c.num_cached_tokens),
    )


async def _submit(
    request: Request,
    body: _OpenAIRequest,
    ids: list[int],
    first_turn_ids: list[int] | None,
    max_tokens: int,
    logprobs: int | None,
    prefix: str,
) -> tuple[AsyncEngine, RequestStream]:
    state = server_state(request)
    engine = state.require_engine()
    try:
        params = body.sampling_params(max_tokens, logprobs)
    except ValueError as exc:
        raise bad_request_from(exc) from None
    key = conversation_key(request, body.conversation_id)
    stream = await engine.add_request(ids, params, key, f"{prefix}-{uuid.uuid4().hex}", first_turn_ids,
                                      tenant=tenant_of(request))
    return engine, stream


def _abort_unless_finished(engine: AsyncEngine, stream: RequestStream):
    return lambda: None if stream.is_finished else engine.abort(stream.request_id)


# ---- completions -----------------------------------------------------------------------------------
def _completion_logprobs(state: ServerState, outs: list[RequestOutput] | Completion, offset: int) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    items = outs if isinstance(outs, list) else [outs]
    pos = offset
    for o in items:
        for i, tok in enumerate(o.token_ids):
            text = state.token_text(tok)
            lp.tokens.append(text)
            lp.token_logprobs.append(o.logprobs[i])
            alts = o.top_logprobs[i] or []
            lp.top_logprobs.append({state.token_text(t): v for t, v in alts})
            lp.text_offset.append(pos)
            pos += len(text)
    return lp


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request):
    state = server_state(request)
    _check_model(state, body)
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    first_turn_ids = None
    if isinstance(prompt, str):
        if body.conversation_id:
            ids = state.tokenize(prompt, False)
            first_turn_ids = state.tokenize(prompt, True)
        else:
            ids = state.tokenize(prompt, True)
    else:
        ids = list(prompt)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    engine, stream = await _submit(request, body, ids, first_turn_ids, max_tokens, body.logprobs, "cmpl")
    rid = stream.request_id
    if not body.stream:
        c = await until_disconnect(request, collect(stream), stream, engine)
        choice = CompletionChoice(text=c.text, finish_reason=c.finish_reason)
        if body.logprobs is not None:
            choice.logprobs = _completion_logprobs(state, c, 0)
        return CompletionResponse(id=rid, model=state.model_name, choices=[choice], usage=_usage(c))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def frames() -> AsyncIterator[str]:
        c = Completion()
        offset = 0
        async for out in stream:
            c.add(out)
            choice = CompletionChoice(text=out.text)
            if body.logprobs is not None:
                choice.logprobs = _completion_logprobs(state, [out], offset)
            offset += len(out.text)
            if out.finished:
                choice.finish_reason = c.finish_reason
            yield sse_frame(CompletionResponse(id=rid, model=state.model_name, choices=[choice]))
        if include_usage:
            yield sse_frame(CompletionResponse(id=rid, model=state.model_name, choices=[], usage=_usage(c)))

    return sse_response(frames(), _abort_unless_finished(engine, stream), stream.ready)


# ---- chat --------------------------------------------------------------------------------------------
def _chat_logprobs(state: ServerState, token_ids: list[int], logprobs: list[float],
                   top: list[list[tuple[int, float]] | None]) -> ChatLogprobs:
    content = []
    for tok, lp, alts in zip(token_ids, logprobs, top, strict=True):
        text = state.token_text(tok)
        entry = LogprobEntry(token=text, logprob=lp, bytes=list(text.encode()))
        for t, v in alts or []:
            s = state.token_text(t)
            entry.top_logprobs.append({"token": s, "logprob": v, "bytes": list(s.encode())})
        content.append(entry)
    return ChatLogprobs(content=content)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    _check_model(state, body)
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise BadRequest(str(exc), param="messages") from None
    ids = chat_prompt_token_ids(state.tokenizer, messages, body.add_generation_prompt)
    first_turn_ids = None
    if body.conversation_id:  # `messages` are this turn's only; the history lives in the server
        first_turn_ids, ids = ids, without_bos(state.tokenizer, ids)
    max_tokens = body.max_completion_tokens or body.max_tokens or state.settings.default_max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    engine, stream = await _submit(request, body, ids, first_turn_ids, max_tokens, logprobs, "chatcmpl")
    rid = stream.request_id
    if not body.stream:
        c = await until_disconnect(request, collect(stream), stream, engine)
        choice = ChatChoice(message=ChatMessageOut(content=c.text), finish_reason=c.finish_reason)
        if body.logprobs:
            choice.logprobs = _chat_logprobs(state, c.token_ids, c.logprobs, c.top_logprobs)
        return ChatCompletionResponse(id=rid, model=state.model_name, choices=[choice], usage=_usage(c))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[ChatStreamChoice], usage: OpenAIUsage | None = None) -> str:
        return sse_frame(ChatCompletionStreamResponse(id=rid, model=state.model_name, choices=choices, usage=usage))

    async def frames() -> AsyncIterator[str]:
        c = Completion()
        yield chunk([ChatStreamChoice(delta=ChatDelta(role="assistant", content=""))])
        async for out in stream:
            c.add(out)
            choice = ChatStreamChoice(delta=ChatDelta(content=out.text))
            if body.logprobs:
                choice.logprobs = _chat_logprobs(state, out.token_ids, out.logprobs, out.top_logprobs)
            if out.finished:
                choice.finish_reason = c.finish_reason
            yield chunk([choice])
        if include_usage:
            yield chunk([], _usage(c))

    return sse_response(frames(), _abort_unless_finished(engine, stream), stream.ready)
