"""Batched sampling on the model's device with one host sync per step.

Each row carries its own SamplingParams. Sampling is the exponential race (argmax of p / q with
q ~ Exp(1)), which needs no multinomial and no sync; a row with a seed draws q from its own
generator, so its samples do not depend on its batch mates. Logprobs are those of the raw model
distribution (before penalties, temperature and filters), like OpenAI's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import kernels
from server.sampling_params import SamplingParams


@dataclass(slots=True)
class SampleRow:
    """One row of a sampling batch: its params, generator, and the tokens penalties look at."""

    params: SamplingParams
    generator: torch.Generator | None = None
    context_token_ids: list[int] = field(default_factory=list)  # prompt (whole conversation) tokens
    output_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """Samples one token per row of a [B, vocab] logits batch.

    Args:
        device: the logits' device (generators must live there).
        seed: seed of the shared generator used by rows without their own seed.

    Example:
        >>> sampler = Sampler("cpu", seed=0)
        >>> rows = [SampleRow(SamplingParams(temperature=0.0))]
        >>> sampler(torch.randn(1, 100), rows)[0].token_id
    """

    def __init__(self, device: torch.device | str, seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[SampleResult]:
        # logits: [B, V] float32
        B, V = logits.shape
        if B != len(rows):
            raise ValueError(f"{B} logits rows for {len(rows)} sample rows")
        k = max((r.params.logprobs or 0) for r in rows)
        if not k and all(r.params.is_greedy and not r.params.has_penalties for r in rows):
            # one kernel on CUDA instead of ~8 (argmax, log_softmax, gather, casts, cat); one sync
            return [SampleResult(int(tok), lp, None) for tok, lp in kernels.greedy_logprob(logits).tolist()]
        x = logits.float()
        if any(r.params.has_penalties for r in rows):
            x = x.clone()
            for i, r in enumerate(rows):
                if r.params.has_penalties:
                    self._apply_penalties(x[i], r)
        greedy_ids = x.argmax(dim=-1)  # [B]
        tokens = greedy_ids
        if not all(r.params.is_greedy for r in rows):
            tokens = self._sample(x, rows, greedy_ids)

        logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
        cols = [tokens.double()[:, None], logp.gather(1, tokens[:, None]).double()]
        if k:
            top_v, top_i = logp.topk(min(k, V), dim=-1)  # [B, k]
            cols += [top_i.double(), top_v.double()]
        packed: list[list[Any]] = torch.cat(cols, dim=1).tolist()  # the one host sync of the step
        out = []
        kk = min(k, V)
        for r, row in zip(rows, packed, strict=True):
            top = None
            if r.params.logprobs:
                n = min(r.params.logprobs, kk)
                top = [(int(row[2 + j]), float(row[2 + kk + j])) for j in range(n)]
            out.append(SampleResult(int(row[0]), float(row[1]), top))
        return out

    def _apply_penalties(self, x: torch.Tensor, r: SampleRow) -> None:
        # x: [V], modified in place
        p = r.params
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(r.context_token_ids) | set(r.output_token_ids)), dtype=torch.long)
            if seen.numel():
                seen = seen.to(x.device)
                vals = x[seen]
                x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            ids = torch.tensor(r.output_token_ids, dtype=torch.long).to(x.device)
            counts = torch.zeros_like(x).index_add_(0, ids, torch.ones_like(ids, dtype=x.dtype))
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)

    def _sample(self, x: torch.Tensor, rows: list[SampleRow], greedy_ids: torch.Tensor) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows])
        x = x / temps.to(x.device)[:, None]
        if any(r.params.has_filters for r in rows):
            x = self._filter(x, rows)
        probs = torch.softmax(x, dim=-1)  # [B, V]
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None and not r.params.is_greedy:
                q[i].exponential_(generator=r.generator)
        sampled = (probs / q.clamp_min_(1e-20)).argmax(dim=-1)
        is_greedy = torch.tensor([r.params.is_greedy for r in rows]).to(x.device)
        return torch.where(is_greedy, greedy_ids, sampled)

    def _filter(self, x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """top_k, top_p and min_p on one descending sort of the batch."""
        B, V = x.shape
        dev = x.device
        top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else V for r in rows]).to(dev)
        top_p = torch.tensor([r.params.top_p for r in rows], dtype=x.dtype).to(dev)
        min_p = torch.tensor([r.params.min_p for r in rows], dtype=x.dtype).to(dev)
        vals, idx = x.sort(dim=-1, descending=True)  # [B, V]
        pos = torch.arange(V, device=dev)[None, :]
        drop = pos >= top_k[:, None]
        probs = torch.softmax(vals.masked_fill(drop, float("-inf")), dim=-1)
        # keep a token while the mass before it is < top_p: the smallest set reaching top_p
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        drop[:, 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, idx, vals)
