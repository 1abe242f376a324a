"""CUDA-graph decode: one captured graph per bucketed batch size, replayed every decode step.

An eager decode step of a 24-layer model launches hundreds of small kernels and is bound by host
launch time, not by the GPU (issue 8: 31.9 ms eager vs 2.26 ms of GPU work for gla-1.3B). The state
pool and the weights never move, so the whole step can be captured once per batch size. Batches
are padded up to the next bucket; padded rows read a valid token and write a scratch slot the
engine never hands out, so they cannot touch a live sequence.
"""

from __future__ import annotations

import torch

from model.modeling import GLAForCausalLM
from model.state import StatePool


def default_buckets(max_batch: int) -> list[int]:
    buckets = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if buckets[-1] != max_batch:
        buckets.append(max_batch)
    return buckets


class GraphedDecoder:
    """Replays `model.decode` from captured CUDA graphs.

    Args:
        model: a CUDA model.
        pool: its state pool (captured by address: never reallocate it afterwards).
        scratch_slot: a pool slot no sequence uses; padded batch rows write there.
        max_batch: largest batch to capture.
        buckets: batch sizes to capture (default 1, 2, 4, 8, 16, 32, ... max_batch).

    Example:
        >>> dec = GraphedDecoder(model, pool, scratch_slot=pool.num_slots - 1, max_batch=64)
        >>> logits = dec(input_ids, slots)   # [B] long, [B] int32 on CUDA -> [B, vocab] fp32
    """

    def __init__(
        self,
        model: GLAForCausalLM,
        pool: StatePool,
        scratch_slot: int,
        max_batch: int,
        buckets: list[int] | None = None,
    ) -> None:
        dev = model.lm_head.weight.device
        if dev.type != "cuda":
            raise ValueError("GraphedDecoder needs a CUDA model")
        # fuse before capture: the graphs bake in whichever weights (fused or not) the layers use now
        self.model, self.pool = model.fuse_for_inference(), pool
        self.buckets = sorted(buckets or default_buckets(max_batch))
        self.max_batch = self.buckets[-1]
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((self.max_batch,), scratch_slot, dtype=torch.int32, device=dev)
        self.scratch_slot = scratch_slot
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture()

    def _capture(self) -> None:
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton autotune / compile outside the capture
                for b in self.buckets:
                    self.model.decode(self.input_ids[:b], self.pool, self.slots[:b])
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.buckets):  # largest first so smaller graphs reuse its memory
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=mempool):
                self.outputs[b] = self.model.decode(self.input_ids[:b], self.pool, self.slots[:b])
            self.graphs[b] = g
        torch.cuda.synchronize()
        self.pool.zero_([self.scratch_slot])

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest captured batch {self.max_batch}")

    def __call__(self, input_ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[0]
        b = self.bucket_for(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        if b > n:
            self.slots[n:b].fill_(self.scratch_slot)
        self.graphs[b].replay()
        return self.outputs[b][:n]
