"""The benchmark scripts the next GPU session runs first, run here on the CPU at toy sizes.

Device time is scarce (30 minutes a session, a cold start takes 1-2 of them), so a script that
fails on an argument or a renamed field must fail here, not there. Each runs as a user would
(`python benchmarks/X.py ...` in a subprocess) against a real redis-server, and its JSON must carry
the fields the write-ups read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.state_cache.redis_proc import redis_server_binary

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.redis,
              pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server binary")]


def run(script: str, *args: str) -> str:
    r = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=280)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


def test_trace_resume_redis_tier_with_every_new_option(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    stdout = run("trace_resume.py", "--tiny", "--device", "cpu", "--history", "32", "--clients", "raw", "--reps", "3",
                 "--think-ms", "0", "--switch-ms", "0.5", "--tier", "redis", "--gil-watchdog",
                 "--redis-fill-gib", "0.01", "--max-num-seqs", "1", "--out", str(out))
    assert "redis command times" in stdout
    result = json.loads(out.read_text())
    (row,) = result["results"]
    for stage in ("asgi_in", "http.dependencies_solved", "route_in", "bulk.read_into_in", "bulk.read_into_out",
                  "step_in", "client_first"):
        assert stage in row["timeline_ms"], stage
    assert len(row["all_stamps_ms"]) == 2 and row["read_detail_ms"]
    assert any(cmd.startswith("GETRANGE") for _, cmd in result["redis_slow"]["slowlog"])


def test_e2e_server_reports_the_servers_own_redis_read_time(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    run("e2e_server.py", "--tiny", "--device", "cpu", "--concurrency", "1", "--max-tokens", "4", "--prompt-tokens",
        "16", "--resume", "32", "--resume-tier", "redis", "--resume-turns", "2", "--client", "raw",
        "--max-num-seqs", "1", "--read-piece-bytes", "0", "--device-staging", "--cold-replica", "--early-read",
        "--out", str(out))
    result = json.loads(out.read_text())
    assert result["redis"]["device_staging"] is True  # accepted (a no-op without CUDA)
    # each of the 2 conversations starts an early read on its first turn (new to this server), and,
    # because the cold replica forgot it, on its resumed turn too (a warm replica would not: 2)
    assert result["cache_counters"]["early_reads"] == 4, result["cache_counters"]
    assert result["cache_counters"]["lookup_hits_redis"] == 2, result["cache_counters"]
    (row,) = result["resume"]
    assert len(row["resumed_ttft_all_ms"]) == 2
    assert all(x is not None and x > 0 for x in row["resumed_redis_get_ms"]), row["resumed_redis_get_ms"]
