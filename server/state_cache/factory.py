"""Builds the tiered cache from `Settings`: the one place that maps settings to cache knobs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.loader import resolve_model_path
from server.settings import Settings
from server.state_cache.conversation_store import TieredConversationStore
from server.state_cache.keys import model_fingerprint, weights_digest_from_files
from server.state_cache.redis_tier import RedisTier, tune_malloc_for_snapshots
from server.state_cache.tiered import TieredStateCache


def fingerprint_from_model_dir(path: str | Path | None) -> bytes:
    """config.json + every *.safetensors file's bytes (about 1 s per GB, once at start-up)."""
    p = resolve_model_path(path)
    config = json.loads((p / "config.json").read_text())
    return model_fingerprint(config, weights_digest_from_files(p.glob("*.safetensors")))


def _redis_tier(settings: Settings, url: str, bulk_connections: int, chunk_urls: list[str] | None = None) -> RedisTier:
    return RedisTier(
        url,
        ttl_s=settings.redis_ttl_s,
        op_timeout_s=settings.redis_timeout_s,
        failure_threshold=settings.redis_breaker_failures,
        base_backoff_s=settings.redis_breaker_reset_s,
        max_backoff_s=max(30.0, 8 * settings.redis_breaker_reset_s),
        bulk_connections=bulk_connections,
        read_piece_bytes=settings.redis_read_piece_bytes,
        chunk_urls=chunk_urls or (),
    )


def build_state_cache(settings: Settings, fingerprint: bytes) -> TieredStateCache:
    redis = log_redis = None
    if settings.redis_url is not None:
        tune_malloc_for_snapshots()  # Redis reads stop re-faulting their reply memory (redis_tier.py)
        redis = _redis_tier(settings, settings.redis_url.get_secret_value(), settings.redis_bulk_connections,
                            settings.redis_chunk_url_list())
    if settings.redis_log_url is not None:  # logs and leases only: no snapshot reads, no bulk sockets
        log_redis = _redis_tier(settings, settings.redis_log_url.get_secret_value(), 0)
    return TieredStateCache(
        fingerprint,
        host_budget_bytes=settings.host_cache_bytes,
        redis=redis,
        log_redis=log_redis,
        key_prefix=f"{settings.redis_key_prefix}:",
        storage_dtype=torch.bfloat16 if settings.state_cache_dtype == "bfloat16" else None,
        stage_device=_stage_device(settings),
        pinned_sets=settings.state_cache_pinned_sets,
    )


def _stage_device(settings: Settings) -> torch.device | None:
    """Where Redis reads are staged (`redis_device_staging`): the serving CUDA device, else nowhere."""
    if not settings.redis_device_staging or settings.redis_url is None:
        return None
    device = torch.device(settings.resolved_device())
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def build_conversation_store(settings: Settings, fingerprint: bytes | None = None) -> TieredConversationStore:
    """The engine's conversation store: `create_app(settings, conversations=build_conversation_store(settings))`."""
    fp = fingerprint if fingerprint is not None else fingerprint_from_model_dir(settings.model)
    return TieredConversationStore(build_state_cache(settings, fp), lease_ttl_s=settings.conversation_lease_s,
                                   early_read=settings.redis_early_read)
