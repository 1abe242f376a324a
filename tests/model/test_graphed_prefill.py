"""Prefill from CUDA graphs: a batch padded to a captured (tokens, sequences) shape.

The padding itself is checked on the CPU through the real model: padding sequences change nothing
for the real ones. The graph replay is checked against eager prefill on CUDA (gpu marker).
"""

from __future__ import annotations

import pytest
import torch

from model import StatePool
from model.cuda_graph import PAD_SLOT, GraphedPrefiller, pad_layout
from server.engine import prefill_buckets
from server.settings import Settings
from tests.model.conftest import VOCAB, tiny_model

CUDA = torch.cuda.is_available()


def test_pad_layout_keeps_real_sequences_and_pads_with_empty_sequences() -> None:
    cu, slots, mask = [0, 5, 12], [3, 1], [True, False]
    cu_full, slots_full, mask_full = pad_layout(12, cu, slots, mask, num_seqs=5, bucket=20)
    assert cu_full == [0, 5, 12, 12, 12, 20]  # empty padding sequences; the last takes the spare tokens
    assert slots_full == [3, 1, PAD_SLOT, PAD_SLOT, PAD_SLOT] and mask_full == [True, False, False, False, False]
    assert pad_layout(20, cu[:-1] + [20], slots, mask, 5, 20) == ([0, 5, 20, 20, 20, 20], slots_full, mask_full)
    assert pad_layout(21, cu[:-1] + [21], slots, mask, 5, 20) is None  # more tokens than the bucket
    assert pad_layout(12, cu, slots, mask, 2, 20) is None  # no room for a padding sequence


def test_prefill_buckets_cover_the_budget() -> None:
    assert prefill_buckets(Settings(cuda_graph_prefill=False)) is None
    b = prefill_buckets(Settings(cuda_graph_prefill=True, max_num_seqs=32, max_num_batched_tokens=2048))
    assert b == [16, 32, 64, 128, 256, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048]
    # a full-budget prompt (or one of any listed size) from one sequence fits with 32 padding ones
    assert b is not None and all(pad_layout(n, [0, n], [0], [False], 33, n) for n in b)
    b = prefill_buckets(Settings(cuda_graph_prefill=True, max_num_seqs=4, max_num_batched_tokens=300))
    assert b == [16, 32, 64, 128, 256, 300]


def test_padding_sequences_change_nothing_for_the_real_ones() -> None:
    """What the graphs rely on, through the real model on the CPU: same logits and states."""
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (70,), generator=g)
    cu, slots, mask = [0, 30, 70], [0, 1], [False, True]
    plain, padded = StatePool(model.config, 4), StatePool(model.config, 4)
    padded.recurrent[0][1].copy_(torch.randn(padded.recurrent[0][1].shape, generator=g))
    plain.recurrent[0][1].copy_(padded.recurrent[0][1])
    want = model.prefill(ids, torch.tensor(cu, dtype=torch.int32), plain, torch.tensor(slots, dtype=torch.int32),
                         torch.tensor(mask))
    cu_full, slots_full, mask_full = pad_layout(70, cu, slots, mask, num_seqs=5, bucket=128)
    assert cu_full == [0, 30, 70, 70, 70, 128]  # two empty padding sequences, one with 58 tokens
    ids_full = torch.cat([ids, torch.randint(0, VOCAB, (128 - 70,), generator=g)])
    got = model.prefill(ids_full, torch.tensor(cu_full, dtype=torch.int32), padded,
                        torch.tensor(slots_full, dtype=torch.int32), torch.tensor(mask_full))
    assert torch.allclose(got[:2], want, atol=1e-5, rtol=1e-5)
    for s in (0, 1):
        assert torch.allclose(padded.read(s)["layers.0.recurrent"], plain.read(s)["layers.0.recurrent"],
                              atol=1e-6, rtol=1e-5)
    for s in (2, 3):  # padding (slot -1), empty or not, writes no slot, not even the pool's last one
        assert torch.equal(padded.read(s)["layers.0.recurrent"], plain.read(s)["layers.0.recurrent"])


@pytest.mark.parametrize("conv", [False, True], ids=["plain", "short-conv"])
def test_empty_sequences_keep_their_state(conv: bool) -> None:
    """An empty sequence (graph padding) in a real slot leaves that slot's state, conv tail included,
    and changes nothing for its neighbours."""
    model = tiny_model(use_short_conv=conv)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (30,), generator=g)
    plain, padded = StatePool(model.config, 4), StatePool(model.config, 4)
    state = {name: torch.randn(t.shape, generator=g) for name, t in plain.read(2).items()}
    plain.write(2, state)
    padded.write(2, state)
    want = model.prefill(ids, torch.tensor([0, 10, 30], dtype=torch.int32), plain,
                         torch.tensor([0, 1], dtype=torch.int32))
    got = model.prefill(ids, torch.tensor([0, 10, 10, 30], dtype=torch.int32), padded,
                        torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([False, True, False]))
    assert torch.allclose(got[[0, 2]], want, atol=1e-6, rtol=1e-6)
    for s in range(4):
        for name, t in plain.read(s).items():
            assert torch.allclose(padded.read(s)[name], t, atol=1e-6, rtol=1e-6), (s, name)


def test_graphed_prefiller_refuses_cpu_models() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="CUDA"):
        GraphedPrefiller(model, StatePool(model.config, 3), 2, 2, [64])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graph_replay_equals_eager_prefill() -> None:
    model = tiny_model().cuda()
    model.fuse_for_inference()
    pool, ref = model.new_state_pool(5), model.new_state_pool(5)
    graphed = GraphedPrefiller(model, pool, scratch_slot=4, max_seqs=3, buckets=[2, 64, 256])
    g = torch.Generator().manual_seed(6)
    for lens in ([50], [20, 7, 100], [1, 1], [64], [1, 1, 1]):
        ids = torch.randint(0, VOCAB, (sum(lens),), generator=g).tolist()
        cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
        slots, mask = list(range(len(lens))), [True] * len(lens)
        got = graphed(ids, cu, slots, mask)
        assert got is not None
        want = model.prefill(torch.tensor(ids, device="cuda"), torch.tensor(cu, dtype=torch.int32), ref,
                             torch.tensor(slots, dtype=torch.int32), torch.tensor(mask))
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), lens
        for s in slots:
            assert torch.allclose(pool.read(s)["layers.0.recurrent"], ref.read(s)["layers.0.recurrent"],
                                  atol=1e-5, rtol=1e-4)
    assert graphed([1] * 300, [0, 300], [0], [False]) is None  # no captured shape fits: eager
