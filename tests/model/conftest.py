"""Tiny random GLA checkpoints built on the fly (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from model import GLAConfig, GLAForCausalLM

VOCAB = 96


def tiny_config(**overrides) -> GLAConfig:
    kw = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB, expand_k=0.5, expand_v=1.0)
    kw.update(overrides)
    return GLAConfig(**kw)


def tiny_model(seed: int = 0, **overrides) -> GLAForCausalLM:
    torch.manual_seed(seed)
    model = GLAForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # norms start at 1 and the gate bias at 0: randomise so tests see them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("gate.weight") or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tokenizer(path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz .,!?"):
        vocab[ch] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(str(path))


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    model = tiny_model()
    model.save_pretrained(str(tmp_path))
    save_tokenizer(tmp_path)
    return tmp_path
