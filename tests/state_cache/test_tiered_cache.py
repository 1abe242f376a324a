import asyncio
import uuid

import pytest
import redis
import torch

from server.state_cache import RedisTier, TieredStateCache, encode_snapshot, prefix_hash
from server.state_cache.keys import PrefixHasher
from server.state_cache.redis_tier import chunk_key, parse_manifest
from tests.state_cache.helpers import assert_state_equal, fp, make_state

pytestmark = pytest.mark.redis
FP = fp("model-a")


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def new_cache(url: str | None, prefix: str, fingerprint: bytes = FP, **kw) -> TieredStateCache:
    # Generous op timeout: the CI box is shared, and outages here are refused connections anyway.
    tier = RedisTier(url, chunk_bytes=256, op_timeout_s=5, base_backoff_s=0.05, max_backoff_s=0.2,
                     failure_threshold=1) if url else None
    return TieredStateCache(fingerprint, host_budget_bytes=kw.pop("host_budget_bytes", 1 << 20), redis=tier,
                            key_prefix=prefix, pin_memory=False, **kw)


def ns() -> str:
    return f"c{uuid.uuid4().hex[:8]}:"


def test_host_only_longest_prefix_and_conversation_lookup():
    async def main():
        cache = new_cache(None, ns())
        hist = tokens(700)
        for n, seed in ((100, 1), (300, 2), (700, 3)):
            await cache.store("default", hist[:n], make_state(seed=seed), conversation_id="c1")
        hit = await cache.lookup_prefix("default", hist + [7, 8, 9])
        assert hit.num_tokens == 700 and hit.tier == "host"
        assert_state_equal(hit.tensors, make_state(seed=3))
        diverged = hist[:500] + [1] + hist[501:]
        assert (await cache.lookup_prefix("default", diverged)).num_tokens == 300
        assert await cache.lookup_prefix("default", tokens(50, start=5)) is None
        conv = await cache.lookup("default", "c1", hist)
        assert conv.num_tokens == 700 and conv.prefix_hash == prefix_hash(hist)
        # a log that does not extend the committed prefix never gets its state
        assert await cache.lookup("default", "c1", diverged) is None
        s = cache.stats()
        assert s["rejected_prefix_mismatch"] == 1 and s["cached_tokens"] == 700 + 300 + 700
        assert s["lookup_hits_host"] == 3 and s["lookup_misses"] == 2

    asyncio.run(main())


def test_state_written_on_one_replica_is_read_on_another_and_promoted(redis_proc):
    prefix = ns()
    hist = tokens(300)

    async def main():
        a, b = new_cache(redis_proc.url, prefix), new_cache(redis_proc.url, prefix)
        try:
            await a.store("t1", hist, make_state(seed=5), conversation_id="conv")
            await a.flush()
            hit = await b.lookup_prefix("t1", hist + [1, 2])
            assert hit.tier == "redis" and hit.num_tokens == 300
            assert_state_equal(hit.tensors, make_state(seed=5))
            again = await b.lookup_prefix("t1", hist)
            assert again.tier == "host"
            c = new_cache(redis_proc.url, prefix)
            conv = await c.lookup("t1", "conv", hist + [3])
            assert conv.tier == "redis" and conv.num_tokens == 300
            assert (await c.lookup("t1", "conv")).tier == "host"  # promoted, found without the log
            await c.close()
            return a.stats(), b.stats()
        finally:
            await a.close()
            await b.close()

    sa, sb = asyncio.run(main())
    assert sa["redis_writes"] == 1 and sb["lookup_hits_redis"] == 1 and sb["lookup_hits_host"] == 1


def _corrupt_first_chunk(proc, key: str) -> None:
    r = redis.Redis.from_url(proc.url)
    gen = parse_manifest(r.get(key))[0]
    r.setrange(chunk_key(key, gen, 0), 10, b"\x00\xff")


def test_corrupt_blob_is_rejected_counted_and_deleted(redis_proc):
    prefix = ns()
    hist = tokens(40)

    async def main():
        a = new_cache(redis_proc.url, prefix)
        await a.store("t", hist, make_state(), wait_for_redis=True)
        await a.close()
        _corrupt_first_chunk(redis_proc, a.keys.snapshot("t", prefix_hash(hist)))
        b = new_cache(redis_proc.url, prefix)
        assert await b.lookup_prefix("t", hist) is None
        assert not redis.Redis.from_url(redis_proc.url).exists(b.keys.snapshot("t", prefix_hash(hist)))
        await b.close()
        return b.stats()

    stats = asyncio.run(main())
    assert stats["rejected_corrupt"] == 1 and stats["lookup_misses"] == 1


