"""Errors as OpenAI-shaped JSON: one exception type per status, mapped to a response in one place.

Every failure a client can cause is a 4xx `{"error": {"message", "type", "param", "code"}}`; an
unexpected exception is a 500 with a generic message, so internals (reprs, addresses) never leak.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gla.server")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """Base of every error the API returns on purpose."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class BadRequest(APIError):
    code = "invalid_request"


class NotFound(APIError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class ConversationBusy(APIError):
    status_code = 409
    error_type = "conflict_error"
    code = "conversation_busy"


class PayloadTooLarge(APIError):
    status_code = 413
    code = "body_too_large"


class Overloaded(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class Unavailable(APIError):
    status_code = 503
    error_type = "service_unavailable"
    code = "not_ready"


class GenerationFailed(APIError):
    status_code = 500
    error_type = "server_error"
    code = "generation_failed"


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for p in loc:
        if p in ("body", "query", "path"):
            continue
        if isinstance(p, str) and not p.isidentifier():
            break  # a union member's tag (`list[int]`, `constrained-str`), not a field
        parts.append(str(p))
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return BadRequest("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return BadRequest(f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
                          code="invalid_json")
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and first.get("type") in ("model_type", "dict_type", "model_attributes_type", "missing"):
        return BadRequest("the request body must be a JSON object", code="invalid_body")
    param = _loc_to_param(loc)
    msg = first.get("msg", "invalid value")
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return BadRequest(f"{where}{msg}{more}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI, on_error: Callable[[APIError], None] | None = None) -> None:
    """Map every exception to an ErrorResponse, 4xx for the client's faults.

    `on_error` sees every APIError answered (e.g. to count rejections in metrics).
    """

    def respond(exc: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(exc)
        return exc.response()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(str(exc.detail), code=f"http_{exc.status_code}")
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return err.response()

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return respond(BadRequest(f"request body is not valid JSON: {exc.msg}", code="invalid_json"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return GenerationFailed("internal server error", code="internal_error").response()
