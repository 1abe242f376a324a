"""Single flight for prefill: identical concurrent contexts are prefilled once.

A GLA context is a fixed-size state, so a request whose whole context but its last token equals
that of a request still being prefilled can simply start from the leader's state before its last
token (the prefill kernel returns it as a checkpoint) and prefill one token. Keys are namespaced by
tenant. Best effort: a waiter whose leader ends early, or who waits too long, prefills itself.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from server.sequence import Sequence
from server.state_cache.keys import tokens_to_bytes

FlightKey = tuple[str, bytes]


def token_hash(token_ids: list[int]) -> bytes:
    return hashlib.blake2b(tokens_to_bytes(token_ids), digest_size=16).digest()


class PrefillFlights:
    """Leaders and waiters by (tenant, hash of the context minus its last token).

    `join_or_lead` runs on the event loop; `land` may be called from the engine's step thread.
    """

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.num_joined = 0
        self._leaders: dict[FlightKey, asyncio.Future[dict[str, Any] | None]] = {}
        self._waiters: dict[FlightKey, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def has_waiters(self, key: FlightKey | None) -> bool:
        return key is not None and bool(self._waiters.get(key))

    async def join_or_lead(self, seq: Sequence) -> None:
        """Make `seq` the leader of its context, or wait for the leader's state and start from it."""
        if not self.wait_s or seq.num_input_tokens < 2:
            return
        self._loop = asyncio.get_running_loop()
        ctx = seq.context_token_ids
        key = (seq.tenant, token_hash(ctx[:-1]))
        leader = self._leaders.get(key)
        if leader is None:
            self._leaders[key] = self._loop.create_future()
            seq.flight_key = key
            return
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            state = await asyncio.wait_for(asyncio.shield(leader), timeout=self.wait_s)
        except TimeoutError:
            return
        if state is None:
            return
        self.num_joined += 1
        seq.initial_state = state
        seq.num_restored_tokens = len(ctx) - 1
        seq.input_token_ids = ctx[-1:]

    def land(self, key: FlightKey, state: dict[str, Any] | None) -> None:
        """Hand a leader's state (None: prefill yourselves) to its waiters; from any thread."""

        def land() -> None:
            fut = self._leaders.pop(key, None)
            self._waiters.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(state)

        if self._loop is None:
            land()
        else:
            self._loop.call_soon_threadsafe(land)