def test_blob_from_another_model_is_rejected_before_its_payload_is_read(redis_proc):
    prefix = ns()
    hist = tokens(40)

    async def main():
        cache = new_cache(redis_proc.url, prefix)
        h = PrefixHasher(hist)
        # a foreign blob planted under this model's own key (e.g. a weights swap without a new tag)
        foreign = encode_snapshot(make_state(), num_tokens=40, prefix_hash=h.prefix_hash(40),
                                  fingerprint=fp("model-b"))
        assert await cache.redis.put_snapshot(cache.keys.snapshot("t", h.prefix_hash(40)), foreign)
        await cache.redis.add_anchor_member(cache.keys.anchor("t", h.anchor_for(40)), 40)
        read_before = cache.redis.bytes_read
        assert await cache.lookup_prefix("t", hist) is None
        assert cache.redis.bytes_read == read_before
        await cache.close()
        return cache.stats()

    assert asyncio.run(main())["rejected_model_mismatch"] == 1


def test_tenant_cannot_read_another_tenants_state_log_or_prefix(redis_proc):
    prefix = ns()
    hist = tokens(64)

    async def main():
        cache = new_cache(redis_proc.url, prefix)
        await cache.store("alice", hist, make_state(), conversation_id="c1", wait_for_redis=True)
        await cache.append_token_log("alice", "c1", hist)
        other = new_cache(redis_proc.url, prefix)  # a fresh replica: nothing local to leak either
        for c in (cache, other):
            assert await c.lookup_prefix("bob", hist) is None
            assert await c.lookup("bob", "c1", hist) is None
            assert await c.get_token_log("bob", "c1") is None
        assert (await other.lookup_prefix("alice", hist)).num_tokens == 64
        assert await other.get_token_log("alice", "c1") == hist
        await cache.close()
        await other.close()

    asyncio.run(main())
    keys = redis.Redis.from_url(redis_proc.url).keys(prefix + "*")
    assert keys and all(b":alice:" in k for k in keys)


def test_lease_is_exclusive_across_replicas(redis_proc):
    prefix = ns()

    async def main():
        a, b = new_cache(redis_proc.url, prefix), new_cache(redis_proc.url, prefix)
        la = await a.acquire_lease("t", "c", ttl_s=5)
        assert la is not None and la.is_distributed
        assert await b.acquire_lease("t", "c") is None
        assert await a.acquire_lease("t", "c") is None  # same replica, second turn
        assert await b.acquire_lease("t", "other") is not None
        await a.release_lease(la)
        lb = await b.acquire_lease("t", "c")
        assert lb is not None
        await b.release_lease(lb)
        await a.close()
        await b.close()
        return a.stats(), b.stats()

    sa, sb = asyncio.run(main())
    assert sa["lease_conflicts"] == 1 and sb["lease_conflicts"] == 1


def test_redis_down_mid_conversation_is_never_an_error_and_the_tier_returns(own_redis):
    prefix = ns()
    hist = tokens(80)

    async def main():
        cache = new_cache(own_redis.url, prefix)
        await cache.store("t", hist[:40], make_state(seed=1), conversation_id="c", wait_for_redis=True)
        await cache.append_token_log("t", "c", hist[:40])
        own_redis.stop()
        # every call still answers, from the host tier and local state
        assert (await cache.lookup("t", "c", hist[:40])).tier == "host"
        await cache.store("t", hist, make_state(seed=2), conversation_id="c", wait_for_redis=True)
        assert await cache.append_token_log("t", "c", hist[40:]) == hist
        assert await cache.get_token_log("t", "c") == hist
        lease = await cache.acquire_lease("t", "c")
        assert lease is not None and not lease.is_distributed
        await cache.release_lease(lease)
        assert (await cache.lookup_prefix("t", hist)).num_tokens == 80
        assert cache.stats()["redis_writes_failed"] >= 1
        own_redis.start()  # empty: it lost everything
        await asyncio.sleep(0.3)  # past the breaker's backoff
        for _ in range(20):
            await cache.store("t", hist, make_state(seed=2), conversation_id="c", wait_for_redis=True)
            if cache.stats()["redis_breaker_state"] == "closed":
                break
            await asyncio.sleep(0.05)
        # the log missed an append while Redis was down; the next append rewrites it whole
        await cache.append_token_log("t", "c", [7])
        fresh = new_cache(own_redis.url, prefix)
        assert await fresh.get_token_log("t", "c") == hist + [7]
        assert (await fresh.lookup("t", "c", hist + [7])).tier == "redis"
        await fresh.close()
        await cache.close()

    asyncio.run(main())


