"""Staged snapshots: a slot's state captured in the step, copied to the host later.

The snapshot must be the state at the moment `stage` was called, even when the slot is written
again before the host copy runs (on CUDA the copy is on another stream, after an event).
"""

from __future__ import annotations

import pytest
import torch

from model import StatePool
from model.state import StagedState, clone_slot, to_host
from tests.model.conftest import tiny_config

CUDA = torch.cuda.is_available()


def _random_pool(device: str, slots: int = 3) -> StatePool:
    pool = StatePool(tiny_config(use_short_conv=True), num_slots=slots, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    for t in pool.recurrent + (pool.conv or []):
        t.copy_(torch.randn(t.shape, generator=g, device=device))
    return pool


def test_stage_on_cpu_is_an_owned_copy_equal_to_read() -> None:
    pool = _random_pool("cpu")
    want = pool.read(1)
    staged = pool.stage(1)
    pool.zero_([1])  # the slot moves on; the snapshot must not
    got = to_host(staged, pin=False)
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_clone_slot_copies_every_tensor_of_one_slot_whatever_its_dtype() -> None:
    """The staged copy packs tensors into one buffer per dtype: names, shapes, values, ownership."""
    pool = _random_pool("cpu")
    mixed = pool._tensors() + [("extra.half", torch.randn(3, 5, 7).to(torch.bfloat16))]
    got = clone_slot(mixed, 2)
    assert [n for n, _ in got] == [n for n, _ in mixed]
    for (name, src), (_, dst) in zip(mixed, got, strict=True):
        assert dst.dtype == src.dtype and dst.shape == src[2].shape and torch.equal(dst, src[2]), name
    pool.zero_([2])
    assert any(t.abs().sum() > 0 for n, t in got if n != "extra.half")  # copies, not views of the pool


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pin", [False, True])
def test_staged_cuda_snapshot_is_the_state_at_stage_time(pin: bool) -> None:
    pool = _random_pool("cuda")
    want = pool.read(2)
    staged = pool.stage(2)
    assert isinstance(staged, StagedState) and staged.ready is not None
    for t in pool.recurrent:  # overwrite the slot on the compute stream before the host copy
        t[2].mul_(-3.0).add_(1.0)
    got = to_host(staged, pin=pin)
    for name, t in want.items():
        assert got[name].device.type == "cpu" and got[name].is_pinned() == pin
        assert torch.equal(got[name], t), name
    pool.write(0, got)  # and it loads back
    assert torch.equal(pool.read(0)["layers.0.recurrent"], want["layers.0.recurrent"])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_stage_falls_back_to_read_past_its_byte_bound() -> None:
    pool = _random_pool("cuda")
    pool.max_staged_bytes = pool.bytes_per_slot  # room for one staged snapshot
    first, second = pool.stage(0), pool.stage(1)
    assert isinstance(first, StagedState) and not isinstance(second, StagedState)
    assert all(t.device.type == "cpu" for t in second.values())
    del first
    import gc

    gc.collect()
    assert isinstance(pool.stage(2), StagedState)  # the bound was released with the snapshot


def test_warm_pinned_host_is_a_no_op_off_cuda() -> None:
    assert _random_pool("cpu").warm_pinned_host(4) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_snapshots_after_warming_pinned_buffers_are_exact() -> None:
    """Warming hands later snapshots recycled page-locked blocks: each host copy must still be the
    state at stage time, and two live snapshots must not share memory."""
    pool = _random_pool("cuda")
    assert pool.warm_pinned_host(6) == 6
    want1, staged1 = pool.read(1), pool.stage(1)
    want2, staged2 = pool.read(2), pool.stage(2)
    pool.zero_([1, 2])
    got1, got2 = to_host(staged1, pin=True), to_host(staged2, pin=True)
    for name in want1:
        assert got1[name].is_pinned() and got1[name].data_ptr() != got2[name].data_ptr()
        assert torch.equal(got1[name], want1[name]) and torch.equal(got2[name], want2[name]), name
