"""Sampler, detokenizer and stop strings, scheduler budget: the engine's pure parts, without a server."""

from __future__ import annotations

import pytest
import torch

from model import load_tokenizer
from server.detokenizer import IncrementalDetokenizer, StopStringMatcher, backend_decode
from server.errors import Overloaded
from server.sampler import Sampler, SampleRow
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler
from server.sequence import Sequence
from server.settings import Settings

V = 50


def _logits(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def _draws(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, n: int = 400) -> set[int]:
    return {sampler(logits[:1], [SampleRow(params)])[0].token_id for _ in range(n)}


def test_greedy_is_argmax_and_logprob_is_raw() -> None:
    logits = _logits()
    out = Sampler("cpu")(logits, [SampleRow(SamplingParams(temperature=0)) for _ in range(4)])
    assert [o.token_id for o in out] == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(torch.tensor([o.logprob for o in out]), ref, atol=1e-5)


def test_all_greedy_batches_take_the_one_kernel_path_with_the_same_results() -> None:
    """An all-greedy batch without logprobs goes through kernels.greedy_logprob; asking for top
    logprobs (or mixing in a sampled row) takes the general path. Both give the same ids/logprobs."""
    logits = _logits(6, seed=3)
    logits[2, 7] = logits[2, 9] = 99.0  # a tie: the lower id
    fast = Sampler("cpu")(logits, [SampleRow(SamplingParams(temperature=0)) for _ in range(6)])
    slow = Sampler("cpu")(logits, [SampleRow(SamplingParams(temperature=0, logprobs=1)) for _ in range(6)])
    assert [o.token_id for o in fast] == [o.token_id for o in slow] and fast[2].token_id == 7
    assert [o.logprob for o in fast] == pytest.approx([o.logprob for o in slow], abs=1e-6)
    assert all(o.top_logprobs is None for o in fast) and all(o.top_logprobs for o in slow)


def test_filters_restrict_the_support() -> None:
    logits = _logits()
    sampler = Sampler("cpu", seed=1)
    order = logits[0].argsort(descending=True).tolist()
    assert _draws(sampler, logits, SamplingParams(top_k=3)) == set(order[:3])
    probs = torch.softmax(logits[0], -1)
    sorted_p = probs[order]
    need = int((sorted_p.cumsum(0) < 0.6).sum()) + 1  # smallest prefix with mass >= 0.6
    assert _draws(sampler, logits, SamplingParams(top_p=0.6)) <= set(order[:need])
    min_p_set = {i for i in range(V) if probs[i] >= 0.2 * probs.max()}
    assert _draws(sampler, logits, SamplingParams(min_p=0.2)) <= min_p_set


def test_seeded_rows_ignore_their_batch_mates() -> None:
    logits = _logits(6)
    sampler = Sampler("cpu", seed=0)
    p = SamplingParams(temperature=1.0, seed=7)

    def run(rows_before: int, steps: int = 20) -> list[int]:
        gen = sampler.new_generator(7)
        out = []
        for s in range(steps):
            rows = [SampleRow(SamplingParams(temperature=1.0)) for _ in range(rows_before)] + [SampleRow(p, gen)]
            batch = torch.cat([_logits(rows_before, seed=100 + s)[:rows_before], logits[5:6]])
            out.append(sampler(batch, rows)[-1].token_id)
        return out

    assert run(0) == run(3) == run(5)


def test_penalties_push_seen_tokens_down() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 2.0
    logits[0, 6] = 1.9
    sampler = Sampler("cpu")
    greedy = SamplingParams(temperature=0)
    assert sampler(logits, [SampleRow(greedy)])[0].token_id == 5
    rep = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert sampler(logits, [SampleRow(rep, context_token_ids=[5])])[0].token_id == 6
    freq = SamplingParams(temperature=0, frequency_penalty=0.5)
    assert sampler(logits, [SampleRow(freq, output_token_ids=[5])])[0].token_id == 6
    pres = SamplingParams(temperature=0, presence_penalty=0.5)
    assert sampler(logits, [SampleRow(pres, output_token_ids=[5])])[0].token_id == 6


def test_top_logprobs_are_sorted_and_include_the_greedy_token() -> None:
    logits = _logits(2)
    out = Sampler("cpu")(logits, [SampleRow(SamplingParams(temperature=0, logprobs=3)), SampleRow(SamplingParams())])
    top = out[0].top_logprobs
    assert top is not None and len(top) == 3 and top[0][0] == out[0].token_id
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert out[1].top_logprobs is None


@pytest.mark.parametrize("bad", [{"top_p": 0}, {"temperature": -1}, {"max_tokens": 0}, {"stop": [""]}])
def test_sampling_params_reject_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_detokenizer_never_emits_broken_utf8() -> None:
    tok = load_tokenizer(Settings().model)
    text = "Thou art héllo 你好 🙂 — fair Verona, ünd so forth."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = tok("Say:", add_special_tokens=True)["input_ids"]
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.step(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    assert any(d == "" for d in deltas[:-1]) or len(ids) == len(text)  # some token was a partial character


def test_detokenizer_backend_decode_equals_the_tokenizer_decode() -> None:
    """The detokenizer calls the Rust decode directly (bundled tokenizer: no space clean-up); on any
    ids, special ones included, it must give exactly what the HF tokenizer's decode gives. A
    tokenizer that cleans up spaces keeps the HF path."""
    tok = load_tokenizer(Settings().model)
    backend = backend_decode(tok)
    assert backend is not None
    gen = torch.Generator().manual_seed(5)
    specials = list(tok.all_special_ids)
    for n in (1, 2, 7, 40):
        ids = torch.randint(0, len(tok), (n,), generator=gen).tolist() + specials[: n % 3]
        for skip in (True, False):
            assert backend(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)

    class CleaningUp:
        backend_tokenizer = tok.backend_tokenizer
        clean_up_tokenization_spaces = True

    assert backend_decode(CleaningUp()) is None and backend_decode(object()) is None


def test_stop_matcher_spanning_and_holdback() -> None:
    m = StopStringMatcher(["END", "xyz"])
    assert m.find("abc EN", 2) is None
    assert m.safe_length("abc EN") == 4  # "EN" may become "END"
    assert m.find("abc END more", 8) == (4, "END")
    assert m.safe_length("abc x") == 4 and m.safe_length("abc q") == 5
    assert StopStringMatcher([]).find("anything", 3) is None


def _seq(n: int, rid: str) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(), list(range(n)))


def test_scheduler_splits_prompts_by_the_token_budget() -> None:
    s = Scheduler(num_slots=2, max_num_batched_tokens=10, max_waiting_requests=1, max_waiting_tokens=100)
    a, b, c = _seq(25, "a"), _seq(4, "b"), _seq(3, "c")
    for q in (a, b, c):
        s.add(q)
    batch = s.schedule()
    assert [q.request_id for q in batch.admitted] == ["a", "b"]  # two slots
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in batch.prefill] == [("a", 0, 10)]
    a.num_prefilled = 10
    batch = s.schedule()
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in batch.prefill] == [("a", 10, 20)]
    a.num_prefilled = 20
    batch = s.schedule()
    assert [(ch.seq.request_id, ch.start, ch.end) for ch in batch.prefill] == [("a", 20, 25), ("b", 0, 4)]
    assert batch.prefill[0].is_last and batch.prefill[1].is_last
    a.num_prefilled, b.num_prefilled = 25, 4
    a.output_token_ids, b.output_token_ids = [1], [1]
    batch = s.schedule()
    assert batch.decode == [a, b] and not batch.prefill
    s.finish(a)
    batch = s.schedule()
    assert batch.admitted == [c] and c.slot is not None


def test_scheduler_admission_bounds() -> None:
    s = Scheduler(num_slots=1, max_num_batched_tokens=10, max_waiting_requests=1, max_waiting_tokens=50)
    s.check_admission(1000)  # gets the free slot at once: not queued, so no token bound
    s.add(_seq(5, "a"))
    s.check_admission(40)  # waits, within both bounds
    with pytest.raises(Overloaded) as exc:
        s.check_admission(60)
    assert exc.value.status_code == 429
    s.add(_seq(5, "b"))
    with pytest.raises(Overloaded):
        s.check_admission(1)
