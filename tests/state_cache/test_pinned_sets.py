"""Ready destination sets for snapshot decodes (`pinned.py`) and the decoder's `buffers`.

Pinning needs CUDA, so the pool here allocates with plain `torch.empty` (its injectable allocator):
everything else is the real thing, refills on a real event loop and its default executor, decodes
through both the fed (MGET) and the in-place (bulk socket) paths, and reads from a real redis-server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable

import pytest
import torch

from server.settings import Settings
from server.state_cache import RedisTier, TieredStateCache
from server.state_cache.factory import build_state_cache
from server.state_cache.keys import prefix_hash
from server.state_cache.pinned import PinnedSets, layout_of
from server.state_cache.snapshot import EncodedSnapshot, SnapshotDecoder, encode_snapshot
from tests.state_cache.helpers import assert_state_equal, fp, make_state

FP = fp("model-a")
HIST = list(range(200, 211))
PH = prefix_hash(HIST)
# fp32 recurrent tensors of 1,020 bytes and bf16 conv tails of 30: alignment gaps between tensors
STATE = make_state(layers=3, heads=3, v=17, k=5)
MIB = 1 << 20


def encoded(state: dict[str, torch.Tensor] = STATE, storage_dtype: torch.dtype | None = None) -> EncodedSnapshot:
    return encode_snapshot(state, num_tokens=len(HIST), prefix_hash=PH, fingerprint=FP, storage_dtype=storage_dtype)


LAYOUT = layout_of(encoded().header)


class Recording:
    """A CPU allocator that remembers what it made (and from which thread), and can be made to fail."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.ptrs: set[int] = set()
        self.threads: set[int] = set()
        self.calls = 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("CUDA error: out of memory (pinned host memory)")
        t = torch.empty(shape, dtype=dtype)
        self.ptrs.add(t.data_ptr())
        return t


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def assert_set_of(layout, got: dict[str, torch.Tensor]) -> None:
    assert [(n, t.dtype, tuple(t.shape)) for n, t in got.items()] == list(layout)
    assert all(t.is_contiguous() for t in got.values())


