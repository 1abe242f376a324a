"""Ready page-locked destination sets for snapshot decodes (`PinnedSets`).

Why: a state read from Redis on a CUDA host is decoded into one pinned tensor per snapshot tensor.
Allocating those (24-48 of them for the 1.3B model) took 0.7-1.2 ms on the H200 host, on the
critical path of a resumed turn (~20 ms): between the manifest's arrival and the first socket
read. The pool allocates the next sets in a worker thread `delay_s` after a read took one (by
then the read is usually over), so the read itself takes a set that already exists.

A set handed out is the snapshot's from then on (the host tier owns it and frees it on eviction,
back into torch's caching host allocator, where the next refill finds it): nothing is returned.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable

import torch

from server.state_cache.snapshot import SnapshotHeader

log = logging.getLogger(__name__)

Layout = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def layout_of(header: SnapshotHeader) -> Layout:
    """The tensors a decode of `header` writes into: names, stored dtypes and shapes."""
    return tuple((t.name, t.dtype, t.shape) for t in header.tensors)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


class PinnedSets:
    """Up to `depth` ready sets of destination tensors per layout, refilled off the critical path.

    Args:
        depth: sets kept ready per layout (back-to-back resumes faster than one refill each beyond
            this fall back to allocating in the decoder, as without the pool).
        allocate: allocate(shape, dtype) -> a contiguous tensor (default: page-locked; the CPU
            tests pass plain `torch.empty`, since pinning needs CUDA).
        delay_s: how long after a take (or a prime) the refill starts, so that it does not compete
            with the read that took the set for the GIL and the allocator.
        max_layouts: layouts remembered (one model writes one or two: stored exactly or in bf16);
            the least recently used beyond this is forgotten with its sets.

    `take` and `prime` schedule the refill on the running event loop, when there is one; the
    refill itself runs in the loop's default executor. Everything else may run on any thread.
    """

    def __init__(
        self,
        depth: int = 2,
        allocate: Allocate = pinned_empty,
        *,
        delay_s: float = 0.05,
        max_layouts: int = 4,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.allocate = allocate
        self.delay_s = delay_s
        self.max_layouts = max_layouts
        self._ready: OrderedDict[Layout, deque[dict[str, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()
        # the loop a refill is scheduled on or running for; None when none is (one at a time)
        self._refill_loop: asyncio.AbstractEventLoop | None = None
        self._warned = False
        self.hits = 0
        self.misses = 0
        self.sets_allocated = 0
        self.failures = 0

    def take(self, layout: Layout) -> dict[str, torch.Tensor] | None:
        """A ready set for `layout` (now the caller's), or None; either way a refill is scheduled
        (a miss teaches the pool the layout)."""
        with self._lock:
            sets = self._learn(layout)
            got = sets.popleft() if sets else None
            if got is None:
                self.misses += 1
            else:
                self.hits += 1
        self._schedule()
        return got

    def prime(self, layout: Layout) -> None:
        """Learns `layout` and schedules a refill if it lacks sets (cheap when it has them all)."""
        with self._lock:
            full = len(self._learn(layout)) >= self.depth
        if not full:
            self._schedule()

    def ready(self, layout: Layout) -> int:
        with self._lock:
            sets = self._ready.get(layout)
            return len(sets) if sets is not None else 0

    @property
    def refilling(self) -> bool:
        """Whether a refill is scheduled or running."""
        with self._lock:
            return self._refill_loop is not None and not self._refill_loop.is_closed()

    def fill(self) -> int:
        """Allocates sets until every known layout has `depth` (or an allocation fails); returns
        how many were made. What the scheduled refill runs; blocking, so not on the loop."""
        return self._fill(refill=False)

    def stats(self) -> dict[str, int]:
        with self._lock:
            ready = sum(len(s) for s in self._ready.values())
        return {"pinned_set_hits": self.hits, "pinned_set_misses": self.misses,
                "pinned_sets_allocated": self.sets_allocated, "pinned_set_failures": self.failures,
                "pinned_sets_ready": ready}

    # -- internals --------------------------------------------------------------------------------
    def _learn(self, layout: Layout) -> deque[dict[str, torch.Tensor]]:
        """The layout's ready sets, remembered as most recently used (the lock is held)."""
        sets = self._ready.get(layout)
        if sets is None:
            sets = self._ready[layout] = deque()
            while len(self._ready) > self.max_layouts:
                self._ready.popitem(last=False)
        else:
            self._ready.move_to_end(layout)
        return sets

    def _wanted(self) -> Layout | None:
        """The most recently used layout short of sets (the lock is held)."""
        for layout, sets in reversed(self._ready.items()):
            if len(sets) < self.depth:
                return layout
        return None

    def _fill(self, refill: bool) -> int:
        made = 0
        while True:
            with self._lock:
                layout = self._wanted()
                if layout is None:
                    if refill:  # under the lock that `take` schedules under: no take goes unserved
                        self._refill_loop = None
                    return made
            new = self._allocate_set(layout)  # outside the lock: takes go on meanwhile
            with self._lock:
                if new is None:  # the pool stays smaller; the next take or prime tries again
                    if refill:
                        self._refill_loop = None
                    return made
                sets = self._ready.get(layout)
                if sets is not None and len(sets) < self.depth:  # else forgotten meanwhile
                    sets.append(new)
                    self.sets_allocated += 1
                    made += 1

    def _allocate_set(self, layout: Layout) -> dict[str, torch.Tensor] | None:
        try:
            return {name: self.allocate(shape, dtype) for name, dtype, shape in layout}
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            with self._lock:
                self.failures += 1
                warn, self._warned = not self._warned, True
            if warn:
                log.warning("could not allocate a ready pinned set for snapshot decodes (%s); "
                            "decodes allocate their own while the pool is short", e)
            return None

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: the next take or prime on one refills
            return
        with self._lock:
            # a refill is pending unless its loop closed before it ran (a test's asyncio.run ended)
            if self._refill_loop is not None and not self._refill_loop.is_closed():
                return
            self._refill_loop = loop
        loop.call_later(self.delay_s, self._start_refill, loop)

    def _start_refill(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.run_in_executor(None, self._refill)
        except RuntimeError:  # the executor is shutting down with the loop
            with self._lock:
                self._refill_loop = None

    def _refill(self) -> None:
        try:
            self._fill(refill=True)
        except BaseException:
            with self._lock:
                self._refill_loop = None
            raise
