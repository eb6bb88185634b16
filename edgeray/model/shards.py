"""Data locality: the corpus tokenized into one Parquet shard per topology node, plus a validation split.

    manifest = build_shards(topology, tokenizer, "runs/x/data", seq_len=128, non_iid=True)
    batch = read_shard("runs/x/data", "campus-gw")      # (N, seq_len + 1) int64: only that node's file

Samples are windows of ``seq_len + 1`` tokens (input + shifted target) cut from each document (a
``pydoc_data`` topic, ending in EOS). A seeded ``val_fraction`` of all windows is held out first. IID: the
rest are shuffled and dealt round-robin to the nodes. Non-IID: whole documents go to one region each
(contiguous blocks of topics, so regions see different subjects), then round-robin to that region's nodes.
Files: ``train/<node>.parquet`` (sample_id, doc, input_ids), ``validation.parquet``, ``manifest.json``; and,
for federated runs with many clients per node, ``clients/<k>/<node>/<i>.parquet`` (:func:`split_clients`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerFast

from edgeray.atomic import write_atomic
from edgeray.model.tokenizer import corpus_documents
from edgeray.topology import Topology

SCHEMA = pa.schema([("sample_id", pa.int64()), ("doc", pa.string()), ("input_ids", pa.list_(pa.int32()))])


def _windows(tokenizer: PreTrainedTokenizerFast, seq_len: int) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    for doc, text in corpus_documents().items():
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        for start in range(0, len(ids) - seq_len, seq_len):
            samples.append(
                {"sample_id": len(samples), "doc": doc, "input_ids": ids[start : start + seq_len + 1]}
            )
    return samples


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, path)


def build_shards(
    topology: Topology,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | Path,
    *,
    seq_len: int = 128,
    non_iid: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    nodes: list[str] | None = None,
) -> dict[str, Any]:
    """Write one training shard per node (default: every topology node) and the validation split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    nodes = nodes or [n.name for n in topology.iter_nodes()]
    out = Path(out_dir)
    samples = _windows(tokenizer, seq_len)
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    n_val = max(1, int(len(samples) * val_fraction))
    val = sorted(order[:n_val])
    train = order[n_val:]
    per_node: dict[str, list[int]] = {n: [] for n in nodes}
    if non_iid:
        regions: dict[str, list[str]] = {}
        for n in nodes:
            regions.setdefault(topology.nodes[n].region, []).append(n)
        docs = list(corpus_documents())
        names = list(regions)
        doc_region = {d: names[i * len(names) // len(docs)] for i, d in enumerate(docs)}
        dealt = {r: 0 for r in names}
        for i in sorted(train):
            region = doc_region[samples[i]["doc"]]
            members = regions[region]
            per_node[members[dealt[region] % len(members)]].append(i)
            dealt[region] += 1
    else:
        for k, i in enumerate(train):
            per_node[nodes[k % len(nodes)]].append(i)
    for node, idx in per_node.items():
        _write([samples[i] for i in sorted(idx)], out / "train" / f"{node}.parquet")
    _write([samples[i] for i in val], out / "validation.parquet")
    manifest = {
        "seq_len": seq_len,
        "non_iid": non_iid,
        "seed": seed,
        "val_fraction": val_fraction,
        "vocab_size": len(tokenizer),
        "samples": len(samples),
        "validation": len(val),
        "nodes": {n: len(idx) for n, idx in per_node.items()},
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def read_shard(data_dir: str | Path, node: str) -> torch.Tensor:
    """The training windows of ``node`` as (N, seq_len + 1) int64; reads only ``train/<node>.parquet``."""
    path = Path(data_dir) / "train" / f"{node}.parquet"
    if not path.exists():
        have = sorted(p.stem for p in (Path(data_dir) / "train").glob("*.parquet"))
        raise FileNotFoundError(f"{path}: no shard for node {node!r}; shards exist for {have}")
    return _tensor(pq.read_table(path, columns=["input_ids"]))


def client_shard_path(data_dir: str | Path, node: str, clients: int, index: int) -> Path:
    return Path(data_dir) / "clients" / str(clients) / node / f"{index}.parquet"


def split_clients(data_dir: str | Path, node: str, clients: int) -> list[Path]:
    """``node``'s shard cut into ``clients`` contiguous blocks (of sample ids: whole documents stay
    together, so the clients of a node see different documents), one Parquet file per virtual client,
    ``clients/<clients>/<node>/<i>.parquet``: written once (atomically), then reused."""
    if clients < 1:
        raise ValueError(f"clients = {clients}: must be >= 1")
    paths = [client_shard_path(data_dir, node, clients, i) for i in range(clients)]
    if all(p.exists() for p in paths):
        return paths
    source = Path(data_dir) / "train" / f"{node}.parquet"
    if not source.exists():
        read_shard(data_dir, node)  # raises, naming the shards there are
    rows = pq.read_table(source).to_pylist()
    if len(rows) < clients:
        raise ValueError(f"{source}: {len(rows)} windows cannot be split among {clients} clients (one each)")
    for i, path in enumerate(paths):
        lo, hi = i * len(rows) // clients, (i + 1) * len(rows) // clients
        _write(rows[lo:hi], path)
    return paths


def read_client_shard(data_dir: str | Path, node: str, clients: int, index: int) -> torch.Tensor:
    """Virtual client ``index`` of ``node``'s windows (see :func:`split_clients`); reads only its file."""
    return _tensor(pq.read_table(split_clients(data_dir, node, clients)[index], columns=["input_ids"]))


def read_validation(data_dir: str | Path) -> torch.Tensor:
    return _tensor(pq.read_table(Path(data_dir) / "validation.parquet", columns=["input_ids"]))


def _tensor(table: pa.Table) -> torch.Tensor:
    rows = table.column("input_ids").to_pylist()
    return torch.tensor(rows, dtype=torch.long) if rows else torch.empty((0, 0), dtype=torch.long)
