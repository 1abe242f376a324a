"""FastAPI factory: routes, error mapping, body limit, operations (metrics, API keys, drain), and a
lifespan that loads the model in the background so /health answers (and /ready says 503) while a
large checkpoint loads."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from server import api_generate, api_openai
from server.conversations import ConversationStore, LRUConversationStore
from server.engine import AsyncEngine
from server.errors import ErrorResponse, Unavailable, install_error_handlers
from server.middleware import BodySizeLimit
from server.operations import Operations
from server.serving import ClientDisconnected, ServerState, server_state
from server.settings import Settings

log = logging.getLogger("gla.server")
STATIC_DIR = Path(__file__).resolve().parent / "static"
BUNDLED_MODEL_NAME = "gla-tiny"

ModelLoader = Callable[[Settings], tuple[Any, Any]]


def default_model_loader(settings: Settings) -> tuple[Any, Any]:
    """(model, tokenizer) from settings.model, or the bundled tiny model."""
    from model import load_model

    return load_model(settings.model, device=settings.resolved_device(), dtype=settings.resolved_dtype())


def model_name_of(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    return Path(settings.model).resolve().name if settings.model else BUNDLED_MODEL_NAME


def freeze_heap() -> None:
    """Collect once, then exempt everything alive from later collections (`gc.freeze`).

    Why: CPython's full (oldest-generation) collection walks every tracked object, and after start-up
    that is the whole of torch, transformers, the model and the app: ~400K objects, 100-200 ms with
    every thread stopped on a 2-core CPU. Serving promotes enough short-lived objects to trigger one
    now and then, which would stall the engine and every stream at once. Frozen objects are never
    scanned (or freed) again; what serving creates is collected as usual.
    """
    gc.collect()
    gc.freeze()


async def _load(state: ServerState, loader: ModelLoader, ops: Operations) -> None:
    try:
        model, tokenizer = await asyncio.to_thread(loader, state.settings)
        engine = await asyncio.to_thread(AsyncEngine, model, tokenizer, state.settings, state.conversations)
        ops.observe(engine, state.conversations)
        state.tokenizer = tokenizer
        state.engine = engine
        await engine.start()
        await engine.warmup()
        if state.settings.gc_freeze:
            freeze_heap()
        state.is_ready = True
        log.info("model %s ready on %s", state.model_name, engine.runner.device)
    except Exception as exc:
        log.exception("model load failed")
        state.load_error = f"{type(exc).__name__}: {exc}"


def create_app(
    settings: Settings | None = None,
    *,
    model_loader: ModelLoader | None = None,
    conversations: ConversationStore | None = None,
) -> FastAPI:
    """The gla-serve app.

    Args:
        settings: server settings (default: from the environment).
        model_loader: returns (model, tokenizer); default loads settings.model or the bundled model.
        conversations: the conversation store (default: an in-process LRU of conversation_cache_bytes).

    Example:
        >>> uvicorn.run(create_app(Settings(max_num_seqs=8)), port=8000)
    """
    settings = settings or Settings()
    ops = Operations.from_settings(settings)
    state = ServerState(
        settings=settings,
        conversations=conversations or LRUConversationStore(settings.conversation_cache_bytes),
        model_name=model_name_of(settings),
        drainer=ops.drainer,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        switch = sys.getswitchinterval()
        if settings.gil_switch_interval_ms is not None:
            sys.setswitchinterval(settings.gil_switch_interval_ms / 1e3)
        loading = asyncio.create_task(_load(state, model_loader or default_model_loader, ops))
        try:
            yield
        finally:
            sys.setswitchinterval(switch)
            if state.is_ready and settings.gc_freeze:
                gc.unfreeze()  # the process may go on (tests, embedding): its objects are collectable again
            loading.cancel()
            if state.engine is not None:
                await state.engine.stop()

    app = FastAPI(
        title="gla-serve",
        summary="Inference server for Gated Linear Attention language models",
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse}},
    )
    app.state.server = state
    app.state.operations = ops
    install_error_handlers(app, on_error=ops.count_error)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; keeps the log free of tracebacks

    app.include_router(api_generate.router)
    app.include_router(api_openai.router)
    _add_service_routes(app)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes)
    ops.install(app, settings)
    return app


def _add_service_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return JSONResponse({"name": "gla-serve", "docs": "/docs", "health": "/health"})

    @app.get("/health", tags=["service"])
    async def health(request: Request) -> JSONResponse:
        """Liveness and a summary: `status` is loading, ok, draining or error (503)."""
        state = server_state(request)
        cache = state.conversations.stats()
        body: dict[str, Any] = {
            "status": _status(state),
            "ready": state.is_ready,
            "model": state.model_name,
            "cache_size": cache.get("conversations", 0),
            "cache": cache,
        }
        if state.engine is not None:
            body.update(state.engine.stats())
            body["device"] = str(state.engine.runner.device)
        if state.load_error is not None:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=503 if state.load_error else 200)

    @app.get("/ready", tags=["service"], responses={503: {"model": ErrorResponse}})
    async def ready(request: Request) -> JSONResponse:
        """200 once the model is loaded and a real 1-token generate ran; 503 before and while draining."""
        state = server_state(request)
        if not state.is_ready or state.is_draining or state.load_error:
            try:
                state.require_engine()
            except Unavailable as exc:
                return exc.response()
            return Unavailable("not ready").response()
        return JSONResponse({"status": "ready", "model": state.model_name})


def _status(state: ServerState) -> str:
    if state.load_error is not None:
        return "error"
    if state.is_draining:
        return "draining"
    return "ok" if state.is_ready else "loading"
