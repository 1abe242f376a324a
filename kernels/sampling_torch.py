"""Greedy sampling in plain PyTorch: the reference of kernels/triton_sampling.py and the CPU path."""

from __future__ import annotations

import torch


def greedy_logprob_torch(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] logits -> [B, 2] float64: (argmax id, its log-softmax), ties to the lowest id."""
    x = logits.float()
    ids = x.argmax(dim=-1)
    logp = torch.log_softmax(x, dim=-1).gather(1, ids[:, None])[:, 0]
    return torch.stack([ids.double(), logp.double()], dim=1)
