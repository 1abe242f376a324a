"""A checkpoint whose vocabulary is padded past its tokenizer's: padding ids are never sampled.

The padding rows of lm_head are made the largest logits, so any path that let them through (the
greedy kernel path, the general sampling path, top logprobs) would return them.
"""

from __future__ import annotations

import math

import httpx
import torch

from model import GLAConfig, GLAForCausalLM, bundled_model_path, load_tokenizer
from tests.server.conftest import start_server


def _padded_model(_: object) -> tuple[GLAForCausalLM, object]:
    tok = load_tokenizer(bundled_model_path())
    torch.manual_seed(0)
    model = GLAForCausalLM(GLAConfig(hidden_size=64, num_hidden_layers=1, num_heads=2, vocab_size=len(tok) + 64))
    with torch.no_grad():
        model.lm_head.weight[len(tok):] = 50.0 * model.lm_head.weight[len(tok):].sign()
    return model.eval(), tok


def test_padding_ids_are_never_sampled_and_get_no_mass() -> None:
    n_valid = len(load_tokenizer(bundled_model_path()))
    srv = start_server(model_loader=_padded_model)
    try:
        for body in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"temperature": 0, "logprobs": 5}):
            r = httpx.post(srv.url + "/generate", timeout=60,
                           json={"prompt_token_ids": [5, 6, 7], "max_tokens": 8, "ignore_eos": True, **body})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["token_ids"] and all(0 <= t < n_valid for t in out["token_ids"]), out["token_ids"]
            assert all(lp <= 0 and math.isfinite(lp) for lp in out["logprobs"] or [])
            for alts in out.get("top_logprobs") or []:
                assert 1 <= len(alts) <= 5 and all(math.isfinite(v) for v in alts.values())  # keyed by text
    finally:
        srv.stop()
