"""The run's report: a table for people and a JSON document that says what was measured where."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from loadtest.runner import LoadRun
from loadtest.stats import Distribution, Summary

SCHEMA_VERSION = 1
_REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def commit_info() -> dict[str, Any]:
    commit = _run(["git", "rev-parse", "HEAD"], _REPO)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], _REPO)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def hardware_info() -> dict[str, Any]:
    """The load client's machine; the server's own view is under `server` (its /health)."""
    gpus = None
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
        gpus = out.splitlines() if out else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": gpus,
    }


def build_report(
    run: LoadRun, summary: Summary, label: str | None = None, include_requests: bool = False
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "gla-serve loadtest",
        "label": label,
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **commit_info(),
        "hardware": hardware_info(),
        "settings": {**run.config.to_json(), "model_used": run.model},
        "server": run.server,
        "summary": summary.to_json(),
    }
    if include_requests:
        report["requests"] = [r.to_json() for r in run.results]
    return report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _dist_row(name: str, d: Distribution | None) -> str:
    if d is None:
        return f"{name:<12}{'-':>10}{'-':>10}{'-':>10}{'-':>10}{'-':>10}"
    return f"{name:<12}" + "".join(f"{v:>10.1f}" for v in (d.mean, d.p50, d.p90, d.p99, d.max))


def format_table(run: LoadRun, summary: Summary) -> str:
    cfg = run.config
    if cfg.arrival == "poisson":
        arrival = f"Poisson {cfg.rate:g} conv/s" + (
            f", max {cfg.max_concurrency} in flight" if cfg.max_concurrency else ""
        )
    else:
        arrival = f"closed loop, {cfg.concurrency} user{'s' if cfg.concurrency != 1 else ''}"
    share = summary.cached_token_share
    cached = "-" if share is None else f"{share:.1%} of {summary.prompt_tokens} prompt tokens"
    resumed = "-"
    if summary.num_resumed_turns_cached is not None:
        resumed = f"{summary.num_resumed_turns_cached}/{summary.num_resumed_turns}"
    errors = ", ".join(f"{k}: {n}" for k, n in summary.errors_by_kind.items()) or "none"
    rows = [
        ("endpoint", "/v1/chat/completions (history resent)" if cfg.api == "chat" else "/generate_stream"),
        ("arrivals", arrival),
        ("turns / conversation", str(cfg.turns)),
        ("max_tokens", str(cfg.max_tokens)),
        ("requests ok / failed", f"{summary.num_ok} / {summary.num_errors}"),
        ("errors", errors),
        ("duration", f"{summary.duration_s:.2f} s"),
        ("requests/s", _fmt(summary.requests_per_s, 2)),
        ("output tokens", str(summary.output_tokens)),
        ("output tokens/s", _fmt(summary.output_tokens_per_s, 1)),
        ("cached-token share", cached),
        ("resumed turns from cache", resumed),
    ]
    width = 62
    lines = [" gla-serve load test ".center(width, "=")]
    lines += [f"{k:<26}{v}" for k, v in rows]
    lines.append("-" * width)
    lines.append(f"{'ms':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    lines += [
        _dist_row("TTFT", summary.ttft_ms),
        _dist_row("TPOT", summary.tpot_ms),
        _dist_row("ITL", summary.itl_ms),
        _dist_row("E2E", summary.e2e_ms),
    ]
    lines.append("=" * width)
    return "\n".join(lines)
