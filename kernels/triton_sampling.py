"""Greedy sampling in one kernel: argmax and its log-probability from one pass over each row.

Why: a decode step's sampling ran as about eight small PyTorch kernels after the graph (float cast,
argmax, log_softmax, gather, casts, cat, with a masked copy of the logits before them): 0.15 ms from
the graph's end to the host sync on the H200, 10% of a batch-1 step (0.12 ms with this kernel and
the copy gone, sync latency included; `trace_step.py`). Each program reads one row once with an
online max / sum-of-exponentials and writes (id, logprob) as float64, the layout the host reads in
the step's one sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._launch import Launcher

BLOCK = 2048


@triton.jit
def _greedy_kernel(x, out, V, stride, BLOCK: tl.constexpr):
    """Program per row: running max m, its first index, and s = sum exp(x - m); logprob = -log(s)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    best = tl.zeros([], dtype=tl.int64)
    for start in range(0, V, BLOCK):
        mask = start + offs < V
        b = tl.load(x + row * stride + start + offs, mask=mask, other=float("-inf")).to(tl.float32)
        bm = tl.max(b, axis=0)
        bi = tl.argmax(b, axis=0, tie_break_left=True).to(tl.int64) + start
        new_m = tl.maximum(m, bm)
        finite = new_m > float("-inf")
        safe_m = tl.where(finite, new_m, 0.0)
        s = tl.where(finite, s * tl.exp(m - safe_m) + tl.sum(tl.where(b > float("-inf"), tl.exp(b - safe_m), 0.0),
                                                             axis=0), s)
        best = tl.where(bm > m, bi, best)  # strictly greater: the first maximum wins across blocks
        m = new_m
    tl.store(out + row * 2, best.to(tl.float64))
    tl.store(out + row * 2 + 1, (-tl.log(s)).to(tl.float64))


_greedy = Launcher(_greedy_kernel)


def greedy_logprob_triton(logits: torch.Tensor) -> torch.Tensor:
    """`kernels.greedy_logprob` on CUDA: logits [B, V] (any float dtype, last dim contiguous)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty(B, 2, dtype=torch.float64, device=logits.device)
    if B:
        key = (logits.device.index, logits.dtype, V, logits.stride(0)) if logits.is_cuda else None
        _greedy((B,), key, (logits, out, V, logits.stride(0), BLOCK), num_warps=8)
    return out
