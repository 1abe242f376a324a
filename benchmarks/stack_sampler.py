"""A tiny in-process sampling profiler: where the server's threads spend wall time.

py-spy is not on the GPU image, and the server's overheads (event loop, engine thread, store
threads) are Python-level, so sampling `sys._current_frames()` every ~0.5 ms is enough to see which
code a slow time-to-first-token waits on. A thread blocked in C without the GIL is sampled at its
blocking call; a C call holding the GIL delays the sample, so long GIL holds show up as gaps
(counted separately).
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
_IDLE = ("selectors.py", "threading.py:wait", "queue.py:get", "thread.py:_worker", "base_events.py:_run_once")


class StackSampler:
    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.leaf: collections.Counter[str] = collections.Counter()
        self.ours: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.gaps_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stack-sampler")

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        names = {}
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(self.interval_s)
            now = time.perf_counter()
            if now - last > 0.005:
                self.gaps_ms.append(1e3 * (now - last))
            last = now
            self.samples += 1
            if len(names) != threading.active_count():
                names = {t.ident: t.name for t in threading.enumerate()}
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                name = names.get(tid, "?")
                leaf = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"
                if any(i in leaf for i in _IDLE):
                    continue
                self.leaf[f"[{name}] {leaf}"] += 1
                f = frame
                while f is not None and (not f.f_code.co_filename.startswith(_ROOT)
                                         or "site-packages" in f.f_code.co_filename):
                    f = f.f_back
                if f is not None:
                    rel = f.f_code.co_filename[len(_ROOT) + 1:]
                    self.ours[f"[{name}] {rel}:{f.f_code.co_name}:{f.f_lineno} <- {leaf}"] += 1

    def report(self, top: int = 25) -> str:
        ms = 1e3 * self.interval_s
        lines = [f"stack samples: {self.samples} at ~{ms:.1f} ms; gaps > 5 ms (GIL held in C?): "
                 f"{len(self.gaps_ms)}, total {sum(self.gaps_ms):.0f} ms"]
        lines.append("busy leaf frames (count ~ x interval):")
        lines += [f"  {n:6d}  {k}" for k, n in self.leaf.most_common(top)]
        lines.append("innermost repo frames:")
        lines += [f"  {n:6d}  {k}" for k, n in self.ours.most_common(top)]
        return "\n".join(lines)
