"""The bundled tiny model's data pipeline, tokenizer, chat template and training script (CPU, no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from model import bundled_model_path, load_model
from model.data_prep import (
    ASSISTANT_NAME,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    USER_NAME,
    clean,
    dialogue_excerpts,
    encode_docs,
    play_pieces,
    save_tokenizer,
    split_names,
    train_tokenizer,
)
from model.train_tiny import main as train_main
from model.train_tiny import targets

PLAY = """THE TRAGEDY OF TESTS

ACT I.

[Enter Ham and Hor.]

Ham.
Who's there?

Hor.
Nay, answer me: stand, and unfold yourself.

Ham.
Long live the king!

Hor.
Bernardo?
He.

Ham.
You come most carefully upon your hour.

Hor.
'Tis now struck twelve.
Get thee to bed.

[Exit Hor. Enter Mar.]

MAR
Have you had quiet guard?
Not a mouse stirring.

MAR
Well, good night.
If you do meet Horatio.

Ham.
I think I hear them.
Stand, ho! Who is there?

MAR
Friends to this ground.
And liegemen to the Dane.
"""


def test_clean_normalises_speakers() -> None:
    text = clean(PLAY)
    assert "HAM.\nWho's there?" in text
    assert "MAR.\nHave you had quiet guard?" in text  # a name without its full stop gets one
    assert "HOR.\nNay, answer me" in text
    assert "\n\n\n" not in text and text.endswith("Dane.\n")
    assert "[Enter Ham and Hor.]" in text


def test_dialogue_excerpts_alternate_and_end_with_assistant() -> None:
    convs = dialogue_excerpts(PLAY, random.Random(0))
    assert convs, "the HAM/HOR exchange must give at least one excerpt"
    for conv in convs:
        assert len(conv) % 2 == 0
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
    assert convs[0][0]["content"] == "Who's there?"


def test_split_holds_out_whole_files() -> None:
    names = [f"play_{i:02d}" for i in range(42)]
    train, val = split_names(list(reversed(names)))
    assert val == ["play_05", "play_15", "play_25", "play_35"]
    assert not set(train) & set(val) and len(train) + len(val) == 42


def test_play_pieces_cut_at_speeches() -> None:
    text = clean(PLAY * 20)
    pieces = play_pieces(text, random.Random(0))
    assert len(pieces) > 1 and "\n\n".join(pieces).rstrip("\n") == text.rstrip("\n")
    for p in pieces[1:]:
        assert p.split("\n", 1)[0].rstrip(".").isupper()


def test_bundled_tokenizer_and_chat_template() -> None:
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (BOS_ID, EOS_ID, PAD_ID, 0)
    assert len(tok) == 4096
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] and (path / "special_tokens_map.json").is_file()
    text = "HAMLET.\nTo be, or not to be: that is the question.\n\n"
    ids = tok(text).input_ids
    assert ids[0] == BOS_ID and tok.decode(ids, skip_special_tokens=True) == text
    assert tok("x\n\n").input_ids[-2:] == tok("\n").input_ids[-1:] * 2  # newlines stay single tokens
    msgs = [
        {"role": "system", "content": "A heath."},
        {"role": "user", "content": "What is love?"},
        {"role": "assistant", "content": "A smoke."},
        {"role": "user", "content": "And death?"},
    ]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        f"<s>[A heath.]\n\n{USER_NAME}.\nWhat is love?\n\n{ASSISTANT_NAME}.\nA smoke.</s>\n\n"
        f"{USER_NAME}.\nAnd death?\n\n{ASSISTANT_NAME}.\n"
    )
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids.count(BOS_ID) == 1 and ids.count(EOS_ID) == 1
    with pytest.raises(Exception, match="roles"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_bundled_model_loads_and_is_small() -> None:
    path = bundled_model_path()
    assert sum(f.stat().st_size for f in path.iterdir()) <= 30 * 2**20
    model, tok = load_model()
    cfg = model.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id) == (len(tok), BOS_ID, EOS_ID)
    ids = torch.tensor([tok("ROMEO.\nBut soft").input_ids])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


def test_targets_mask_document_starts() -> None:
    x = torch.tensor([[5, BOS_ID, 7, EOS_ID]])
    assert targets(x).tolist() == [[5, -100, 7, EOS_ID]]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A miniature model.data_prep output built from the test play (no download)."""
    text = clean(PLAY) * 30
    convs = dialogue_excerpts(PLAY, random.Random(0))
    tok = train_tokenizer([text], vocab_size=300)
    chat = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    out = tmp_path / "prepared"
    save_tokenizer(tok, out / "tokenizer")
    docs = [(p, "piece") for p in play_pieces(text, random.Random(0))] + [(c, "chat") for c in chat]
    torch.save(encode_docs(tok, docs), out / "train.pt")
    torch.save(encode_docs(tok, [(text, "play")]), out / "val.pt")
    torch.save(encode_docs(tok, [(c, "chat") for c in chat * 10]), out / "val_chat.pt")
    (out / "meta.json").write_text(json.dumps({"source": "test"}))
    return out


def test_training_runs_and_saves_a_loadable_model(prepared: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "model", tmp_path / "log.json"
    train_main([
        "--data", str(prepared), "--out", str(out), "--log", str(log), "--device", "cpu",
        "--max-steps", "2", "--batch", "2", "--ctx", "64", "--eval-batch", "4", "--val-windows", "4",
        "--sample-tokens", "4", "--warmup", "1",
    ])
    result = json.loads(log.read_text())
    assert result["result"]["steps"] == 2 and len(result["history"]) == 2
    assert result["result"]["val_loss"] < 9 and result["samples"]["chat"].get("text") is not None
    model, tok = load_model(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<s>")
    assert model.config.num_hidden_layers == 6
