"""Progress while a run goes: tqdm when installed and stderr is a terminal, else a plain line on stderr
at most once a second (readable in CI logs, where tqdm's carriage returns are not)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from loadtest.records import TurnResult

MODES = ("auto", "tqdm", "plain", "none")


class PlainProgress:
    def __init__(self, total: int | None, stream: TextIO = sys.stderr, interval_s: float = 1.0) -> None:
        self._total = total
        self._stream = stream
        self._interval_s = interval_s
        self._start = time.perf_counter()
        self._last_print = -interval_s
        self._done = 0
        self._errors = 0
        self._in_flight = 0

    def __call__(self, result: TurnResult, in_flight: int) -> None:
        self._done += 1
        self._errors += 0 if result.ok else 1
        self._in_flight = in_flight
        now = time.perf_counter() - self._start
        if now - self._last_print >= self._interval_s:
            self._last_print = now
            self._print(now)

    def _print(self, elapsed: float) -> None:
        total = f"/{self._total}" if self._total is not None else ""
        self._stream.write(
            f"[{elapsed:7.1f}s] {self._done}{total} requests done, {self._errors} errors, "
            f"{self._in_flight} in flight\n"
        )
        self._stream.flush()

    def close(self) -> None:
        self._print(time.perf_counter() - self._start)


class TqdmProgress:
    def __init__(self, total: int | None) -> None:
        from tqdm import tqdm

        self._bar: Any = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
        self._errors = 0

    def __call__(self, result: TurnResult, in_flight: int) -> None:
        self._errors += 0 if result.ok else 1
        self._bar.set_postfix(errors=self._errors, in_flight=in_flight, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


class NoProgress:
    def __call__(self, result: TurnResult, in_flight: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, total: int | None) -> PlainProgress | TqdmProgress | NoProgress:
    if mode not in MODES:
        raise ValueError(f"progress must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return NoProgress()
    if mode in ("auto", "tqdm"):
        try:
            import tqdm  # noqa: F401
        except ImportError:
            if mode == "tqdm":
                raise ValueError("--progress tqdm needs the tqdm package (pip install tqdm)") from None
        else:
            if mode == "tqdm" or sys.stderr.isatty():
                return TqdmProgress(total)
    return PlainProgress(total)