def decode(e: EncodedSnapshot, *, in_place: bool, **kwargs) -> SnapshotDecoder:
    """A filled decoder: parts fed in odd cuts, or written through `views` and `absorb`ed."""
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, prefix_hash=PH, **kwargs)
    payload = bytes(e.payload)
    n = len(payload)
    cuts = [0, 7, 100, n // 2, n - 3, n]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if in_place:
            pos = a
            for view in dec.views(a, b):
                view[:] = payload[pos : pos + len(view)]
                pos += len(view)
            dec.absorb(a, b, dec.part_checksum(a, b))
        else:
            dec.feed([payload[a:b]])
    return dec


# -- the pool -------------------------------------------------------------------------------------
def test_a_miss_teaches_the_layout_and_the_pool_refills_to_depth_later():
    alloc = Recording()
    pool = PinnedSets(2, alloc, delay_s=0.02)

    async def main():
        loop_thread = threading.get_ident()
        assert pool.take(LAYOUT) is None  # nothing ready yet
        assert alloc.calls == 0 and pool.ready(LAYOUT) == 0  # the miss allocated nothing itself
        await until(lambda: pool.ready(LAYOUT) == 2 and not pool.refilling)
        first = pool.take(LAYOUT)
        second = pool.take(LAYOUT)
        assert pool.ready(LAYOUT) == 0 and pool.take(LAYOUT) is None  # depth 2: drained
        await until(lambda: pool.ready(LAYOUT) == 2)  # refilled again, after the takes
        return loop_thread, first, second

    loop_thread, first, second = asyncio.run(main())
    for got in (first, second):
        assert got is not None
        assert_set_of(LAYOUT, got)
    ptrs = {t.data_ptr() for t in first.values()} | {t.data_ptr() for t in second.values()}
    assert len(ptrs) == 2 * len(LAYOUT)  # two separate sets
    assert loop_thread not in alloc.threads  # allocated in a worker thread, never on the loop
    stats = pool.stats()
    assert stats["pinned_set_hits"] == 2 and stats["pinned_set_misses"] == 2
    assert stats["pinned_sets_allocated"] == 4 and stats["pinned_sets_ready"] == 2


def test_prime_fills_a_layout_before_any_take_and_a_full_pool_allocates_no_more():
    alloc = Recording()
    pool = PinnedSets(3, alloc, delay_s=0.0)

    async def main():
        pool.prime(LAYOUT)
        await until(lambda: pool.ready(LAYOUT) == 3)
        calls = alloc.calls
        pool.prime(LAYOUT)  # already full: nothing scheduled
        await asyncio.sleep(0.05)
        return calls

    calls = asyncio.run(main())
    assert alloc.calls == calls == 3 * len(LAYOUT)
    assert_set_of(LAYOUT, pool.take(LAYOUT))


def test_each_layout_gets_its_own_sets_and_the_least_recently_used_is_forgotten():
    narrow = layout_of(encoded(storage_dtype=torch.bfloat16).header)
    other = (("x", torch.float32, (3,)),)
    pool = PinnedSets(1, Recording(), delay_s=0.0, max_layouts=2)
    pool.prime(LAYOUT)
    pool.prime(narrow)
    assert pool.fill() == 2  # no loop here: filled by hand
    assert_set_of(narrow, pool.take(narrow))
    assert_set_of(LAYOUT, pool.take(LAYOUT))
    pool.prime(other)  # a third layout: the least recently used (narrow) goes
    pool.fill()
    assert pool.ready(narrow) == 0 and pool.ready(LAYOUT) == 1 and pool.ready(other) == 1


def test_an_allocator_that_fails_leaves_the_pool_empty_and_warns_once(caplog):
    alloc = Recording(fail=True)
    pool = PinnedSets(2, alloc, delay_s=0.0)

    async def main():
        with caplog.at_level(logging.WARNING, logger="server.state_cache.pinned"):
            for _ in range(3):
                assert pool.take(LAYOUT) is None
                calls = alloc.calls
                await until(lambda: alloc.calls > calls and not pool.refilling)  # noqa: B023
        alloc.fail = False  # memory came back: the next take's refill fills the pool
        assert pool.take(LAYOUT) is None
        await until(lambda: pool.ready(LAYOUT) == 2)

    asyncio.run(main())
    assert pool.stats()["pinned_set_failures"] == 3
    assert len([r for r in caplog.records if "pinned set" in r.getMessage()]) == 1


def test_a_refill_left_pending_by_a_closed_loop_does_not_block_the_next_loop():
    pool = PinnedSets(1, Recording(), delay_s=60.0)

    async def first():
        assert pool.take(LAYOUT) is None  # its refill would run in a minute: the loop ends first

    async def second():
        pool.delay_s = 0.0
        assert pool.take(LAYOUT) is None
        await until(lambda: pool.ready(LAYOUT) == 1)

    asyncio.run(first())
    asyncio.run(second())


# -- the decoder's buffers ------------------------------------------------------------------------
@pytest.mark.parametrize("in_place", [False, True], ids=["fed", "in_place"])
def test_a_decode_into_ready_buffers_equals_the_state_and_hands_out_those_buffers(in_place):
    pool = PinnedSets(1, Recording())
    pool.prime(LAYOUT)
    pool.fill()
    ready = pool.take(LAYOUT)
    assert ready is not None
    ptrs = {name: t.data_ptr() for name, t in ready.items()}
    snap = decode(encoded(), in_place=in_place, per_tensor=True, buffers=ready).finish()
    assert_state_equal(snap.tensors, STATE)
    assert {name: t.data_ptr() for name, t in snap.tensors.items()} == ptrs
    assert all(snap.tensors[name] is ready[name] for name in ready)


def _mismatched() -> dict[str, dict[str, torch.Tensor]]:
    def good() -> dict[str, torch.Tensor]:
        return {name: torch.empty(shape, dtype=dtype) for name, dtype, shape in LAYOUT}

    name, dtype, shape = LAYOUT[0]
    wrong_shape, wrong_dtype, missing, extra, strided = good(), good(), good(), good(), good()
    wrong_shape[name] = torch.empty((shape[0] + 1, *shape[1:]), dtype=dtype)
    wrong_dtype[name] = torch.empty(shape, dtype=torch.float64)
    del missing[name]
    extra["layers.99.recurrent"] = torch.empty(3)
    strided[name] = torch.empty(tuple(reversed(shape)), dtype=dtype).transpose(0, -1)
    assert tuple(strided[name].shape) == shape and not strided[name].is_contiguous()
    return {"wrong_shape": wrong_shape, "wrong_dtype": wrong_dtype, "missing": missing, "extra": extra,
            "strided": strided}


@pytest.mark.parametrize("case", list(_mismatched()))
@pytest.mark.parametrize("in_place", [False, True], ids=["fed", "in_place"])
def test_buffers_that_do_not_match_the_header_are_ignored(case, in_place):
    buffers = _mismatched()[case]
    snap = decode(encoded(), in_place=in_place, per_tensor=True, buffers=buffers).finish()
    assert_state_equal(snap.tensors, STATE)
    given = {t.data_ptr() for t in buffers.values() if t.numel()}
    assert not given & {t.data_ptr() for t in snap.tensors.values()}  # none of them written to


def test_a_buffer_function_is_asked_only_where_the_decode_allocates_per_tensor():
    asked: list[object] = []

    def ready(header):
        asked.append(header)
        return {name: torch.empty(shape, dtype=dtype) for name, dtype, shape in layout_of(header)}

    # one buffer for the payload (flat CPU decode): not asked
    assert_state_equal(decode(encoded(), in_place=False, buffers=ready).finish().tensors, STATE)
    assert not asked
    # a bf16-stored state widened on decode: not asked (the narrow set would be thrown away)
    narrow = encoded(storage_dtype=torch.bfloat16)
    wide = decode(narrow, in_place=True, per_tensor=True, buffers=ready).finish().tensors
    assert not asked and wide.keys() == STATE.keys()
    # kept narrow (restore_dtype=False, as where the host tier pins): asked with the parsed header
    kept = decode(narrow, in_place=True, per_tensor=True, restore_dtype=False, buffers=ready).finish()
    assert asked == [kept.header] and all(t.dtype != torch.float32 for t in kept.tensors.values())
    # a function with none ready: the decoder allocates
    assert_state_equal(decode(encoded(), in_place=True, per_tensor=True, buffers=lambda h: None).finish().tensors,
                       STATE)


# -- the tiered cache -----------------------------------------------------------------------------
def ns() -> str:
    return f"ps{uuid.uuid4().hex[:8]}:"


@pytest.mark.redis
@pytest.mark.parametrize("bulk", [0, 3], ids=["mget", "bulk3"])
def test_a_redis_read_decodes_into_a_ready_set_once_the_pool_knows_the_layout(redis_proc, bulk):
    other = make_state(layers=3, heads=3, v=17, k=5, seed=1)
    alloc = Recording()
    prefix = ns()

    async def main():
        def tier() -> RedisTier:
            return RedisTier(redis_proc.url, op_timeout_s=5, chunk_bytes=256, bulk_connections=bulk)

        writer = TieredStateCache(FP, host_budget_bytes=MIB, redis=tier(), key_prefix=prefix, pin_memory=False)
        pool = PinnedSets(2, alloc, delay_s=0.01)
        reader = TieredStateCache(FP, host_budget_bytes=MIB, redis=tier(), key_prefix=prefix, pin_memory=False,
                                  pinned_sets=pool)
        try:
            await writer.store("t", HIST, STATE, wait_for_redis=True)
            await writer.store("t", HIST + [7], other, wait_for_redis=True)
            first = await reader.lookup_prefix("t", HIST)  # a miss in the pool: allocated by the decoder
            await until(lambda: pool.ready(LAYOUT) == 2)  # learnt from that read, refilled after it
            second = await reader.lookup_prefix("t", HIST + [7])
            await until(lambda: pool.ready(LAYOUT) == 2)
            return first, second, reader.stats()
        finally:
            await writer.close()
            await reader.close()

    first, second, stats = asyncio.run(main())
    assert first is not None and first.tier == "redis" and second is not None and second.tier == "redis"
    assert_state_equal(first.tensors, STATE)
    assert_state_equal(second.tensors, other)
    assert not {t.data_ptr() for t in first.tensors.values()} & alloc.ptrs
    assert {t.data_ptr() for t in second.tensors.values()} <= alloc.ptrs  # the pool's set, decoded into
    assert stats["pinned_set_misses"] == 1 and stats["pinned_set_hits"] == 1


@pytest.mark.redis
def test_writing_a_state_primes_the_pool_for_its_layout(redis_proc):
    pool = PinnedSets(2, Recording(), delay_s=0.0)

    async def main():
        cache = TieredStateCache(FP, host_budget_bytes=MIB, redis=RedisTier(redis_proc.url, op_timeout_s=5),
                                 key_prefix=ns(), pin_memory=False, pinned_sets=pool)
        try:
            await cache.store("t", HIST, STATE, wait_for_redis=True)
            await until(lambda: pool.ready(LAYOUT) == 2)
        finally:
            await cache.close()

    asyncio.run(main())


@pytest.mark.redis
def test_the_tier_keeps_a_pool_only_where_it_pins_and_reads_redis(redis_proc):
    redis = RedisTier(redis_proc.url)
    assert TieredStateCache(FP, host_budget_bytes=MIB, redis=redis, pin_memory=False).pinned_sets is None
    assert TieredStateCache(FP, host_budget_bytes=MIB, pin_memory=True).pinned_sets is None  # no Redis
    assert TieredStateCache(FP, host_budget_bytes=MIB, redis=redis, pin_memory=True, pinned_sets=0).pinned_sets is None
    pinned = TieredStateCache(FP, host_budget_bytes=MIB, redis=redis, pin_memory=True, pinned_sets=3).pinned_sets
    assert pinned is not None and pinned.depth == 3


@pytest.mark.redis
def test_the_setting_comes_from_the_environment_and_reaches_the_tier(redis_proc, monkeypatch):
    assert Settings().state_cache_pinned_sets == 2
    # the host tier pins where CUDA is present (nothing is pinned here: the pool only allocates later)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("GLA_STATE_CACHE_PINNED_SETS", "3")
    pinned = build_state_cache(Settings(redis_url=redis_proc.url), FP).pinned_sets
    assert pinned is not None and pinned.depth == 3
    monkeypatch.setenv("GLA_STATE_CACHE_PINNED_SETS", "0")
    assert build_state_cache(Settings(redis_url=redis_proc.url), FP).pinned_sets is None


@pytest.mark.gpu
def test_on_cuda_the_pool_refills_with_page_locked_sets_and_a_decode_lands_in_them():
    """The default allocator, on a CUDA host: sets allocated in the refill's worker thread are
    page-locked, and a decode into one hands out those very tensors."""
    pool = PinnedSets(1, delay_s=0.0)

    async def main():
        assert pool.take(LAYOUT) is None
        await until(lambda: pool.ready(LAYOUT) == 1 and not pool.refilling)
        return pool.take(LAYOUT)

    ready = asyncio.run(main())
    assert ready is not None and all(t.is_pinned() for t in ready.values())
    snap = decode(encoded(), in_place=True, per_tensor=True, buffers=ready).finish()
    assert_state_equal(snap.tensors, STATE)
    assert all(snap.tensors[name] is ready[name] and snap.tensors[name].is_pinned() for name in ready)
