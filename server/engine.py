"""AsyncEngine: the one loop that owns the model; requests join and leave between its steps.

Each step is schedule -> run (prefill chunks + decode + sample, one host sync) -> postprocess
(append tokens, detokenize, stop rules, commit finished conversations, free slots). The step runs in
a worker thread so the event loop keeps serving HTTP meanwhile; the scheduler is only touched by
that step and, between steps, by `_ingest` on the loop, so it needs no lock. Only `add_request`
and `abort` cross from request handlers into the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from server.conversations import (
    DEFAULT_TENANT,
    ConversationKey,
    ConversationSnapshot,
    ConversationStore,
    PrefixStore,
)
from server.detokenizer import CONTEXT_TOKENS as DETOKENIZER_CONTEXT
from server.detokenizer import IncrementalDetokenizer, StopStringMatcher
from server.errors import BadRequest, Unavailable
from server.flights import PrefillFlights
from server.model_runner import ModelRunner
from server.sampler import SampleResult
from server.sampling_params import SamplingParams
from server.scheduler import ParkedState, Scheduler
from server.sequence import FinishReason, RequestOutput, Sequence, SequenceStatus
from server.settings import Settings

log = logging.getLogger("gla.engine")


def prefill_buckets(settings: Settings) -> list[int] | None:
    """Token counts to capture prefill graphs at: powers of two from 16 to 512 tokens, then
    quarter-octave steps up to the step's token budget. Padding sequences are empty (`pad_layout`),
    so a bucket needs no room beyond the real tokens.

    Why: a batch replays the smallest bucket it fits, and pure powers of two sent a 2048-token
    prompt to the 4096 graph: twice the work, 28 ms of HTTP time to first token on an H200 where a
    bare prefill took 13.5. Above 512 tokens the prefill costs about linear time, so padding is
    capped near 25%; below, launch overhead dominates, but the rows still cost GEMM work: a resumed
    turn's 17 tokens ran every projection at M=97 when the smallest graph had 64 tokens + 33
    one-token padding sequences.
    """
    if not settings.cuda_graph_prefill:
        return None
    budget = settings.max_num_batched_tokens
    sizes, b = [], 16
    while b < 512 and b < budget:
        sizes.append(b)
        b *= 2
    while b < budget:
        sizes += [s for s in (b, b * 5 // 4, b * 3 // 2, b * 7 // 4) if s < budget]
        b *= 2
    return sizes + [budget]


class EngineObserver(Protocol):
    """Hooks for metrics (issue 6). Called on the engine's worker thread or loop; must be cheap."""

    def on_step(self, seqs: list[Sequence], num_prefill_tokens: int, now: float) -> None: ...

    def on_finish(self, seq: Sequence, now: float) -> None: ...


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished one.

    A deque and one future rather than an `asyncio.Queue`: `ready` lets the SSE writer see that more
    outputs are already here (the event loop fell behind the steps) and send them in one write.
    """

    def __init__(
        self,
        request_id: str,
        seq: Sequence,
        wait_committed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.request_id = request_id
        self.seq = seq
        self._items: deque[RequestOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.is_finished = False
        # A conversation turn is acknowledged only once its commit is durable: a client that saw
        # the final output must find the turn after any crash (issue 7's SIGKILL test).
        self._wait_committed = wait_committed

    def put(self, out: RequestOutput) -> None:
        """On the event loop's thread."""
        self._items.append(out)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def ready(self) -> bool:
        """The iteration goes on without waiting: an output is queued that is not a final one (which
        may wait for its commit), or the final output has been taken and the iteration ends next (so
        the last frames and the closing [DONE] share a write)."""
        return self.is_finished or (bool(self._items) and not self._items[0].finished)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.is_finished:
            while not self._items:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            out = self._items.popleft()
            if out.finished:
                self.is_finished = True
                if self._wait_committed is not None and out.error is None:
                    await self._wait_committed()
            yield out


