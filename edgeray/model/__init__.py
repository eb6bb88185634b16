"""The tiny LLM: presets, an offline BPE tokenizer, per-node Parquet shards, and stage splitting.

from edgeray.model import build_model, train_tokenizer, save_pretrained
tok = train_tokenizer()              # byte-level BPE on text that ships with Python, deterministic
model = build_model("tiny", seed=0)  # transformers LlamaForCausalLM from a config (no downloads)
save_pretrained(model, tok, "runs/x/checkpoint")   # HF directory, written atomically
"""

from edgeray.model.presets import PRESETS, ModelPreset, build_model, save_pretrained
from edgeray.model.tokenizer import corpus_documents, train_tokenizer

__all__ = ["PRESETS", "ModelPreset", "build_model", "corpus_documents", "save_pretrained", "train_tokenizer"]
