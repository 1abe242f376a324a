"""Load fla-hub GLA checkpoints (and our own saves) from a local directory, strictly.

We read safetensors ourselves instead of relying on transformers' loader because fla-hub's 2024
uploads need conversions no load hook performs (spec §3.3): the fused `mlp.gate_proj` [2I, d],
`embed_tokens` before it was renamed, and an absent lm_head when embeddings are tied. Every
checkpoint name must be used and every parameter filled, or loading fails with the lists.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import GLAConfig
from model.modeling import GLAForCausalLM

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
_PROGRESS_MIN_BYTES = 256 * 2**20


def bundled_model_path() -> Path:
    return BUNDLED_DIR


def resolve_model_path(path: str | Path | None) -> Path:
    p = Path(path) if path is not None else BUNDLED_DIR
    if not p.is_dir():
        raise FileNotFoundError(f"model directory {str(p)!r} does not exist (expected config.json + safetensors)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}/config.json not found")
    return p


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {path}; convert .bin checkpoints to safetensors"
    )


def convert_state_dict(state: dict[str, torch.Tensor], config: GLAConfig) -> dict[str, torch.Tensor]:
    """Map legacy fla-hub names and layouts onto the current ones (spec §3.3)."""
    out: dict[str, torch.Tensor] = {}
    inter = config.mlp_intermediate_size
    for name, t in state.items():
        if name == "model.embed_tokens.weight":  # renamed to `embeddings` in March 2024
            name = "model.embeddings.weight"
        if name.endswith("mlp.gate_proj.weight") and t.shape[0] == 2 * inter:
            up_name = name.replace("gate_proj", "up_proj")
            if up_name in state:
                raise ValueError(f"{name} has the fused [2I, d] shape but {up_name} also exists")
            # the fused layout: rows [0, I) are the gate, rows [I, 2I) are up
            out[name], out[up_name] = t[:inter], t[inter:]
            continue
        out[name] = t
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _read_tensors(files: list[Path], device: str) -> dict[str, torch.Tensor]:
    total = sum(f.stat().st_size for f in files)
    show = total >= _PROGRESS_MIN_BYTES and sys.stderr.isatty()
    done, t0, state = 0, time.perf_counter(), {}
    for f in files:
        with safe_open(str(f), framework="pt", device=device) as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                state[name] = t
                done += t.numel() * t.element_size()
                if show:
                    print(
                        f"\rloading weights {done / 2**30:6.2f} / {total / 2**30:.2f} GiB "
                        f"({time.perf_counter() - t0:.1f}s)",
                        end="",
                        file=sys.stderr,
                    )
    if show:
        print(file=sys.stderr)
    return state


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    config: GLAConfig | None = None,
) -> GLAForCausalLM:
    """Build a GLAForCausalLM from a local directory; fails listing missing/unexpected names."""
    p = resolve_model_path(path)
    config = config if isinstance(config, GLAConfig) else GLAConfig.from_pretrained(str(p))
    config.validate_supported()
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype is None or dtype == "auto":
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    state = convert_state_dict(_read_tensors(_weight_files(p), "cpu"), config)
    with torch.device("meta"):
        model = GLAForCausalLM(config)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=True)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {p} does not match GLAForCausalLM: missing {missing}, unexpected {unexpected}")
    params = dict(model.named_parameters(remove_duplicate=True))
    for name, t in state.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(params[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embeddings.weight
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model.fuse_for_inference()  # after the move: one GEMM per layer for q|k|v|g|gk, one for gate|up


def load_tokenizer(path: str | Path | None):
    """The checkpoint's HF tokenizer, or None when the directory ships none."""
    from transformers import AutoTokenizer

    p = resolve_model_path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(str(p))


def load_model(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
):
    """(model, tokenizer) from `path`, or from the bundled tiny model when path is None."""
    p = resolve_model_path(path)
    return load_checkpoint(p, dtype=dtype, device=device), load_tokenizer(p)
