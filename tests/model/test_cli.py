"""`gla-serve generate` / `info` as a user runs them (subprocess, bundled model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from model import state_bytes_per_sequence
from model.config import GLAConfig


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_generate_is_deterministic_greedy_and_seeded() -> None:
    greedy = [cli("generate", "HAMLET.\n", "--max-tokens", "24", "--temperature", "0") for _ in range(2)]
    assert all(r.returncode == 0 for r in greedy), greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout and greedy[0].stdout.strip()
    args = ("generate", "HAMLET.\n", "--max-tokens", "24", "--temperature", "1.0", "--seed", "7")
    seeded = [cli(*args) for _ in range(2)]
    assert seeded[0].stdout == seeded[1].stdout and seeded[0].stdout.strip()
    assert "tok/s" in seeded[0].stderr


def test_generate_rejects_bad_arguments() -> None:
    r = cli("generate", "hi", "--max-tokens", "0")
    assert r.returncode == 2 and "--max-tokens" in r.stderr
    r = cli("generate", "hi", "--model", "/nonexistent/dir")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_info_reports_parameters_and_state_bytes(checkpoint_dir: Path) -> None:
    r = cli("info", "--model", str(checkpoint_dir), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    cfg = GLAConfig.from_pretrained(str(checkpoint_dir))
    assert info["state_bytes_per_sequence"] == state_bytes_per_sequence(cfg)
    assert info["parameters"] > 0 and info["config"]["model_type"] == "gla"
