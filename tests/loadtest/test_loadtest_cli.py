"""`python -m loadtest` as a user runs it: a subprocess against the fake server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fake_gla_server import Faults

from loadtest.table import main as table_main

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_documents_the_tool() -> None:
    done = _cli("--help")
    assert done.returncode == 0
    for flag in ("--rate", "--concurrency", "--turns", "--api", "--output", "--duration", "--max-error-rate"):
        assert flag in done.stdout


def test_run_writes_table_and_json_report(fake_server, tmp_path: Path, capsys) -> None:
    url, _ = fake_server
    out = tmp_path / "runs" / "report.json"
    done = _cli("--base-url", url, "--api", "chat", "--turns", "2", "--num-requests", "8", "--concurrency", "2",
                "--max-tokens", "4", "--output", str(out), "--save-requests", "--label", "ci", "--progress", "plain")
    assert done.returncode == 0, done.stderr
    assert "TTFT" in done.stdout and "requests ok / failed      8 / 0" in done.stdout
    assert "requests done" in done.stderr  # plain progress lines
    report = json.loads(out.read_text())
    assert report["label"] == "ci" and report["schema_version"] == 1
    assert len(report["commit"] or "") == 40
    assert report["hardware"]["cpu_count"] >= 1
    assert report["settings"]["api"] == "chat" and report["settings"]["model_used"] == "fake-gla"
    summary = report["summary"]
    assert summary["num_ok"] == 8 and summary["num_errors"] == 0
    assert set(summary["ttft_ms"]) >= {"p50", "p90", "p99", "mean"}
    assert summary["cached_token_share"] > 0
    assert len(report["requests"]) == 8 and "text" not in report["requests"][0]

    assert table_main([str(out)]) == 0
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 13
    assert row.startswith("| report | chat (history) | closed, 2 users | 2 | 4 | 8/8 |")


def test_errors_set_the_exit_status(start_fake_server) -> None:
    url, _ = start_fake_server(Faults(http_503_every=2))
    args = ("--base-url", url, "--num-requests", "4", "--concurrency", "1", "--max-tokens", "2", "--progress", "none")
    failed = _cli(*args, "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["summary"]["errors_by_kind"] == {"http 503": 2}
    assert _cli(*args, "--max-error-rate", "0.5").returncode == 0


def test_bad_arguments_exit_2() -> None:
    assert _cli("--rate", "0").returncode == 2
    assert _cli("--extra-body", "[1]").returncode == 2
    done = _cli("--base-url", "localhost:1")
    assert done.returncode == 2 and "http://" in done.stderr
