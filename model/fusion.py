"""One tensor behind several parameters, so one GEMM serves several projections without copying weights.

`FusedWeight(params)` concatenates the parameters along dim 0 and re-points each one's `.data` at its
slice of the result: names, shapes and `state_dict()` stay those of the checkpoint (fla-hub names),
no memory is duplicated, and in-place updates (load_state_dict, optimisers) land in the fused tensor.
A move that replaces a parameter's storage (`model.to(dtype)`, `deepcopy`) breaks the link; `valid()`
then says so and the layer falls back to its unfused path until it is fused again.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedWeight:
    def __init__(self, params: list[nn.Parameter]) -> None:
        with torch.no_grad(), torch.inference_mode(False):  # normal tensors: training may use the views
            self.weight = torch.cat([p.detach() for p in params], dim=0)
            self.splits = [p.shape[0] for p in params]
            for p, view in zip(params, self.weight.split(self.splits, dim=0), strict=True):
                p.data = view
        self.params = params
        self.ptrs = [p.data_ptr() for p in params]

    def valid(self) -> bool:
        """Every parameter still a view of `weight` (no dtype/device move or reassignment since)."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.ptrs, strict=True))


def fuse(current: FusedWeight | None, params: list[nn.Parameter]) -> FusedWeight:
    """`current` when it still backs `params` (fusing is idempotent), else a fresh FusedWeight."""
    if current is not None and current.valid() and all(
        a is b for a, b in zip(current.params, params, strict=True)
    ) and len(current.params) == len(params):
        return current
    return FusedWeight(params)
