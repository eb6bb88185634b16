"""The bundled tiny model: built offline the first time it is asked for, then cached.

    path = bundled_model()          # $EDGERAY_HOME/models/tiny-v1, a Hugging Face directory

Serving needs a model when no checkpoint is given. No PyPI package ships causal-LM weights and there are no
hub downloads here, so edgeray trains one: its own tokenizer and the ``tiny`` preset, ``steps`` AdamW steps
on the Python docs corpus in one process (deterministic, ~30 s on 2 cores). It memorises that corpus: good
for exact-output checks, not for general text. Written atomically, so concurrent callers never see half.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import torch

from edgeray.model.presets import build_model, save_pretrained
from edgeray.model.shards import _windows
from edgeray.model.tokenizer import train_tokenizer

VERSION = "tiny-v1"


def bundled_model(home: str | Path | None = None, *, steps: int = 200, seed: int = 0) -> Path:
    """Path of the bundled model directory, training it first if it is not cached yet."""
    from edgeray.cluster import edgeray_home

    root = Path(home) if home else edgeray_home() / "models"
    path = root / VERSION
    if (path / "config.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then find it built
        if not (path / "config.json").exists():
            _build(path, steps=steps, seed=seed)
    return path


def _build(path: Path, *, steps: int, seed: int, seq_len: int = 64, batch: int = 16) -> None:
    tokenizer = train_tokenizer()
    rows = torch.tensor([s["input_ids"] for s in _windows(tokenizer, seq_len)])
    model = build_model("tiny", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        chunk = rows[order[(step * batch + torch.arange(batch)) % len(rows)]]
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_pretrained(model, tokenizer, path)
