"""CUDA-graph decode: one captured graph per bucketed batch size, replayed every decode step.

An eager decode step of a 24-layer model launches hundreds of small kernels and is bound by host
launch time, not by the GPU (issue 8: 31.9 ms eager vs 2.26 ms of GPU work for gla-1.3B). The state
pool and the weights never move, so the whole step can be captured once per batch size. Batches
are padded up to the next bucket; padded rows read a valid token and write a scratch slot the
engine never hands out, so they cannot touch a live sequence.
"""

from __future__ import annotations

import torch

from kernels import SHORT_PREFILL_MAX
from model.modeling import GLAForCausalLM
from model.state import StatePool

SHORT_GRAPH_TOKENS = 256  # prefill graphs up to this many tokens get a short variant


class _Staging:
    """Pinned host mirrors of a graph's input buffers.

    Why: a step's inputs went over as `buf.copy_(torch.tensor(list))`, one pageable (synchronous)
    copy and one tensor per buffer: 0.18 ms of host time before a batch-1 decode replay on the H200
    host, all of it with the GPU idle (`benchmarks/trace_step.py`). The host side is written through
    numpy views, and each buffer goes over as one async copy. `wait()` before writing the host
    side again: the previous copies must have read it (they have, whenever the step synced).
    """

    def __init__(self, *bufs: torch.Tensor) -> None:
        self.dev = bufs
        self.host = [torch.empty(b.shape, dtype=b.dtype, pin_memory=True) for b in bufs]
        self.np = [h.numpy() for h in self.host]
        self.done = torch.cuda.Event()

    def wait(self) -> None:
        self.done.synchronize()

    def upload(self, sizes: tuple[int, ...]) -> None:
        for dev, host, n in zip(self.dev, self.host, sizes, strict=True):
            dev[:n].copy_(host[:n], non_blocking=True)
        self.done.record()


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
        self._stage = _Staging(self.input_ids, self.slots)

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

    def replay_lists(self, input_ids: list[int], slots: list[int]) -> torch.Tensor:
        """`__call__` from host lists (the engine's step): staged through pinned memory, async."""
        n = len(input_ids)
        b = self.bucket_for(n)
        st = self._stage
        st.wait()
        st.np[0][:n] = input_ids
        st.np[1][:n] = slots
        st.np[1][n:b] = self.scratch_slot
        st.upload((n, b))
        self.graphs[b].replay()
        return self.outputs[b][:n]


PAD_SLOT = -1  # the slot of a padding sequence: the prefill kernels neither read nor write its state


def pad_layout(
    num_tokens: int, cu: list[int], slots: list[int], mask: list[bool], num_seqs: int, bucket: int
) -> tuple[list[int], list[int], list[bool]] | None:
    """A packed prefill batch padded to a captured shape: `bucket` tokens in `num_seqs` sequences.

    The real sequences keep their places; each missing sequence becomes a padding sequence in slot
    PAD_SLOT, which the kernels neither read nor write. Padding sequences are empty but the last,
    which takes the bucket's spare tokens (possibly none). Why empty: with one token per padding
    sequence, the smallest graph of a server with max_num_seqs 32 had 97 rows, and every GEMM of a
    resumed turn's 17-token prefill ran at M=97 instead of 32.
    Returns (cu_seqlens, slots, mask) of the padded batch, or None when it does not fit.
    """
    n = len(cu) - 1
    pad = num_seqs - n
    if pad < 1 or bucket < num_tokens:
        return None
    cu_full = cu + [num_tokens] * (pad - 1) + [bucket]
    return cu_full, slots + [PAD_SLOT] * pad, mask + [False] * pad


