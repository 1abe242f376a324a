"""Settings: env GLA_<NAME> and --<name> flags agree, flags win, and --help lists every setting."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from pydantic import ValidationError

from server.serve import build_parser, parse_settings
from server.settings import Settings


def test_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLA_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("GLA_PUBLIC_PATHS", "/health,/metrics")
    monkeypatch.setenv("GLA_CUDA_GRAPHS", "false")
    s = parse_settings([])
    assert s.max_num_seqs == 5 and s.public_paths == ["/health", "/metrics"] and s.cuda_graphs is False
    s = parse_settings(["--max-num-seqs", "7", "--cuda-graphs", "--redis-url", "redis://:pw@h:6379/0"])
    assert s.max_num_seqs == 7 and s.cuda_graphs is True
    assert s.redis_url is not None and "pw" not in repr(s)  # secrets never show in reprs or logs


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        Settings(max_num_seqs=0)
    with pytest.raises(ValueError):
        Settings(device="tpu")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-num-seqs", "many"])


def test_help_lists_every_setting_with_its_default() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from server.serve import main; main(['--help'])"],
        capture_output=True, text=True, check=False,
    ).stdout
    flat = " ".join(out.split())
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
        assert f"env GLA_{name.upper()}" in flat, name
    assert "(default: 32; env GLA_MAX_NUM_SEQS)" in flat


def test_gil_switch_interval_is_set_while_serving_and_restored() -> None:
    from tests.server.conftest import start_server

    before = sys.getswitchinterval()
    srv = start_server(gil_switch_interval_ms=2.0)
    try:
        assert sys.getswitchinterval() == pytest.approx(0.002)
        assert httpx.post(srv.url + "/generate", json={"prompt": "ROMEO:", "max_tokens": 2}).status_code == 200
    finally:
        srv.stop()
    assert sys.getswitchinterval() == pytest.approx(before)
    with pytest.raises(ValidationError):
        Settings(gil_switch_interval_ms=0)


def test_heap_is_frozen_while_serving_and_unfrozen_after() -> None:
    """gc_freeze (default on): once ready, the start-up heap (torch, transformers, the app) is in the
    collector's permanent generation, so a full collection while serving skips it; stopping undoes it."""
    import gc

    from tests.server.conftest import start_server

    assert Settings.model_fields["gc_freeze"].default is True
    srv = start_server(gc_freeze=True)
    try:
        assert gc.get_freeze_count() > 10_000
        assert httpx.post(srv.url + "/generate", json={"prompt": "ROMEO:", "max_tokens": 2}).status_code == 200
    finally:
        srv.stop()
    assert gc.get_freeze_count() == 0
    srv = start_server(gc_freeze=False)
    try:
        assert gc.get_freeze_count() == 0
    finally:
        srv.stop()
