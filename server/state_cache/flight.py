"""Single-flight: identical concurrent work runs once and everyone else waits for it.

Two uses: `claim` lets the first of several identical prompts prefill while the others wait and
then read its state from the cache; `do` coalesces identical concurrent fetches (one 48 MiB Redis
read, not one per waiter).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K]):
    def __init__(self) -> None:
        self._claims: dict[K, asyncio.Future[None]] = {}
        self._calls: dict[K, asyncio.Future] = {}
        self.num_waits = 0
        self.num_coalesced = 0

    def in_flight(self, key: K) -> bool:
        return key in self._claims

    @asynccontextmanager
    async def claim(self, key: K) -> AsyncIterator[bool]:
        """Yields True to the first entrant (the leader), which holds the key until its block ends;
        later entrants wait for that and get False. A leader that fails still releases waiters,
        so they must cope with not finding its result (e.g. by doing the work themselves).

        Example:
            >>> async with flights.claim(key) as is_leader:
            ...     hit = None if is_leader else await cache.lookup_prefix(tenant, ids)
        """
        fut = self._claims.get(key)
        if fut is not None:
            self.num_waits += 1
            # shield: a waiter that is cancelled must not cancel the leader's future.
            await asyncio.shield(fut)
            yield False
            return
        fut = asyncio.get_running_loop().create_future()
        self._claims[key] = fut
        try:
            yield True
        finally:
            del self._claims[key]
            fut.set_result(None)

    async def do(self, key: K, fn: Callable[[], Awaitable[V]]) -> V:
        """Runs `fn()` once for all concurrent callers with the same key; all get its result."""
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(fn())
            self._calls[key] = task
            task.add_done_callback(lambda _: self._calls.pop(key, None))
        else:
            self.num_coalesced += 1
        return await asyncio.shield(task)
