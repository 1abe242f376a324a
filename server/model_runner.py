"""ModelRunner: owns the model, the state pool and the sampler; turns a ScheduledBatch into tokens.

One `run` = one packed varlen prefill of this step's chunks + one decode of all running sequences +
one batched sample over the rows that need a token (decode rows and prompts that finished this
step). The pool has one extra slot past the scheduler's: the CUDA-graph scratch slot that padded
decode rows write to.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from server.sampler import Sampler, SampleResult, SampleRow
from server.scheduler import ScheduledBatch
from server.sequence import Sequence

log = logging.getLogger("gla.engine")


class ModelRunner:
    """Runs steps of the engine on one model.

    Args:
        model: a GLAForCausalLM (its device is the engine's device).
        num_slots: slots for sequences; the pool gets one more (scratch).
        num_valid_tokens: ids at or past it (vocabulary padding) get no probability.
        seed: seed of the sampler's shared generator.
        use_cuda_graphs: replay decode from CUDA graphs when the model is on CUDA.
        prefill_graph_buckets: also replay prefill from graphs captured at these token counts
            (CUDA, no short conv; see `model.cuda_graph.GraphedPrefiller`).
    """

    def __init__(
        self,
        model: Any,
        num_slots: int,
        seed: int = 0,
        use_cuda_graphs: bool = True,
        num_valid_tokens: int | None = None,
        prefill_graph_buckets: list[int] | None = None,
    ) -> None:
        self.model = model.fuse_for_inference()  # idempotent; a model built or moved by the caller gets it too
        self.device = model.lm_head.weight.device
        self.vocab_size = model.config.vocab_size
        # Checkpoints pad the vocabulary past the tokenizer's; those ids must never be sampled.
        self.num_valid_tokens = min(num_valid_tokens or self.vocab_size, self.vocab_size)
        self.pool = model.new_state_pool(num_slots + 1)
        self.scratch_slot = num_slots
        self.sampler = Sampler(self.device, seed)
        self.graphed_decoder = None
        if use_cuda_graphs and self.device.type == "cuda":
            from model.cuda_graph import GraphedDecoder

            self.graphed_decoder = GraphedDecoder(model, self.pool, self.scratch_slot, max_batch=num_slots)
        # sequence -> its state before its last input token, from the last `run` (single flight)
        self.checkpoints: dict[Sequence, dict[str, torch.Tensor]] = {}
        self.graphed_prefiller = None
        if prefill_graph_buckets and use_cuda_graphs and self.device.type == "cuda" and self.pool.conv is None:
            from model.cuda_graph import GraphedPrefiller

            self.graphed_prefiller = GraphedPrefiller(model, self.pool, self.scratch_slot, num_slots,
                                                      prefill_graph_buckets)

    @property
    def bytes_per_slot(self) -> int:
        return self.pool.bytes_per_slot

    @property
    def supports_checkpoints(self) -> bool:
        """Mid-prompt states need no conv tails (a short-conv model keeps them only per slot)."""
        return self.pool.conv is None

    def stage_state(self, slot: int) -> dict[str, torch.Tensor]:
        """A snapshot whose host copy happens later, off the step (`model.state.to_host`)."""
        return self.pool.stage(slot)

    def new_generator(self, seed: int) -> torch.Generator:
        return self.sampler.new_generator(seed)

    def _prepare_slots(self, admitted: list[Sequence]) -> None:
        for seq in admitted:
            assert seq.slot is not None
            if seq.initial_state is not None:
                self.pool.write(seq.slot, seq.initial_state)
                # the slot holds it now: drop the tensors (a state staged on the GPU by a Redis read
                # is 48 MiB of device memory for the 1.3B model) but keep "starts from a state"
                seq.initial_state, seq.state_in_slot = None, True
            # a fresh sequence's first chunk runs with initial_state_mask False: no zeroing needed

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[SampleResult]]:
        """Run one step; return the sequences that got a token and their samples, in order.

        `checkpoints` then maps each sequence that asked (`checkpoint_wanted`, prompt ending in this
        step) to its state before its last input token."""
        self.checkpoints = {}
        self._prepare_slots(batch.admitted)
        logits: list[torch.Tensor] = []
        sampled: list[Sequence] = []
        if batch.prefill:
            ids: list[int] = []
            cu = [0]
            slots, mask = [], []
            positions: list[int] = []
            wanting: list[Sequence] = []
            for c in batch.prefill:
                # the state after all but the last input token, for requests waiting on this prompt
                if c.seq.checkpoint_wanted and c.is_last and c.seq.num_input_tokens - 2 >= c.start:
                    positions.append(len(ids) + c.seq.num_input_tokens - 2 - c.start)
                    wanting.append(c.seq)
                ids += c.seq.input_token_ids[c.start : c.end]
                cu.append(len(ids))
                slots.append(c.seq.slot)
                mask.append(c.start > 0 or c.seq.initial_state is not None or c.seq.state_in_slot)
            out = None
            if self.graphed_prefiller is not None and not positions:
                out = self.graphed_prefiller(ids, cu, slots, mask)  # None: no captured shape fits
            if out is None:
                out = self.model.prefill(  # metadata stays on the host: the model needs its values there
                    torch.tensor(ids, dtype=torch.long).to(self.device),
                    torch.tensor(cu, dtype=torch.int32),
                    self.pool,
                    torch.tensor(slots, dtype=torch.int32),
                    torch.tensor(mask, dtype=torch.bool),
                    checkpoint_positions=positions or None,
                )  # [N, vocab]
            if positions:
                out, states = out
                self.checkpoints = dict(zip(wanting, states, strict=True))
            done = [i for i, c in enumerate(batch.prefill) if c.is_last]
            if done:
                logits.append(out[done] if len(done) < len(batch.prefill) else out)
                sampled += [batch.prefill[i].seq for i in done]
            for c in batch.prefill:
                c.seq.num_prefilled = c.end
        if batch.decode:
            ids = [s.output_token_ids[-1] for s in batch.decode]
            slots_l = [s.slot for s in batch.decode]
            if self.graphed_decoder is not None:
                logits.append(self.graphed_decoder.replay_lists(ids, slots_l))
            else:
                input_ids = torch.tensor(ids, dtype=torch.long).to(self.device)
                slots_t = torch.tensor(slots_l, dtype=torch.int32).to(self.device)
                logits.append(self.model.decode(input_ids, self.pool, slots_t))
            sampled += batch.decode
        if not sampled:
            return [], []
        rows = [
            SampleRow(s.params, s.generator, s.context_token_ids if s.params.repetition_penalty != 1 else [],
                      s.output_token_ids)
            for s in sampled
        ]
        all_logits = logits[0] if len(logits) == 1 else torch.cat(logits, dim=0)
        if self.num_valid_tokens < self.vocab_size:
            # a view, not a masked copy (a clone and a fill of [B, vocab] each step): ids past it
            # (vocabulary padding) are never sampled and get no probability mass
            all_logits = all_logits[:, : self.num_valid_tokens]
        return sampled, self.sampler(all_logits, rows)
