"""Operations wiring: metrics, API keys and tenant limits, and drain (server/metrics.py, auth.py,
drain.py) attached to the app and the engine from Settings, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response

from server.auth import AuthMiddleware, KeyStore, TenantLimiter, TenantLimits
from server.drain import Drainer, DrainMiddleware
from server.engine import AsyncEngine
from server.errors import APIError
from server.metrics import EngineMetrics, Metrics, StateCacheMetrics
from server.sequence import Sequence
from server.settings import Settings

# Which rejections the metrics count, by the error's code (others are not rejections).
_REJECTION_REASONS = {429: "queue_full", 400: "invalid_request", 413: "invalid_request", 404: "invalid_request"}


class _TenantCharge:
    """Charges each finished request's tokens (prefilled + generated) to its tenant's rate limit."""

    def __init__(self, limiter: TenantLimiter) -> None:
        self.limiter = limiter

    def on_step(self, seqs: list[Sequence], num_prefill_tokens: int, now: float) -> None:
        return None

    def on_finish(self, seq: Sequence, now: float) -> None:
        self.limiter.charge(seq.tenant, seq.num_prefilled + len(seq.output_token_ids))


@dataclass
class Operations:
    metrics: Metrics | None
    keys: KeyStore
    limiter: TenantLimiter | None
    drainer: Drainer

    @classmethod
    def from_settings(cls, settings: Settings) -> Operations:
        inline = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
        keys = KeyStore.load(settings.api_keys_file, inline)
        default = TenantLimits(settings.tenant_max_concurrency, settings.tenant_max_tokens_per_minute)
        has_limits = default != TenantLimits() or bool(keys.tenant_limits)
        return cls(
            metrics=Metrics() if settings.metrics_enabled else None,
            keys=keys,
            limiter=TenantLimiter(default, keys.tenant_limits) if has_limits else None,
            drainer=Drainer(deadline_s=settings.drain_timeout_s),
        )

    def install(self, app: FastAPI, settings: Settings) -> None:
        """The /metrics route and the middlewares; call after the app's own middlewares."""
        on_reject = self.metrics.on_rejected if self.metrics is not None else None
        if self.metrics is not None:
            metrics = self.metrics

            @app.get("/metrics", tags=["service"], include_in_schema=False)
            async def prometheus() -> Response:
                body, content_type = metrics.render()
                return Response(body, media_type=content_type)

        app.add_middleware(
            AuthMiddleware, keys=self.keys, limiter=self.limiter, public_paths=settings.public_paths,
            on_reject=on_reject,
        )
        # outermost: while draining even unauthenticated requests get the 503 that sends them elsewhere
        app.add_middleware(DrainMiddleware, drainer=self.drainer, retry_after_s=settings.retry_after_s,
                           on_reject=on_reject)

    def observe(self, engine: AsyncEngine, conversations: Any) -> None:
        """Engine observers, and the state flush drain waits for."""
        if self.metrics is not None:
            engine.observers.append(EngineMetrics(self.metrics, engine.stats))
            if hasattr(conversations, "on_rebuild") and hasattr(conversations, "cache"):  # the tiered store
                StateCacheMetrics(self.metrics, conversations)
        if self.limiter is not None:
            engine.observers.append(_TenantCharge(self.limiter))
        flush = getattr(conversations, "flush", None)
        if flush is not None:
            self.drainer.add_flush_callback(flush)

    def count_error(self, exc: APIError) -> None:
        reason = _REJECTION_REASONS.get(exc.status_code)
        if self.metrics is not None and reason is not None:
            self.metrics.on_rejected(reason)
