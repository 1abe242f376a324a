"""Device staging (`staging.py`): a snapshot read from Redis copied to the device as it arrives.

On the CPU the stager copies into CPU memory, which exercises everything but the CUDA stream: which
payload ranges are copied where, in both decoder layouts, through both the feed (MGET) and the
in-place (bulk socket) paths, narrow bf16 storage, a corrupt payload, and the tier handing out the
staged tensors while the host tier keeps its own. The CUDA form runs with the gpu marker.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
import torch

from model import GLAConfig, StatePool
from server.settings import Settings
from server.state_cache import RedisTier, TieredStateCache
from server.state_cache.factory import build_state_cache
from server.state_cache.keys import prefix_hash
from server.state_cache.snapshot import SnapshotCorrupt, SnapshotDecoder, encode_snapshot
from tests.state_cache.helpers import assert_state_equal, fp, make_state

FP = fp("model-a")
HIST = list(range(100, 109))
PH = prefix_hash(HIST)
# fp32 tensors of 1,020 bytes and bf16 conv tails of 30: the payload has alignment gaps
STATE = make_state(layers=3, heads=3, v=17, k=5)
CPU = torch.device("cpu")
MIB = 1 << 20
CUDA = torch.cuda.is_available()


def ns() -> str:
    return f"st{uuid.uuid4().hex[:8]}:"


def encoded(state=STATE, storage_dtype=None):
    return encode_snapshot(state, num_tokens=len(HIST), prefix_hash=PH, fingerprint=FP, storage_dtype=storage_dtype)


def cuts(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    points = sorted({0, n, *(rng.randrange(n) for _ in range(12))})
    return list(zip(points[:-1], points[1:], strict=True))


def assert_separate_and_equal(staged: dict[str, torch.Tensor], host: dict[str, torch.Tensor]) -> None:
    assert_state_equal({k: v.cpu() for k, v in staged.items()}, host)
    for name, t in staged.items():
        if t.numel():
            assert t.data_ptr() != host[name].data_ptr(), f"{name}: staged tensor shares the host memory"


@pytest.mark.parametrize("per_tensor", [False, True], ids=["flat", "per_tensor"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fed_parts_are_staged_whatever_their_cuts(per_tensor, seed):
    e = encoded()
    payload = bytes(e.payload)
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, prefix_hash=PH, per_tensor=per_tensor, stage_device=CPU)
    dec.feed([payload[a:b] for a, b in cuts(len(payload), seed)])
    snap = dec.finish()
    assert dec.staged is not None
    assert_state_equal(snap.tensors, STATE)
    assert_separate_and_equal(dec.staged, snap.tensors)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["flat", "per_tensor"])
def test_ranges_received_in_place_are_staged_as_they_are_absorbed(per_tensor):
    """The bulk path: bytes land through `views`, each range is checksummed apart, then absorbed in order."""
    e = encoded()
    payload = bytes(e.payload)
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, prefix_hash=PH, per_tensor=per_tensor, stage_device=CPU)
    ranges = cuts(len(payload), 7)
    for a, b in reversed(ranges):  # land out of order, as parallel sockets do
        pos = a
        for view in dec.views(a, b):
            view[:] = payload[pos : pos + len(view)]
            pos += len(view)
    assert dec._stager is not None and dec._stager.bytes_staged == 0  # nothing before its absorb
    for a, b in ranges:
        dec.absorb(a, b, dec.part_checksum(a, b))
    snap = dec.finish()
    assert_state_equal(snap.tensors, STATE)
    assert_separate_and_equal(dec.staged, snap.tensors)
    tensor_bytes = sum(t.numel() * t.element_size() for t in STATE.values())
    # the per-tensor layout copies the tensors' bytes only, the flat one the whole payload
    assert dec._stager.bytes_staged == (tensor_bytes if per_tensor else len(payload))
    assert tensor_bytes < len(payload)  # there were gaps to skip


def test_a_bf16_stored_state_is_staged_narrow_for_the_pool_to_widen():
    pool = StatePool(GLAConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=32), num_slots=2)
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in pool.read(0).items()}
    e = encoded(state, storage_dtype=torch.bfloat16)
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, prefix_hash=PH, restore_dtype=False, per_tensor=True,
                          stage_device=CPU)
    dec.feed([bytes(e.payload)])
    dec.finish()
    assert dec.staged is not None and {t.dtype for t in dec.staged.values()} == {torch.bfloat16}
    pool.write(1, dec.staged)
    for name, t in pool.read(1).items():
        torch.testing.assert_close(t, state[name].to(torch.bfloat16).to(t.dtype), rtol=0, atol=0)


def test_a_corrupt_payload_leaves_nothing_staged():
    e = encoded()
    payload = bytearray(e.payload)
    payload[len(payload) // 2] ^= 0x10
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, prefix_hash=PH, per_tensor=True, stage_device=CPU)
    dec.feed([bytes(payload)])
    with pytest.raises(SnapshotCorrupt):
        dec.finish()
    assert dec.staged is None


def test_no_device_memory_to_stage_reads_to_the_host_only(monkeypatch):
    """An out-of-memory device is a slower resume, never a failed one."""
    from server.state_cache import staging

    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(staging.DeviceStager, "__init__", no_room)
    e = encoded()
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, prefix_hash=PH, per_tensor=True, stage_device=CPU)
    dec.feed([bytes(e.payload)])
    snap = dec.finish()
    assert dec.staged is None
    assert_state_equal(snap.tensors, STATE)


def _round_trip(url: str, prefix: str, bulk_connections: int, stage_device: torch.device, pin: bool):
    """Stores STATE through one cache, then reads it twice through a fresh one that stages."""

    async def main():
        def tier() -> RedisTier:
            return RedisTier(url, op_timeout_s=5, chunk_bytes=256, bulk_connections=bulk_connections)

        a = TieredStateCache(FP, host_budget_bytes=MIB, redis=tier(), key_prefix=prefix, pin_memory=False)
        b = TieredStateCache(FP, host_budget_bytes=MIB, redis=tier(), key_prefix=prefix, pin_memory=pin,
                             stage_device=stage_device)
        try:
            await a.store("t", HIST, STATE, wait_for_redis=True)
            first = await b.lookup_prefix("t", HIST)
            second = await b.lookup_prefix("t", HIST)  # now from b's host tier
            return first, second, b.stats()
        finally:
            await a.close()
            await b.close()

    return asyncio.run(main())


@pytest.mark.redis
@pytest.mark.parametrize("bulk", [0, 3], ids=["mget", "bulk3"])
def test_a_redis_hit_hands_out_the_staged_tensors_and_the_host_tier_keeps_its_own(redis_proc, bulk):
    first, second, stats = _round_trip(redis_proc.url, ns(), bulk, CPU, pin=False)
    assert first is not None and first.tier == "redis" and second is not None and second.tier == "host"
    assert_state_equal(first.tensors, STATE)
    assert_separate_and_equal(first.tensors, second.tensors)
    assert stats["redis_reads_staged"] == 1


def test_staging_is_off_unless_asked_for_and_needs_cuda(redis_proc):
    assert TieredStateCache(FP, host_budget_bytes=MIB).stage_device is None
    # a CUDA device without pinned host memory would stage synchronously: refused
    unpinned = TieredStateCache(FP, host_budget_bytes=MIB, pin_memory=False, stage_device=torch.device("cuda", 0))
    assert unpinned.stage_device is None
    on_cpu = Settings(redis_url=redis_proc.url, redis_device_staging=True, device="cpu")
    assert build_state_cache(on_cpu, FP).stage_device is None
    off = Settings(redis_url=redis_proc.url, device="cpu")
    assert off.redis_device_staging is False


def test_the_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GLA_REDIS_DEVICE_STAGING", "1")
    assert Settings().redis_device_staging is True


@pytest.mark.gpu
@pytest.mark.redis
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bulk", [0, 3], ids=["mget", "bulk3"])
def test_cuda_staging_over_redis_equals_the_stored_state_and_loads_a_slot(redis_proc, bulk):
    dev = torch.device("cuda", torch.cuda.current_device())
    first, second, stats = _round_trip(redis_proc.url, ns(), bulk, dev, pin=True)
    assert first.tier == "redis" and all(t.device == dev for t in first.tensors.values())
    assert all(t.is_pinned() for t in second.tensors.values())
    assert_separate_and_equal(first.tensors, second.tensors)
    assert_state_equal({k: v.cpu() for k, v in first.tensors.items()}, STATE)
    assert stats["redis_reads_staged"] == 1
    config = GLAConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=32)
    pool = StatePool(config, num_slots=2, device="cuda")
    gen = torch.Generator().manual_seed(5)
    state = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in pool.read(0).items()}
    e = encode_snapshot(state, num_tokens=3, prefix_hash=prefix_hash([1, 2, 3]), fingerprint=FP)
    dec = SnapshotDecoder(e.header_bytes, fingerprint=FP, pin_memory=True, stage_device=dev)
    dec.feed([bytes(e.payload)])
    dec.finish()
    pool.write(1, dec.staged)
    del dec  # the staged buffer is freed while the copy may still be queued: record_stream keeps it
    torch.cuda.synchronize()
    for name, t in pool.read(1).items():
        assert torch.equal(t.cpu(), state[name]), name
