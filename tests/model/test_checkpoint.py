"""Checkpoint compatibility: round trips, fla-hub legacy layouts, strict name checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from model import GLAConfig, GLAForCausalLM, load_checkpoint
from tests.model.conftest import VOCAB, save_tokenizer, tiny_model

IDS = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(0))


def logits(model: GLAForCausalLM) -> torch.Tensor:
    return model(IDS).logits.detach()


def assert_same_logits(a: GLAForCausalLM, b: GLAForCausalLM) -> None:
    """Equal weights, equal logits up to the CPU GEMMs' rounding: a bit-exact comparison of the
    logits failed once after other tests in the same process (values equal to four digits) and
    passed on rerun, so exactness is checked on the weights instead
    (`test_save_pretrained_from_pretrained_round_trip`)."""
    torch.testing.assert_close(logits(a), logits(b), rtol=1e-5, atol=1e-6)


def test_save_pretrained_from_pretrained_round_trip(checkpoint_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir))
    tok = AutoTokenizer.from_pretrained(str(checkpoint_dir))
    assert isinstance(model, GLAForCausalLM)
    ref = tiny_model()
    got, want = model.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert_same_logits(model, ref)
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True).replace(" ", "") == "helloworld"


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model = tiny_model(use_short_conv=True, num_kv_heads=2)
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_logits(load_checkpoint(tmp_path), model)


def test_tied_embeddings_have_no_lm_head_in_the_file(tmp_path: Path) -> None:
    model = tiny_model(tie_word_embeddings=True)
    model.save_pretrained(str(tmp_path))
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = load_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embeddings.weight
    assert_same_logits(loaded, model)


def test_legacy_fla_hub_layout_gives_the_same_logits(tmp_path: Path) -> None:
    """March-2024 format: fused gate_proj [2I, d], `embed_tokens`, attn_mode fused_chunk, rms_norm_eps."""
    model = tiny_model()
    model.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    legacy = {}
    for name, t in state.items():
        if name.endswith("mlp.up_proj.weight"):
            continue
        if name.endswith("mlp.gate_proj.weight"):
            t = torch.cat([t, state[name.replace("gate_proj", "up_proj")]], dim=0)
        legacy[name.replace("model.embeddings.", "model.embed_tokens.")] = t.contiguous()
    save_file(legacy, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("norm_eps")
    cfg.update(attn_mode="fused_chunk", rms_norm_eps=1e-6)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_checkpoint(tmp_path)
    assert loaded.config.attn_mode == "chunk"
    assert_same_logits(loaded, model)


def test_hybrid_attention_config_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`attn`"):
        GLAForCausalLM(GLAConfig(hidden_size=64, num_hidden_layers=2, attn={"layers": [1], "num_heads": 4}))
    tiny_model().save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["attn"] = {"layers": [1], "num_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="`attn`"):
        load_checkpoint(tmp_path)


def test_missing_and_unexpected_names_are_listed(tmp_path: Path) -> None:
    tiny_model().save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.attn.gk_proj.1.bias"]
    state["model.layers.0.attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path)
    assert "model.layers.1.attn.gk_proj.1.bias" in str(err.value)
    assert "model.layers.0.attn.extra.weight" in str(err.value)


def test_parameter_names_are_fla_hub_names() -> None:
    names = set(tiny_model().state_dict())
    for n in [
        "model.embeddings.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.attn_norm.weight", "model.layers.0.mlp_norm.weight",
        "model.layers.0.attn.q_proj.weight", "model.layers.0.attn.k_proj.weight",
        "model.layers.0.attn.v_proj.weight", "model.layers.0.attn.g_proj.weight",
        "model.layers.0.attn.gk_proj.0.weight", "model.layers.0.attn.gk_proj.1.weight",
        "model.layers.0.attn.gk_proj.1.bias", "model.layers.0.attn.o_proj.weight",
        "model.layers.0.attn.g_norm_swish_gate.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
    ]:
        assert n in names, n


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
