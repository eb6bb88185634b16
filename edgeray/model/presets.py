"""Tiny Llama presets (transformers ``LlamaForCausalLM`` built from a config) and atomic HF checkpoints.

| preset | layers | hidden | heads (kv) | head dim | params (vocab 4096, untied) |
|---|---|---|---|---|---|
| tiny | 4 | 128 | 4 (2) | 32 | 2.0 M |
| tiny-8l | 8 | 128 | 4 (2) | 32 | 2.8 M |
| small | 8 | 256 | 8 (4) | 32 | 8.9 M |

Head dims are ones vLLM's CPU backend accepts (32/64/80/96/112/128). Embeddings are untied so that the
first and the last pipeline stage own disjoint parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from edgeray.atomic import latest_dir, write_dir_atomic


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 4096
    max_position_embeddings: int = 512

    def config(self) -> LlamaConfig:
        return LlamaConfig(  # type: ignore[call-arg]
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="eager",
        )


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("tiny", 128, 512, 4, 4, 2),
        ModelPreset("tiny-8l", 128, 512, 8, 4, 2),
        ModelPreset("small", 256, 1024, 8, 8, 4),
    )
}


def build_model(preset: str | ModelPreset = "tiny", *, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model; the same preset and seed give the same weights."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; presets are {sorted(PRESETS)}")
        preset = PRESETS[preset]
    torch.manual_seed(seed)
    return LlamaForCausalLM(preset.config())


def save_pretrained(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    path: str | Path,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save model (safetensors), tokenizer, generation config and chat template as a Hugging Face
    directory without ever exposing a half-written one: it is written beside ``path`` and renamed into
    place (a crash between the two renames leaves the previous checkpoint complete at ``.<name>.old``, which
    :func:`latest_checkpoint` finds; a leftover ``.old`` never blocks a later save). Files are fsynced
    before the rename."""

    def fill(tmp: Path) -> None:
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
            max_new_tokens=64,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)  # e.g. optimizer states, inside the same atomic directory

    return write_dir_atomic(path, fill)


def latest_checkpoint(path: str | Path) -> Path | None:
    """The last complete checkpoint saved at ``path`` by :func:`save_pretrained` (see
    :func:`edgeray.atomic.latest_dir`)."""
    return latest_dir(path)