def test_identical_concurrent_prompts_prefill_once():
    async def main():
        cache = new_cache(None, ns())
        prompt = tokens(20)
        prefills = 0
        results = []

        async def request():
            nonlocal prefills
            async with cache.prefill_once("t", prompt) as is_leader:
                hit = None if is_leader else await cache.lookup_prefix("t", prompt)
                if hit is None:
                    prefills += 1
                    await asyncio.sleep(0.05)  # the prefill
                    await cache.store("t", prompt, make_state())
                    hit = await cache.lookup_prefix("t", prompt)
            results.append(hit.num_tokens)

        await asyncio.gather(*(request() for _ in range(5)))
        other_tenant = [t async for t in _leader_of(cache, "u", prompt)]
        return prefills, results, cache.stats(), other_tenant

    prefills, results, stats, other_tenant = asyncio.run(main())
    assert prefills == 1 and results == [20] * 5 and stats["prefill_waits"] == 4
    assert other_tenant == [True]  # another tenant's identical prompt is not shared


async def _leader_of(cache, tenant, prompt):
    async with cache.prefill_once(tenant, prompt) as is_leader:
        yield is_leader


def test_bf16_storage_through_redis_restores_float32(redis_proc):
    prefix = ns()
    hist = tokens(10)
    state = make_state(v=64, k=32)

    async def main():
        a = new_cache(redis_proc.url, prefix, storage_dtype=torch.bfloat16)
        await a.store("t", hist, state, wait_for_redis=True)
        b = new_cache(redis_proc.url, prefix)
        hit = await b.lookup_prefix("t", hist)
        await a.close()
        await b.close()
        return hit, a.redis.bytes_written

    hit, written = asyncio.run(main())
    for name, t in state.items():
        assert hit.tensors[name].dtype == t.dtype
        assert ((hit.tensors[name].float() - t.float()).norm() / t.float().norm()) < 4e-3
    assert written < sum(t.numel() * t.element_size() for t in state.values())


def test_bf16_storage_can_stay_narrow_for_the_pool_to_widen(redis_proc):
    """What CUDA hosts do (widen_on_host defaults to False where the host tier pins)."""
    from model import GLAConfig, StatePool

    prefix = ns()
    hist = tokens(10)
    pool = StatePool(GLAConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=32), num_slots=2)
    gen = torch.Generator().manual_seed(4)
    state = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in pool.read(0).items()}

    async def main():
        a = new_cache(redis_proc.url, prefix, storage_dtype=torch.bfloat16)
        await a.store("t", hist, state, wait_for_redis=True)
        b = new_cache(redis_proc.url, prefix, widen_on_host=False)
        hit = await b.lookup_prefix("t", hist)
        await a.close()
        await b.close()
        return hit

    hit = asyncio.run(main())
    assert hit is not None and hit.tier == "redis"
    assert {t.dtype for t in hit.tensors.values()} == {torch.bfloat16}  # half the host bytes
    pool.write(1, hit.tensors)
    for name, t in pool.read(1).items():
        assert t.dtype == state[name].dtype
        torch.testing.assert_close(t, state[name].to(torch.bfloat16).to(t.dtype), rtol=0, atol=0)


def test_host_budget_evicts_oldest_and_its_prefix_index():
    async def main():
        one = sum(t.numel() * t.element_size() for t in make_state().values())
        cache = new_cache(None, ns(), host_budget_bytes=2 * one)
        for i in range(3):
            await cache.store("t", tokens(10, start=1000 * i), make_state())
        found = [await cache.lookup_prefix("t", tokens(10, start=1000 * i)) is not None for i in range(3)]
        return found, cache.stats()

    found, stats = asyncio.run(main())
    assert found == [False, True, True] and stats["host_evictions"] == 1 and stats["host_entries"] == 2
