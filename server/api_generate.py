"""`POST /generate` and `POST /generate_stream`: gla-serve's own API, with conversations by id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.engine import AsyncEngine, RequestStream
from server.errors import ErrorResponse
from server.protocol import (
    GenerateRequest,
    GenerateResponse,
    GenerateStreamResponse,
    StreamDetails,
    StreamToken,
    Usage,
)
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

router = APIRouter(tags=["generate"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 409, 413, 429, 503)}


async def _start(request: Request, body: GenerateRequest) -> tuple[ServerState, AsyncEngine, RequestStream]:
    state = server_state(request)
    engine = state.require_engine()
    key = conversation_key(request, body.conversation_id)
    first_turn_ids = None
    if body.prompt_token_ids is not None:
        ids = list(body.prompt_token_ids)
    elif body.add_special_tokens is not None or key is None:
        ids = state.tokenize(body.prompt or "", body.add_special_tokens is not False)
    else:
        # BOS only opens a conversation: a continuing turn's text follows its history directly.
        ids = state.tokenize(body.prompt or "", False)
        first_turn_ids = state.tokenize(body.prompt or "", True)
    max_tokens = body.max_tokens if body.max_tokens is not None else state.settings.default_max_tokens
    try:
        params = body.sampling_params(max_tokens, body.logprobs)
    except ValueError as exc:
        raise bad_request_from(exc) from None
    stream = await engine.add_request(ids, params, key, engine.new_request_id("gen"), first_turn_ids,
                                      tenant=tenant_of(request))
    return state, engine, stream


def _usage(c: Completion) -> Usage:
    n = len(c.token_ids)
    return Usage(
        prompt_tokens=c.num_prompt_tokens,
        completion_tokens=n,
        total_tokens=c.num_prompt_tokens + n,
        cached_tokens=c.num_cached_tokens,
    )


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    """Generate a completion; with `conversation_id`, continue that conversation."""
    state, engine, stream = await _start(request, body)
    c = await until_disconnect(request, collect(stream), stream, engine)
    top = None
    if body.logprobs:
        top = [{state.token_text(t): lp for t, lp in (alts or [])} for alts in c.top_logprobs]
    return GenerateResponse(
        text=c.text,
        token_ids=c.token_ids,
        logprobs=c.logprobs if body.logprobs is not None else None,
        top_logprobs=top,
        **_summary(c, body.conversation_id),
    )


@router.post("/generate_stream", responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """Server-Sent Events: one event per token, then a final one with `generated_text` and `details`."""
    state, engine, stream = await _start(request, body)

    async def frames() -> AsyncIterator[str]:
        c = Completion()
        async for out in stream:
            c.add(out)
            for i, tok in enumerate(out.token_ids):
                # the text of a step belongs to its (single) token
                text = out.text if i == len(out.token_ids) - 1 else ""
                token = StreamToken(id=tok, text=text, logprob=out.logprobs[i], special=state.is_special(tok))
                event = GenerateStreamResponse(token=token)
                if out.finished and i == len(out.token_ids) - 1:
                    event.generated_text = c.text
                    event.details = _details(c, body.conversation_id)
                yield sse_frame(event)
            if out.finished and not out.token_ids:  # aborted before any token
                yield sse_frame(GenerateStreamResponse(token=None, generated_text=c.text,
                                                       details=_details(c, body.conversation_id)))

    return sse_response(frames(), lambda: None if stream.is_finished else engine.abort(stream.request_id),
                        stream.ready)


def _summary(c: Completion, conversation_id: str | None) -> dict[str, Any]:
    """The fields /generate's response and /generate_stream's final `details` share."""
    return {
        "finish_reason": c.finish_reason,
        "num_tokens": len(c.token_ids),
        "latency_ms": round(c.latency_ms, 3),
        "tokens_per_second": round(c.tokens_per_second, 3),
        "state_cached": c.num_cached_tokens > 0,
        "conversation_id": conversation_id,
        "usage": _usage(c),
    }


def _details(c: Completion, conversation_id: str | None) -> StreamDetails:
    return StreamDetails(**_summary(c, conversation_id))
