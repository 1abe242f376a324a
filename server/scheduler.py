"""Scheduler: waiting queue, state-pool slots, and the per-step plan (prefill chunks + decode set).

Each step decodes every running sequence whose prompt is consumed, and prefills waiting prompt
tokens up to `max_num_batched_tokens`, so a long prompt is split across steps and running streams
never wait more than one budget for it. Admission is FIFO; a sequence keeps its slot until it ends.

The device tier of the state cache lives here too: a conversation turn that ends normally may
leave its state parked in its slot. Parked slots count as free; when no truly free slot is left,
admission takes the least recently parked one (its state was committed to the store already).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from server.errors import Overloaded
from server.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class PrefillChunk:
    seq: Sequence
    start: int  # first input token of this chunk
    end: int  # one past the last

    @property
    def is_last(self) -> bool:
        return self.end == self.seq.num_input_tokens


@dataclass(slots=True, frozen=True)
class ParkedState:
    """A finished turn's state left in its slot: it summarises exactly the first `num_tokens` of
    `log_ids`, the conversation's log when it was parked (all but its pending last token)."""

    slot: int
    num_tokens: int
    log_ids: list[int]

    def summarises(self, log: list[int]) -> bool:
        """Is this the state of `log` (all but its pending last token)? The log itself is compared,
        not a hash of it: equal lists of shared ints compare in microseconds, where hashing a
        32K-token log took half a millisecond of a resumed turn's time to first token. Without a
        Redis tier the store hands back the very list this state was committed with, so usually
        not even that: the identity test answers (a resumed turn checks it three times)."""
        return len(log) >= 1 and self.num_tokens == len(log) - 1 and (self.log_ids is log or self.log_ids == log)


@dataclass(slots=True)
class ScheduledBatch:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # got a slot this step: load or zero it

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.end - c.start for c in self.prefill)


class Scheduler:
    """Owns the waiting queue, the running set and slot allocation.

    Args:
        num_slots: state-pool slots available to sequences (0 .. num_slots-1).
        max_num_batched_tokens: prefill tokens per step.
        max_waiting_requests, max_waiting_tokens: queue bounds; past them `check_admission` raises
            Overloaded (429).
    """

    def __init__(
        self,
        num_slots: int,
        max_num_batched_tokens: int,
        max_waiting_requests: int,
        max_waiting_tokens: int,
        retry_after_s: int = 1,
    ) -> None:
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting_requests = max_waiting_requests
        self.max_waiting_tokens = max_waiting_tokens
        self.retry_after_s = retry_after_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.parked: OrderedDict[Hashable, ParkedState] = OrderedDict()  # least recently parked first
        self.num_parked_evictions = 0
        self.num_waiting_tokens = 0

    @property
    def num_free_slots(self) -> int:
        """Slots a new sequence can get now: free ones plus parked states it may evict."""
        return len(self.free_slots) + len(self.parked)

    def claim_parked(self, key: Hashable) -> ParkedState | None:
        """Take `key`'s parked state out of the tier (its slot is then the caller's to use or free)."""
        return self.parked.pop(key, None)

    def free_slot(self, slot: int) -> None:
        self.free_slots.append(slot)

    def _take_slot(self, seq: Sequence) -> int:
        if seq.reserved_slot is not None:
            return seq.reserved_slot
        if self.free_slots:
            return self.free_slots.pop()
        _, parked = self.parked.popitem(last=False)
        self.num_parked_evictions += 1
        return parked.slot

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def check_admission(self, num_tokens: int, num_pending: int = 0, num_pending_tokens: int = 0) -> None:
        """Raise Overloaded when one more request of `num_tokens` would overflow the queue.

        `num_pending*` count requests accepted but not yet handed to the scheduler.
        """
        # A request that will get a slot at once does not really wait.
        waiting = len(self.waiting) + num_pending - self.num_free_slots
        tokens = self.num_waiting_tokens + num_pending_tokens
        if waiting + 1 > self.max_waiting_requests or (
            waiting >= 0 and tokens + num_tokens > self.max_waiting_tokens
        ):
            raise Overloaded(
                f"server is at capacity ({len(self.running)} running, {len(self.waiting)} waiting); retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.num_waiting_tokens += seq.num_input_tokens

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        while self.waiting and (self.free_slots or self.parked or self.waiting[0].reserved_slot is not None):
            seq = self.waiting.popleft()
            self.num_waiting_tokens -= seq.num_input_tokens
            seq.slot = self._take_slot(seq)
            seq.reserved_slot = None
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.admitted.append(seq)
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq.is_prefill_done:
                batch.decode.append(seq)
            elif budget > 0:
                n = min(seq.num_remaining_prefill, budget)
                batch.prefill.append(PrefillChunk(seq, seq.num_prefilled, seq.num_prefilled + n))
                budget -= n
        return batch

    def finish(self, seq: Sequence, park: tuple[Hashable, ParkedState] | None = None) -> None:
        """Remove a sequence wherever it is and free its slot, or park its state there under a key."""
        seq.status = SequenceStatus.FINISHED
        if seq.slot is not None:
            self.running.remove(seq)
            if park is not None and park[1].slot == seq.slot:
                stale = self.parked.pop(park[0], None)
                if stale is not None:  # cannot happen with one turn at a time; never leak its slot
                    self.free_slots.append(stale.slot)
                self.parked[park[0]] = park[1]
            else:
                self.free_slots.append(seq.slot)
            seq.slot = None
        else:
            try:
                self.waiting.remove(seq)
                self.num_waiting_tokens -= seq.num_input_tokens
            except ValueError:
                pass
            if seq.reserved_slot is not None:
                self.free_slots.append(seq.reserved_slot)
                seq.reserved_slot = None