class GraphedPrefiller:
    """Replays `model.prefill` from CUDA graphs captured at token-count buckets.

    An eager prefill of a 24-layer model costs milliseconds of host time per engine step (about
    10 launches per layer plus the prefill kernel's own), which dominates the time to first token of
    short prompts. The varlen prefill kernels size their grids from the token and sequence counts
    alone and read cu_seqlens on the device, so a batch padded to a fixed (tokens, sequences) shape
    replays one graph whatever its real layout (see `pad_layout`). Not for short-conv models (their
    conv tails are handled per sequence on the host) nor for calls that want checkpoint states.

    Args:
        model: a CUDA model without short convolutions.
        pool: its state pool (captured by address).
        scratch_slot: a slot no sequence uses (zeroed after capture; padding sequences use PAD_SLOT).
        max_seqs: most real sequences per call; graphs hold max_seqs + 1 sequences.
        buckets: token counts to capture.
    """

    def __init__(self, model: GLAForCausalLM, pool: StatePool, scratch_slot: int, max_seqs: int,
                 buckets: list[int]) -> None:
        dev = model.lm_head.weight.device
        if dev.type != "cuda":
            raise ValueError("GraphedPrefiller needs a CUDA model")
        if pool.conv is not None:
            raise ValueError("GraphedPrefiller does not support use_short_conv models")
        self.model, self.pool, self.scratch_slot = model, pool, scratch_slot
        self.num_seqs = max_seqs + 1
        self.buckets = sorted(set(b for b in buckets if b >= 1))
        if not self.buckets:
            raise ValueError("no prefill graph bucket given")
        top = self.buckets[-1]
        self.ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.cu = torch.zeros(self.num_seqs + 1, dtype=torch.int32, device=dev)
        self.slots = torch.full((self.num_seqs,), scratch_slot, dtype=torch.int32, device=dev)
        self.mask = torch.zeros(self.num_seqs, dtype=torch.bool, device=dev)
        # (bucket, short): short graphs run the token-by-token prefill kernel (`chunk_gla_prefill(short=
        # True)`), replayed when every real sequence has at most SHORT_PREFILL_MAX tokens. A resumed
        # turn's 17 tokens on an H200 (small-steps-h200-run7.json): chunked graph 2.2 / 4.7 / 6.9 ms at
        # max_num_seqs 1 / 32 / 64 (each padding sequence's chunk costs a full chunk program), short
        # 2.0-2.1 ms
        self.variants = [(b, False) for b in self.buckets]
        self.variants += [(b, True) for b in self.buckets if b <= SHORT_GRAPH_TOKENS]
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self._capture()
        self._stage = _Staging(self.ids, self.cu, self.slots, self.mask)

    def _layout(self, bucket: int) -> list[int]:
        """A valid all-padding layout of `bucket` tokens, loaded into `cu`, for warm-up and capture."""
        layout = pad_layout(0, [0], [], [], self.num_seqs, bucket)
        assert layout is not None
        self.cu.copy_(torch.tensor(layout[0], dtype=torch.int32))
        return layout[0]

    def _run(self, bucket: int, cu_host: list[int], short: bool) -> torch.Tensor:
        return self.model.prefill(self.ids[:bucket], self.cu, self.pool, self.slots, self.mask,
                                  cu_seqlens_host=cu_host, short=short)

    def _capture(self) -> None:
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket, short in self.variants:  # warm-up: compile every kernel variant outside the capture
                layout = self._layout(bucket)
                for _ in range(2):
                    self._run(bucket, layout, short)
        torch.cuda.current_stream().wait_stream(stream)
        for bucket, short in sorted(self.variants, reverse=True):  # largest first: smaller graphs reuse its memory
            layout = self._layout(bucket)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=mempool):
                self.outputs[bucket, short] = self._run(bucket, layout, short)
            self.graphs[bucket, short] = g
        torch.cuda.synchronize()
        self.pool.zero_([self.scratch_slot])

    def bucket_for(self, num_tokens: int, num_real_seqs: int) -> int | None:
        if num_real_seqs >= self.num_seqs:
            return None
        return next((b for b in self.buckets if b >= num_tokens), None)

    def __call__(self, ids: list[int], cu: list[int], slots: list[int], mask: list[bool]) -> torch.Tensor | None:
        """Logits [N, vocab] of the real sequences, or None when the batch fits no captured shape."""
        num_tokens, n = cu[-1], len(cu) - 1
        bucket = self.bucket_for(num_tokens, n)
        if bucket is None:
            return None
        layout = pad_layout(num_tokens, cu, slots, mask, self.num_seqs, bucket)
        assert layout is not None
        cu_full, slots_full, mask_full = layout
        st = self._stage
        st.wait()
        st.np[0][:num_tokens] = ids
        st.np[1][:] = cu_full
        st.np[2][:] = slots_full
        st.np[3][:] = mask_full
        st.upload((num_tokens, self.num_seqs + 1, self.num_seqs, self.num_seqs))
        longest = max(b - a for a, b in zip(cu, cu[1:], strict=False))
        short = (bucket, True) in self.graphs and longest <= SHORT_PREFILL_MAX
        self.graphs[bucket, short].replay()
        return self.outputs[bucket, short][:n]
