"""Every server setting in one typed place: env vars `GLA_<NAME>` and CLI flags `--<name>` share names.

Fields for the state cache (issue 5) and for operations (issue 6) live here too, so those modules
read their configuration from `Settings` instead of the environment. Precedence: CLI flag, then
environment, then the default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
DEFAULT_PUBLIC_PATHS = ["/", "/health", "/ready", "/metrics", "/docs", "/openapi.json", "/static"]


def split_commas(value: str) -> list[str]:
    """The non-empty, stripped entries of a comma-separated setting."""
    return [p.strip() for p in value.split(",") if p.strip()]


class Settings(BaseSettings):
    # hide_input_in_errors: a bad URL setting may carry a password, and errors reach the logs
    model_config = SettingsConfigDict(env_prefix="GLA_", extra="ignore", validate_default=True,
                                      hide_input_in_errors=True)

    # -- model and device
    model: str | None = Field(None, description="local model directory (default: the bundled tiny model)")
    served_model_name: str | None = Field(None, description="model id reported by /v1/models (default: dir name)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    cuda_graphs: bool = Field(True, description="replay decode steps from CUDA graphs (CUDA only)")
    cuda_graph_prefill: bool = Field(
        True, description="also replay prefill from CUDA graphs at power-of-two token buckets (CUDA models "
        "without short conv; others, and batches that fit no bucket, run eagerly)",
    )
    seed: int = Field(0, description="seed of the engine's generator for requests without their own seed")

    # -- HTTP
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="bind port")
    log_level: LogLevel = Field("info", description="log level")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest accepted request body (413 beyond)")
    gc_freeze: bool = Field(
        True,
        description="once the model is loaded and warmed up, move every object to the garbage collector's "
        "permanent generation (gc.freeze): a full collection then scans only what serving created, not the "
        "~400K objects of torch, transformers and the app (a 100-200 ms stop of every thread on a 2-core CPU)",
    )
    gil_switch_interval_ms: float | None = Field(
        0.5, gt=0, le=100,
        description="the process's sys.setswitchinterval while serving, in ms (None: Python's 5 ms): how long the "
        "engine's step thread may wait for the GIL while the event loop runs HTTP code; 0.5 measured 0.4 ms "
        "less time to a resumed turn's first token and no loss at 64 streams on the H200 host",
    )

    # -- scheduling and admission
    max_num_seqs: int = Field(32, ge=1, description="state-pool slots = sequences decoded together")
    max_num_batched_tokens: int = Field(2048, ge=16, description="prefill token budget per engine step")
    max_waiting_requests: int = Field(256, ge=0, description="queued requests beyond the running ones (429 beyond)")
    max_waiting_tokens: int = Field(262_144, ge=0, description="prompt tokens in the queue (429 beyond)")
    max_tokens_cap: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(32_768, ge=1, description="longest prompt (tokens fed in one turn)")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens of /generate when the request omits it")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429 and 503")

    # -- conversation state cache (issue 5 reads the host/redis fields)
    conversation_cache_bytes: int = Field(
        2 * 2**30, ge=0, description="in-process conversation state LRU budget in bytes"
    )
    step_bursts: bool | None = Field(
        None, description="run consecutive engine steps back to back on the worker thread while no request, "
        "abort or prefix snapshot needs the event loop between them (outputs still stream after each step); "
        "None: on CUDA only, where each step's GPU wait frees the GIL for the loop's writes",
    )
    resident_conversations: bool = Field(
        True, description="leave a finished turn's state in its device slot until the slot is needed (device tier)"
    )
    host_cache_bytes: int = Field(8 * 2**30, ge=0, description="host-memory state tier budget in bytes")
    state_cache_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype states are stored in outside the device (bfloat16 halves the bytes)"
    )
    single_flight_wait_s: float = Field(
        30.0, ge=0, description="a request identical to one being prefilled waits up to this long for its "
        "state instead of prefilling it again (0 = off)",
    )
    prefix_snapshot_bytes_per_step: int = Field(
        64 * 2**20, ge=0,
        description="state bytes one engine step may copy out for prefix snapshots (at least one snapshot); "
        "the rest are skipped, so a step with many prompt ends does not stall every stream",
    )
    prefix_snapshot_interval: int = Field(
        8192, ge=0, description="also snapshot long prompts about every N tokens, at prefill chunk ends, "
        "for prefix reuse (0 = off)"
    )
    redis_url: SecretStr | None = Field(None, description="redis:// or rediss:// URL of the shared state tier")
    redis_log_url: SecretStr | None = Field(
        None, description="redis:// or rediss:// URL for token logs and turn leases, the conversations' source of "
        "truth (unset: redis_url). Give them an instance that never evicts (maxmemory-policy noeviction) when "
        "redis_url's may: there every key has a TTL, so a volatile-* policy can evict a log as readily as a state",
    )
    redis_chunk_urls: SecretStr | None = Field(
        None, description="comma-separated redis:// or rediss:// URLs over which the snapshots' payload chunks are "
        "spread, so one resume reads from all of them at once (unset: redis_url holds them; manifests, logs, leases "
        "and the prefix index stay on redis_url). Every replica must list the same URLs in the same order",
    )
    redis_key_prefix: str = Field("gla", description="prefix of every Redis key")
    redis_ttl_s: int = Field(86_400, ge=1, description="Redis entry time to live")
    redis_timeout_s: float = Field(0.5, gt=0, description="timeout of one Redis operation")
    redis_breaker_failures: int = Field(5, ge=1, description="consecutive Redis failures that open the breaker")
    redis_breaker_reset_s: float = Field(10.0, gt=0, description="seconds before an open breaker retries")
    redis_bulk_connections: int = Field(
        16, ge=0, le=64, description="plain sockets that read one snapshot in parallel, split over the chunk shards "
        "(redis_chunk_urls; with 8 shards 16 read as fast as 32 or faster on the H200 host, each socket's replies "
        "received in one syscall); 0 reads with redis-py's MGET"
    )
    redis_read_piece_bytes: int = Field(
        1 << 20, ge=0, description="the bulk reader asks for each snapshot chunk in GETRANGE pieces of at most this "
        "many bytes, so Redis builds small replies (0: one GET per chunk; with 8 chunk shards 2 MiB measured faster)",
    )
    redis_early_read: bool = Field(
        True, description="on a replica that has not seen a conversation, start reading its state from Redis "
        "while its token log is still being decoded and hashed, then check the state against the log before use "
        "(H200, 32K history, 8 chunk shards: resumed turn 17.2-18.2 ms against 19.3-21.1 without, 3 runs each)",
    )
    redis_device_staging: bool = Field(
        False, description="on CUDA, copy a state read from Redis to the GPU while it arrives, so the step's copy "
        "into the conversation's slot is device to device (experimental: off until measured on a GPU host)",
    )
    state_cache_pinned_sets: int = Field(
        2, ge=0, description="on CUDA with redis_url, sets of page-locked tensors kept ready per state layout for "
        "states read from Redis and refilled in a worker thread after each read, so a read does not allocate them on "
        "the resumed turn's critical path (0.7-1.2 ms for a 48 MiB state on the H200 host); each set holds one "
        "state's bytes of pinned memory (0: off, each read allocates its own)",
    )
    conversation_lease_s: float = Field(600.0, gt=0, description="expiry of a turn's conversation lease")

    # -- operations (issue 6)
    api_keys_file: str | None = Field(None, description="file of API keys: one `KEY TENANT` per line")
    api_keys: SecretStr | None = Field(None, description="comma-separated KEY[:TENANT] pairs (prefer the env var)")
    public_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_PUBLIC_PATHS),
        description="comma-separated paths served without an API key",
    )
    tenant_max_concurrency: int = Field(0, ge=0, description="running+queued requests per tenant (0 = unlimited)")
    tenant_max_tokens_per_minute: int = Field(0, ge=0, description="prompt+generated tokens per tenant (0 = off)")
    metrics_enabled: bool = Field(True, description="serve Prometheus metrics at /metrics")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")

    @field_validator("public_paths", mode="before")
    @classmethod
    def _split_paths(cls, v: object) -> object:
        if isinstance(v, str):
            return split_commas(v)
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v != "auto" and v != "cpu" and not (v == "cuda" or v.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_cap:
            self.default_max_tokens = self.max_tokens_cap
        return self

    @field_validator("redis_chunk_urls")
    @classmethod
    def _check_chunk_urls(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return v
        urls = split_commas(v.get_secret_value())
        bad = [i for i, u in enumerate(urls) if not u.startswith(("redis://", "rediss://", "unix://"))]
        if bad:  # the index, not the URL: it may hold a password
            raise ValueError(f"redis_chunk_urls entry {bad[0]} is not a redis://, rediss:// or unix:// URL")
        if len(set(urls)) != len(urls):
            raise ValueError("redis_chunk_urls lists a URL twice")
        return v

    def redis_chunk_url_list(self) -> list[str]:
        """`redis_chunk_urls` as a list (empty when unset)."""
        return split_commas(self.redis_chunk_urls.get_secret_value()) if self.redis_chunk_urls is not None else []

    @model_validator(mode="after")
    def _chunk_urls_need_redis_url(self) -> Settings:
        if self.redis_chunk_urls is not None and self.redis_url is None:
            raise ValueError("redis_chunk_urls needs redis_url (it holds the manifests, logs and leases)")
        return self

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.resolved_device() == "cpu" else "bfloat16"