class AsyncEngine:
    """Continuous-batching engine over one model.

    Args:
        model: a GLAForCausalLM.
        tokenizer: its Hugging Face tokenizer (None: token ids only, empty texts).
        settings: limits and scheduling knobs (max_num_seqs, max_num_batched_tokens, queue bounds, caps).
        conversations: the conversation store (an LRU here; the tiered cache later).

    Example:
        >>> engine = AsyncEngine(model, tok, Settings(), LRUConversationStore(2**30))
        >>> await engine.start()
        >>> async for out in await engine.add_request([1, 2, 3], SamplingParams(max_tokens=8)):
        ...     print(out.text, end="")
    """

    def __init__(self, model: Any, tokenizer: Any, settings: Settings, conversations: ConversationStore) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.conversations = conversations
        # States indexed by token prefix, so clients that resend their history skip re-prefilling it.
        self.prefixes: PrefixStore | None = conversations if isinstance(conversations, PrefixStore) else None
        num_valid = len(tokenizer) if tokenizer is not None else None
        self.runner = ModelRunner(
            model, settings.max_num_seqs, seed=settings.seed, use_cuda_graphs=settings.cuda_graphs,
            num_valid_tokens=num_valid, prefill_graph_buckets=prefill_buckets(settings),
        )
        # pinned snapshot buffers allocated up front, not one cudaHostAlloc per snapshot in serving
        per_slot = max(1, self.runner.pool.bytes_per_slot)
        warm = min(512, settings.host_cache_bytes // per_slot + 8) if self.prefixes is not None else 0
        self.num_pinned_warm = self.runner.pool.warm_pinned_host(warm)
        self.scheduler = Scheduler(
            settings.max_num_seqs,
            settings.max_num_batched_tokens,
            settings.max_waiting_requests,
            settings.max_waiting_tokens,
            settings.retry_after_s,
        )
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None:
            eos = model.config.eos_token_id
            self.eos_token_id = eos[0] if isinstance(eos, list) else eos
        self.special_ids: set[int] = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.observers: list[EngineObserver] = []
        self._streams: dict[str, RequestStream] = {}
        self._incoming: list[Sequence] = []
        self._aborts: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self.num_steps = 0
        self.num_device_hits = 0
        self.num_prefix_snapshots_skipped = 0
        self.phase_seconds = {"schedule": 0.0, "model": 0.0, "snapshot": 0.0, "postprocess": 0.0}
        self._step_snapshot_s = 0.0
        self.flights = PrefillFlights(settings.single_flight_wait_s)
        self._step_snapshot_bytes = 0
        self._prefix_stores: list[tuple[str, Callable[[], list[int]], int]] = []  # (tenant, tokens, slot)
        bursts = settings.step_bursts
        self._bursts = self.runner.device.type == "cuda" if bursts is None else bursts
        self.num_burst_steps = 0  # steps that ran straight after another on the worker thread
        self.num_resident_lost = 0  # resident turns whose slot was evicted before they claimed it
        self.is_stopping = False

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="gla-engine")

    async def stop(self) -> None:
        """Abort everything and stop the loop."""
        self.is_stopping = True
        for rid in list(self._streams):
            self.abort(rid)
        self._wakeup.set()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await asyncio.wait_for(task, timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._incoming)

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # ---- requests -------------------------------------------------------------------------------
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() % 10**9}"

    async def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        conversation: ConversationKey | None = None,
        request_id: str | None = None,
        first_turn_prompt_token_ids: list[int] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> RequestStream:
        """Queue a request; raises BadRequest (400), ConversationBusy (409), Overloaded (429), Unavailable (503).

        Args:
            prompt_token_ids: this turn's new tokens (>= 1, <= max_prompt_tokens).
            params: sampling params (max_tokens <= max_tokens_cap).
            conversation: continue (or start) this conversation; the turn is committed when it ends
                normally, never when it fails or is aborted.
            first_turn_prompt_token_ids: the prompt to use instead when `conversation` does not exist
                yet (the same text tokenized with BOS: only a conversation's first turn gets one).
            tenant: who asks (the API key's tenant); a conversation's own tenant takes precedence.
        """
        if self.is_stopping or not self.is_running:
            raise Unavailable("the engine is not running", headers={"Retry-After": str(self.settings.retry_after_s)})
        self._validate(prompt_token_ids, params)
        if first_turn_prompt_token_ids is not None:
            self._validate(first_turn_prompt_token_ids, params)
        request_id = request_id or self.new_request_id()
        if request_id in self._streams:
            raise BadRequest(f"request id {request_id!r} is already in use", param="request_id")
        if conversation is not None:
            self.conversations.acquire(conversation)
        seq: Sequence | None = None
        try:
            snapshot = (await self.conversations.load(conversation, self._resident_check(conversation))
                        if conversation is not None else None)
            resident = (snapshot is not None and snapshot.state is None
                        and self._parked_holds(conversation, snapshot.token_ids))
            if snapshot is None and first_turn_prompt_token_ids is not None:
                prompt_token_ids = first_turn_prompt_token_ids
            seq = self._new_sequence(request_id, prompt_token_ids, params, conversation, snapshot, resident)
            seq.tenant = conversation.tenant if conversation is not None else tenant
            if resident:  # the slot's state: `_resume_in_slot` claims it; admitted at its real size
                seq.resident_expected = True
            elif seq.initial_state is None:
                await self._restore_prefix(seq)
            if conversation is None and self.runner.supports_checkpoints:
                await self.flights.join_or_lead(seq)
            pending_tokens = sum(s.num_input_tokens for s in self._incoming)
            self.scheduler.check_admission(seq.num_input_tokens, len(self._incoming), pending_tokens)
            if self.is_stopping:
                raise Unavailable("the engine is stopping", headers={"Retry-After": str(self.settings.retry_after_s)})
        except BaseException:
            if conversation is not None:
                self.conversations.release(conversation)
            if seq is not None and seq.flight_key is not None:
                self.flights.land(seq.flight_key, None)
            raise
        waiter = getattr(self.conversations, "wait_committed", None)
        stream = RequestStream(
            request_id, seq, (lambda: waiter(conversation)) if conversation is not None and waiter else None
        )
        self._streams[request_id] = stream
        self._incoming.append(seq)
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request; its slot is freed before the next step and nothing is committed."""
        if request_id not in self._streams:
            return
        self._aborts.add(request_id)
        self._wakeup.set()

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        conversation: ConversationKey | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """add_request, then its outputs; leaving the iteration early (or being cancelled) aborts."""
        stream = await self.add_request(prompt_token_ids, params, conversation, request_id)
        async for out in self.iterate(stream):
            yield out

    async def iterate(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """A stream's outputs; leaving early (or being cancelled) aborts the request."""
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.is_finished:
                self.abort(stream.request_id)

    async def warmup(self) -> None:
        """One real 1-token generate through the whole engine (what /ready waits for)."""
        token = self.eos_token_id if self.eos_token_id is not None else 0
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        async for _ in self.generate([token], params, request_id=self.new_request_id("warmup")):
            pass

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        s = self.settings
        if not prompt_token_ids:
            raise BadRequest("the prompt is empty: send at least one token", param="prompt", code="empty_prompt")
        if len(prompt_token_ids) > s.max_prompt_tokens:
            raise BadRequest(
                f"the prompt has {len(prompt_token_ids)} tokens; the limit is {s.max_prompt_tokens}",
                param="prompt", code="prompt_too_long",
            )
        vocab = self.runner.num_valid_tokens
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt_token_ids")
        if params.max_tokens > s.max_tokens_cap:
            raise BadRequest(
                f"max_tokens {params.max_tokens} exceeds the server's cap of {s.max_tokens_cap}",
                param="max_tokens", code="max_tokens_too_large",
            )

    async def _restore_prefix(self, seq: Sequence) -> None:
        """Start `seq` from the longest cached state of its inputs, keeping >= 1 token to prefill
        (the last one's logits give the first sample). A failing cache is only a miss."""
        if self.prefixes is None or seq.num_input_tokens < 2:
            return
        try:
            hit = await self.prefixes.lookup_prefix(seq.tenant, seq.input_token_ids[:-1])
        except Exception:
            log.exception("prefix lookup failed; prefilling the whole prompt")
            return
        if hit is None or not 0 < hit.num_tokens < seq.num_input_tokens:
            return
        seq.initial_state = hit.state
        seq.num_restored_tokens = hit.num_tokens
        seq.input_token_ids = seq.input_token_ids[hit.num_tokens :]

    def _crosses_checkpoint(self, seq: Sequence, start: int, end: int) -> bool:
        """Whether a prefill chunk [start, end) of `seq`'s inputs passes a multiple of
        `prefix_snapshot_interval` context tokens: a long prompt is then snapshotted at the chunk's
        end (chunk ends, not exact multiples: the token budget decides where a prompt is cut)."""
        every = self.settings.prefix_snapshot_interval
        if not every:
            return False
        base = seq.num_cached_tokens
        return (base + end) // every > (base + start) // every

    def _store_prefix(self, seq: Sequence, token_ids: Callable[[], list[int]]) -> None:
        """Snapshot the slot, which has consumed exactly `token_ids()`, for later prefix reuse (the
        list is built after the step too: a 32K-token context is a 32K-element concatenation).

        A snapshot copies the whole state (48 MiB for a 1.3B model: on CUDA a device copy whose
        host copy happens off the step, see `StatePool.stage`), so a step takes them only up to
        its byte budget; the entries are a pure cache, and a skipped one only costs a longer
        prefill later.
        """
        if self.prefixes is None or seq.slot is None:
            return
        nbytes, taken = self.runner.bytes_per_slot, self._step_snapshot_bytes
        if taken and taken + nbytes > self.settings.prefix_snapshot_bytes_per_step:
            self.num_prefix_snapshots_skipped += 1
            return
        self._step_snapshot_bytes += nbytes
        # the copy and the indexing (hashing the whole context) once this step's tokens are out:
        # `_flush_prefix_stores`, which runs before the next step can touch the slot
        self._prefix_stores.append((seq.tenant, token_ids, seq.slot))

    def _flush_prefix_stores(self) -> None:
        """Copy the step's prefix snapshots out of their slots and hand them to the store, after the
        step's outputs were dispatched and before the next step runs (so the slots still hold
        exactly those states). Why after: staging a 1.3B model's state took ~0.6 ms of host time on
        an H200 host (the engine's `snapshot` phase), and every prompt's end is snapshotted, in the
        step that samples its first token; indexing hashes the whole context (a millisecond at 32K)."""
        stores, self._prefix_stores = self._prefix_stores, []
        if self.prefixes is None or not stores:
            return
        t0 = time.perf_counter()
        for tenant, token_ids, slot in stores:
            try:
                self.prefixes.store_prefix(tenant, token_ids(), self.runner.stage_state(slot))
            except Exception:  # a lost snapshot only costs a longer prefill later
                log.exception("storing a prefix state failed")
        self.phase_seconds["snapshot"] += time.perf_counter() - t0

    def _new_sequence(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        conversation: ConversationKey | None,
        snapshot: ConversationSnapshot | None,
        resident: bool = False,
    ) -> Sequence:
        """A turn's sequence. Its history is the store's log list itself (`load` hands it over), and
        nothing here is O(history) but the len(): a 32K-token log was copied and concatenated three
        times, about 0.3 ms of a resumed turn's admission on the CPU."""
        history = snapshot.token_ids if snapshot is not None else []
        if not isinstance(history, list):
            history = list(history)
        state = snapshot.state if snapshot is not None else None
        # With a state (loaded, or `resident` in its slot), only the pending token and the prompt are
        # new; without, rebuild from the log.
        restored = state is not None or resident
        inputs = ([history[-1]] + prompt) if restored else (history + prompt)
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt),
            params=params,
            input_token_ids=inputs,
            history_token_ids=history,
            initial_state=state,
            num_restored_tokens=max(0, len(history) - 1) if restored else 0,
            conversation=conversation,
            eos_token_id=None if params.ignore_eos else self.eos_token_id,
        )
        if params.seed is not None:
            seq.generator = self.runner.new_generator(params.seed)
        if self.tokenizer is not None:
            # it keeps only the last few context tokens: pass those, not a copy of the whole log
            tail = history[-DETOKENIZER_CONTEXT:] + seq.prompt_token_ids
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, tail, params.skip_special_tokens)
        seq.stop_matcher = StopStringMatcher(params.stop) if params.stop else None
        return seq

    # ---- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            self._ingest()
            if self.is_stopping and not self.scheduler.has_work():
                return
            if not self.scheduler.has_work():
                self._wakeup.clear()
                if self._incoming or self._aborts:
                    continue
                await self._wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self._run_steps, asyncio.get_running_loop())
            except Exception as exc:  # a failed step fails its sequences, never the server
                log.exception("engine step failed")
                self._prefix_stores = []  # states of a failed step are not worth keeping
                outputs = self._fail_running(exc)
            self._dispatch(outputs)
            await asyncio.sleep(0)  # the streams write their tokens first
            self._flush_prefix_stores()

    def _run_steps(self, loop: asyncio.AbstractEventLoop) -> list[RequestOutput]:
        """One step, and further ones back to back while nothing needs the event loop in between.

        Why: handing each step to this worker thread and its outputs back cost ~0.27 ms per step of
        a batch-1 decode on the H200 host (to_thread both ways, the loop's pass), with the GPU idle:
        12% of the step (`benchmarks/trace_step.py`). While no request or abort is waiting to be
        ingested and the step left no prefix snapshot to flush, the next step starts here at once,
        and the outputs go to their streams through `call_soon_threadsafe` (in order: the loop runs
        its callbacks FIFO, and the last step's outputs come back as the return value).
        """
        outputs = self._step()
        while (self._bursts and outputs and not self._prefix_stores and not self._incoming
               and not self._aborts and not self.is_stopping and self.scheduler.has_work()):
            loop.call_soon_threadsafe(self._dispatch, outputs)
            self.num_burst_steps += 1
            outputs = self._step()
        return outputs

    def _ingest(self) -> None:
        for seq in self._incoming:
            if seq.request_id in self._aborts:
                continue
            self._resume_in_slot(seq)
            self.scheduler.add(seq)
        aborted = [s for s in self._incoming if s.request_id in self._aborts]
        self._incoming = []
        for rid in self._aborts:
            stream = self._streams.get(rid)
            if stream is not None and not stream.seq.is_finished:
                aborted.append(stream.seq)
        self._aborts.clear()
        outs = []
        for seq in dict.fromkeys(aborted):
            if seq.is_finished:
                continue
            self.scheduler.finish(seq)
            self._end(seq, FinishReason.ABORT)
            outs.append(self._final_output(seq, ""))
        self._dispatch(outs)

    def _resident_check(self, key: ConversationKey) -> Callable[[list[int]], bool] | None:
        """For `load`: does a slot hold the state of exactly this log (so the store need not fetch it)?

        Only a peek: `_resume_in_slot` claims the slot between steps. Should a step evict it first,
        the turn prefills its log, as for any lost state.
        """
        if not self.settings.resident_conversations:
            return None
        return lambda log: self._parked_holds(key, log)

    def _parked_holds(self, key: ConversationKey | None, log: list[int]) -> bool:
        parked = self.scheduler.parked.get(key) if self.settings.resident_conversations else None
        return parked is not None and parked.summarises(log)

    def _resume_in_slot(self, seq: Sequence) -> None:
        """The device tier: continue a conversation from the state its last turn left in its slot.

        Used only when that state summarises exactly the store's log minus its pending token (the
        log is the truth: a turn taken on another replica meanwhile makes the parked state stale,
        and it is dropped). Whatever the store loaded is then not copied in at all.
        """
        if seq.conversation is None or not self.settings.resident_conversations:
            return
        parked = self.scheduler.claim_parked(seq.conversation)
        history = seq.history_token_ids
        hit = parked is not None and parked.summarises(history)
        self._notify("on_cache_lookup", "device", hit)
        if not hit:
            if parked is not None:
                self.scheduler.free_slot(parked.slot)
            if seq.resident_expected:  # evicted since `load` saw it: rebuild from the log
                self.num_resident_lost += 1
                seq.num_restored_tokens = 0
                seq.input_token_ids = history + seq.prompt_token_ids
            return
        assert parked is not None
        self.num_device_hits += 1
        seq.reserved_slot = parked.slot
        seq.state_in_slot = True
        seq.initial_state = None
        seq.num_restored_tokens = len(history) - 1
        seq.input_token_ids = [history[-1], *seq.prompt_token_ids]

    def _notify(self, hook: str, *args: Any) -> None:
        """Call an optional observer hook (on_cache_lookup, on_cache_evict, on_step_phases)."""
        for obs in self.observers:
            if (fn := getattr(obs, hook, None)) is not None:
                fn(*args)

    def _step(self) -> list[RequestOutput]:
        """One engine step, timed by phase (`phase_seconds`): schedule, model (prefill + decode +
        sampling, ending in the step's one host sync, so it holds the GPU time), snapshot (prefix
        states taken in the step) and postprocess (tokens, text, stop rules, commits)."""
        t0 = time.perf_counter()
        self._step_snapshot_bytes = 0
        self._step_snapshot_s = 0.0
        evicted = self.scheduler.num_parked_evictions
        batch = self.scheduler.schedule()
        if self.scheduler.num_parked_evictions != evicted:
            self._notify("on_cache_evict", "device", self.scheduler.num_parked_evictions - evicted)
        if batch.is_empty:
            return []
        now = time.monotonic()
        for seq in batch.admitted:
            seq.first_scheduled_time = now
        for chunk in batch.prefill:
            key = chunk.seq.flight_key
            chunk.seq.checkpoint_wanted = chunk.is_last and self.flights.has_waiters(key)
        t1 = time.perf_counter()
        seqs, samples = self.runner.run(batch)
        t2 = time.perf_counter()
        self.num_steps += 1
        for chunk in batch.prefill:
            if chunk.is_last and chunk.seq.flight_key is not None:
                self.flights.land(chunk.seq.flight_key, self.runner.checkpoints.get(chunk.seq))
                chunk.seq.flight_key = None
        for chunk in batch.prefill:
            if chunk.is_last:  # the end of a prompt, before any decode: the state of the whole context
                self._store_prefix(chunk.seq, lambda s=chunk.seq: s.context_token_ids)
            elif self._crosses_checkpoint(chunk.seq, chunk.start, chunk.end):
                # a long prompt's checkpoint: the slot has consumed the context up to this chunk's end
                n = chunk.seq.num_cached_tokens + chunk.end
                self._store_prefix(chunk.seq, lambda s=chunk.seq, n=n: s.context_token_ids[:n])
        outputs = self._postprocess(seqs, samples)
        t4 = time.perf_counter()
        phases = {"schedule": t1 - t0, "model": t2 - t1, "snapshot": self._step_snapshot_s,
                  "postprocess": max(t4 - t2 - self._step_snapshot_s, 0.0)}
        for name, sec in phases.items():
            self.phase_seconds[name] += sec
        now = time.monotonic()
        for obs in self.observers:
            obs.on_step(seqs, batch.num_prefill_tokens, now)
        self._notify("on_step_phases", phases)
        return outputs

    def _postprocess(self, seqs: list[Sequence], samples: list[SampleResult]) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for seq, sample in zip(seqs, samples, strict=True):
            if seq.first_token_time is None:
                seq.first_token_time = now
            tok = sample.token_id
            seq.output_token_ids.append(tok)
            p = seq.params
            is_stop_token = tok == seq.eos_token_id or tok in p.stop_token_ids
            num_new_chars = 0
            if not is_stop_token and seq.detokenizer is not None:
                delta = seq.detokenizer.step(tok)
                seq.output_text += delta
                num_new_chars = len(delta)
            if is_stop_token:
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, tok
            elif seq.stop_matcher is not None and num_new_chars:
                hit = seq.stop_matcher.find(seq.output_text, num_new_chars)
                if hit is not None:
                    seq.output_text = seq.output_text[: hit[0]]
                    seq.finish_reason, seq.stop_reason = FinishReason.STOP, hit[1]
            if seq.finish_reason is None and len(seq.output_token_ids) >= p.max_tokens:
                seq.finish_reason = FinishReason.LENGTH
            if seq.finish_reason is not None:
                if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                    seq.output_text += seq.detokenizer.flush()  # a held-back partial character
                park = self._commit(seq)
                self.scheduler.finish(seq, park=park)
                self._end(seq, seq.finish_reason)
                out = self._final_output(seq, self._take_text(seq, final=True))
            else:
                out = self._output(seq, self._take_text(seq, final=False))
            out.token_ids = [tok]
            out.logprobs = [sample.logprob]
            out.top_logprobs = [sample.top_logprobs]
            outputs.append(out)
        return outputs

    def _take_text(self, seq: Sequence, final: bool) -> str:
        safe = len(seq.output_text)
        if not final and seq.stop_matcher is not None:
            safe = seq.stop_matcher.safe_length(seq.output_text)
        text = seq.output_text[seq.num_emitted_chars : safe]
        seq.num_emitted_chars = max(seq.num_emitted_chars, safe)
        return text

    def _commit(self, seq: Sequence) -> tuple[ConversationKey, ParkedState] | None:
        """Commit a finished turn; returns where to park its state when the device tier is on."""
        if seq.conversation is None:
            # The slot has consumed every token but the last sampled one; one output token means
            # the state is still the prompt's, stored already.
            if len(seq.output_token_ids) > 1:
                self._store_prefix(seq, lambda: seq.token_log()[:-1])
            return None
        if seq.slot is None:
            return None
        log_ids = seq.token_log()
        t0 = time.perf_counter()
        snapshot = ConversationSnapshot(log_ids, self.runner.stage_state(seq.slot))
        self.conversations.commit(seq.conversation, snapshot)
        self._step_snapshot_s += time.perf_counter() - t0
        if not self.settings.resident_conversations:
            return None
        return seq.conversation, ParkedState(seq.slot, len(log_ids) - 1, log_ids)

    def _end(self, seq: Sequence, reason: FinishReason) -> None:
        """Bookkeeping common to every way a request ends (the slot is already free)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.flight_key is not None:  # ended before its prompt did: the waiters prefill themselves
            self.flights.land(seq.flight_key, None)
            seq.flight_key = None
        if seq.conversation is not None:
            self.conversations.release(seq.conversation)
        now = time.monotonic()
        for obs in self.observers:
            obs.on_finish(seq, now)

    def _output(self, seq: Sequence, text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            num_prompt_tokens=len(seq.history_token_ids) + len(seq.prompt_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=len(seq.output_token_ids),
        )

    def _final_output(self, seq: Sequence, text: str, error: str | None = None) -> RequestOutput:
        out = self._output(seq, text)
        out.finished = True
        out.finish_reason = seq.finish_reason
        out.stop_reason = seq.stop_reason
        out.error = error
        return out

    def _fail_running(self, exc: Exception) -> list[RequestOutput]:
        outs = []
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
            self._end(seq, FinishReason.ERROR)
            outs.append(self._final_output(seq, "", error=f"generation failed: {type(exc).__name__}"))
        return outs

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "free_slots": self.scheduler.num_free_slots,
            "resident_conversations": len(self.scheduler.parked),
            "device_hits": self.num_device_hits,
            "resident_lost": self.num_resident_lost,
            "device_evictions": self.scheduler.num_parked_evictions,
            "prefix_snapshots_skipped": self.num_prefix_snapshots_skipped,
            "prefill_flights_joined": self.flights.num_joined,
            "step_phase_ms": {k: round(v * 1e3, 3) for k, v in self.phase_seconds.items()},
            "max_num_seqs": self.settings.max_num_seqs,
            "steps": self.num_steps,
            "burst_steps": self.num_burst_steps,
            "state_bytes_per_slot": self.runner.bytes_per_slot,
        }
