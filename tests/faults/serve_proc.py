"""`gla-serve serve` in a subprocess: the only way to SIGKILL a server and start another on the same Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.server.conftest import free_port

GLA_SERVE = Path(sys.executable).with_name("gla-serve")


class ServeProcess:
    """One `gla-serve serve` on 127.0.0.1:<free port>; its log goes to a temp file shown on failure."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = ["--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                      *flags]
        self.log = tempfile.NamedTemporaryFile(prefix="gla-serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> ServeProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(GLA_SERVE), "serve", *self.flags], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gla-serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gla-serve not ready within {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no shutdown hook runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
