"""Optional API keys mapped to tenants, and per-tenant concurrency and token-rate limits.

`AuthMiddleware` is pure ASGI (not Starlette's BaseHTTPMiddleware) so a streaming response counts as
in flight until its last byte is sent. It sets `request.state.tenant` for every request; with no keys
configured every request belongs to the tenant `default`, so tenant namespacing works either way.
Keys are kept only as SHA-256 digests: they cannot leak through logs, reprs or memory dumps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("gla.auth")

DEFAULT_TENANT = "default"
DEFAULT_PUBLIC_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json")


@dataclass(frozen=True)
class TenantLimits:
    """Limits of one tenant; 0 means unlimited (the same convention as the GLA_TENANT_* settings)."""

    max_concurrency: int = 0
    max_tokens_per_minute: int = 0

    def __post_init__(self) -> None:
        if self.max_concurrency < 0 or self.max_tokens_per_minute < 0:
            raise ValueError(f"tenant limits must be >= 0 (0 = unlimited), got {self}")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass
class KeyStore:
    """API keys (as digests) -> tenant, plus optional per-tenant limits from a JSON key file.

    Example:
        keys = KeyStore.load(file="/etc/gla/api-keys", inline="sk-a:acme,sk-b:globex")
        keys.authenticate("sk-a")   # -> "acme"
    """

    _digests: list[tuple[bytes, str]] = field(default_factory=list, repr=False)
    tenant_limits: dict[str, TenantLimits] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @property
    def tenants(self) -> set[str]:
        return {tenant for _, tenant in self._digests}

    def add(self, key: str, tenant: str = DEFAULT_TENANT) -> None:
        key, tenant = key.strip(), tenant.strip()
        if not key or not tenant:
            raise ValueError("an API key entry needs a non-empty key and tenant")
        self._digests.append((_digest(key), tenant))

    def authenticate(self, key: str) -> str | None:
        """The tenant of `key`, or None. Compares against every key, so timing says nothing about which."""
        candidate = _digest(key)
        tenant = None
        for digest, owner in self._digests:
            if hmac.compare_digest(candidate, digest) and tenant is None:
                tenant = owner
        return tenant

    def __repr__(self) -> str:
        return f"KeyStore({len(self._digests)} keys, tenants={sorted(self.tenants)})"

    @classmethod
    def load(cls, file: str | Path | None = None, inline: str | None = None) -> KeyStore:
        """Keys from a file and/or an inline string (e.g. GLA_API_KEYS); both None = auth off.

        File formats: JSON `{"KEY": "TENANT", ...}`, or JSON `{"keys": {"KEY": "TENANT"}, "tenants":
        {"TENANT": {"max_concurrency": 4, "max_tokens_per_minute": 60000}}}`, or text lines `KEY:TENANT`
        or `KEY TENANT` (`#` comments; a bare `KEY` belongs to the tenant `default`).
        Inline: comma-separated `KEY[:TENANT]`, or the same JSON.
        """
        store = cls()
        if file is not None:
            path = Path(file)
            try:
                text = path.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read API key file {path}: {exc.strerror}") from None
            store._parse(text, source=str(path), is_file=True)
        if inline:
            store._parse(inline, source="inline API keys", is_file=False)
        return store

    def _parse(self, text: str, source: str, is_file: bool) -> None:
        if text.lstrip().startswith("{"):
            self._parse_json(text, source)
            return
        entries = [line.split("#", 1)[0] for line in text.splitlines()] if is_file else text.split(",")
        for number, entry in enumerate(entries, start=1):
            entry = entry.strip()
            if not entry:
                continue
            key, sep, tenant = entry.rpartition(":") if ":" in entry else entry.partition(" ")
            if not sep:
                key, tenant = entry, DEFAULT_TENANT
            try:
                self.add(key, tenant)
            except ValueError:
                # Never echo the entry: it holds a key.
                raise ValueError(f"{source}: entry {number} is not KEY:TENANT") from None

    def _parse_json(self, text: str, source: str) -> None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        shape = f'{source}: expected {{"KEY": "TENANT"}} or {{"keys": {{...}}, "tenants": {{...}}}}'
        if not isinstance(data, dict):
            raise ValueError(shape)
        keys, tenants = (data["keys"], data.get("tenants", {})) if "keys" in data else (data, {})
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise ValueError(shape)
        if not isinstance(tenants, dict) or not all(isinstance(v, dict) for v in tenants.values()):
            raise ValueError(f'{source}: "tenants" must map each tenant to its limits')
        for key, tenant in keys.items():
            self.add(key, tenant)
        for tenant, limits in tenants.items():
            try:
                self.tenant_limits[tenant] = TenantLimits(**limits)
            except TypeError as exc:
                raise ValueError(f"{source}: limits of tenant {tenant!r}: {exc}") from None


@dataclass
class _TenantState:
    in_flight: int = 0
    tokens: float = 0.0  # token bucket level; may go negative (debt) after a large charge
    updated_at: float = 0.0


@dataclass(frozen=True)
class Rejection:
    code: str
    message: str
    retry_after_s: int


class TenantLimiter:
    """Per-tenant concurrency (in-flight requests) and a token bucket over prompt+generated tokens.

    Tokens are charged after the fact (`charge`), since a request's size is known only once it runs;
    a tenant whose bucket is empty or in debt is refused until the bucket refills, and Retry-After says
    when that is. The bucket holds one minute of tokens, so a tenant may burst up to its per-minute rate.
    """

    def __init__(self, default: TenantLimits | None = None,
                 overrides: Mapping[str, TenantLimits] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default or TenantLimits()
        self.overrides = dict(overrides or {})
        self._clock = clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}

    def limits(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.default)

    def _state(self, tenant: str, limits: TenantLimits) -> _TenantState:
        now = self._clock()
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _TenantState(tokens=limits.max_tokens_per_minute, updated_at=now)
        elif limits.max_tokens_per_minute:
            rate = limits.max_tokens_per_minute / 60.0
            state.tokens = min(limits.max_tokens_per_minute, state.tokens + (now - state.updated_at) * rate)
            state.updated_at = now
        return state

    def try_acquire(self, tenant: str) -> Rejection | None:
        """Admit one request of `tenant` (then `release` it when done), or say why not."""
        limits = self.limits(tenant)
        with self._lock:
            state = self._state(tenant, limits)
            if limits.max_tokens_per_minute and state.tokens <= 0:
                wait_s = (1.0 - state.tokens) / (limits.max_tokens_per_minute / 60.0)
                return Rejection("token_rate_limit_exceeded",
                                 f"tenant token rate limit of {limits.max_tokens_per_minute} tokens per minute "
                                 "reached", retry_after_s=max(1, math.ceil(wait_s)))
            if limits.max_concurrency and state.in_flight >= limits.max_concurrency:
                return Rejection("concurrency_limit_exceeded",
                                 f"tenant concurrency limit of {limits.max_concurrency} requests reached",
                                 retry_after_s=1)
            state.in_flight += 1
            return None

    def release(self, tenant: str) -> None:
        with self._lock:
            state = self._tenants.get(tenant)
            if state is not None and state.in_flight > 0:
                state.in_flight -= 1

    def charge(self, tenant: str, num_tokens: int) -> None:
        """Count tokens a tenant used (prompt tokens prefilled, tokens generated)."""
        limits = self.limits(tenant)
        if not limits.max_tokens_per_minute:
            return
        with self._lock:
            self._state(tenant, limits).tokens -= num_tokens

    def in_flight(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.in_flight if state else 0


def is_public(path: str, public_paths: Iterable[str]) -> bool:
    """`/docs` also opens `/docs/...`; `/` opens only the root page, not everything under it."""
    for public in public_paths:
        if path == public or (public != "/" and path.startswith(public.rstrip("/") + "/")):
            return True
    return False


async def send_json_error(send: Send, status: int, message: str, error_type: str, code: str,
                          headers: Mapping[str, str] | None = None) -> None:
    """An OpenAI-shaped error body `{"error": {"message", "type", "param", "code"}}`, sent raw over ASGI."""
    body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class AuthMiddleware:
    """Bearer-key authentication and per-tenant limits for every non-public HTTP path.

    Args:
        app: the ASGI app to protect.
        keys: the key store; None or empty = auth off (every request is tenant `default`).
        limiter: per-tenant limits; None = unlimited.
        public_paths: served without a key and outside the limits.
        on_reject: called with a reason (`unauthorized`, `rate_limited`) per refusal, e.g.
            `Metrics.on_rejected`.

    Example:
        app.add_middleware(AuthMiddleware, keys=KeyStore.load(inline="sk-a:acme"),
                           limiter=TenantLimiter(TenantLimits(max_concurrency=4)))
    """

    def __init__(self, app: ASGIApp, keys: KeyStore | None = None, limiter: TenantLimiter | None = None,
                 public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS,
                 on_reject: Callable[[str], Any] | None = None) -> None:
        self.app = app
        self.keys = keys if keys is not None else KeyStore()
        self.limiter = limiter
        self.public_paths = tuple(public_paths)
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        path = scope["path"]
        if is_public(path, self.public_paths):
            state["tenant"] = DEFAULT_TENANT
            await self.app(scope, receive, send)
            return
        tenant = DEFAULT_TENANT
        if self.keys.enabled:
            token = bearer_token(scope)
            tenant = self.keys.authenticate(token) if token else None
            if tenant is None:
                client = scope.get("client") or ("?", 0)
                log.warning("401 %s from %s: %s", path, client[0], "invalid API key" if token else "no API key")
                self._rejected("unauthorized")
                await send_json_error(
                    send, 401, "Incorrect API key provided." if token else "Missing API key: send "
                    "'Authorization: Bearer <key>'.", "authentication_error", "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"})
                return
        state["tenant"] = tenant
        if self.limiter is None:
            await self.app(scope, receive, send)
            return
        rejection = self.limiter.try_acquire(tenant)
        if rejection is not None:
            log.info("429 %s for tenant %s: %s", path, tenant, rejection.code)
            self._rejected("rate_limited")
            await send_json_error(send, 429, rejection.message, "rate_limit_error", rejection.code,
                                  {"Retry-After": str(rejection.retry_after_s)})
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(tenant)

    def _rejected(self, reason: str) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)
