"""GLA language model runtime: fla-hub-compatible GLAForCausalLM, state pool, loader, bundled model."""

from transformers import AutoConfig, AutoModelForCausalLM

from model.config import GLAConfig
from model.loader import bundled_model_path, load_checkpoint, load_model, load_tokenizer
from model.modeling import GLAForCausalLM, GLAModel
from model.state import StatePool, state_bytes_per_sequence

AutoConfig.register("gla", GLAConfig, exist_ok=True)
AutoModelForCausalLM.register(GLAConfig, GLAForCausalLM, exist_ok=True)

__all__ = [
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "StatePool",
    "bundled_model_path",
    "load_checkpoint",
    "load_model",
    "load_tokenizer",
    "state_bytes_per_sequence",
]
