"""The tiny LLM pieces against independent references: tokenizer round trips, HF save/load + generate,
pipeline stages equal to the whole model (outputs and every gradient), per-node shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeray.model import build_model, corpus_documents, save_pretrained, train_tokenizer
from edgeray.model.presets import latest_checkpoint
from edgeray.model.shards import build_shards, read_shard, read_validation
from edgeray.model.stages import positions_from_mask, split_llama
from edgeray.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def test_tokenizer_is_deterministic_and_round_trips(tokenizer):
    again = train_tokenizer()
    assert tokenizer.get_vocab() == again.get_vocab()
    assert len(tokenizer) == 4096
    text = next(iter(corpus_documents().values()))[:2000]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.decode(tokenizer("naïve café 🚀")["input_ids"]) == "naïve café 🚀"  # byte-level: no UNK


def test_checkpoint_loads_in_transformers_and_generates(tokenizer, tmp_path):
    model = build_model("tiny", seed=0)
    path = save_pretrained(model, tokenizer, tmp_path / "ckpt")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = tok("def f(x):", return_tensors="pt")
    out = loaded.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|bos|>user"
    )
    save_pretrained(model, tokenizer, path)  # overwriting an existing checkpoint works too
    assert not list(tmp_path.glob(".ckpt*"))


def test_checkpoint_rotation_survives_leftovers_and_a_crash_between_renames(tokenizer, tmp_path):
    first, second = build_model("tiny", seed=0), build_model("tiny", seed=1)
    path = tmp_path / "ckpt"
    old = tmp_path / ".ckpt.old"
    assert latest_checkpoint(path) is None
    save_pretrained(first, tokenizer, path)
    # A leftover from an earlier crash (after the checkpoint was published) does not block the next save.
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"stale")
    save_pretrained(second, tokenizer, path)
    assert not old.exists() and latest_checkpoint(path) == path
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second.state_dict().items())
    # A crash between the two renames: the checkpoint is at .old only. Resume finds it, and the next save
    # publishes the new one and drops it.
    path.rename(old)
    assert latest_checkpoint(path) == old
    assert all(
        torch.equal(AutoModelForCausalLM.from_pretrained(old).state_dict()[k], v)
        for k, v in second.state_dict().items()
    )
    save_pretrained(first, tokenizer, path)
    assert latest_checkpoint(path) == path and not old.exists()


@pytest.mark.parametrize("boundaries", [[2], [1, 3], [1, 2, 3]])
def test_stages_equal_the_whole_model_in_outputs_and_gradients(boundaries):
    torch.manual_seed(0)
    ids = torch.randint(3, 4096, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, :7] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)

    reference = build_model("tiny", seed=1)
    ref_logits = reference(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    ref_loss = torch.nn.functional.cross_entropy(
        ref_logits[:, :-1].reshape(-1, 4096), labels[:, 1:].reshape(-1)
    )
    ref_loss.backward()

    model = build_model("tiny", seed=1)
    stages = split_llama(model, boundaries)
    hidden = stages[0](input_ids=ids, attention_mask=mask)
    for stage in stages[1:]:
        # What crosses a stage boundary is a detached copy, as it would be between actors.
        received = hidden.detach().requires_grad_(True)
        out = stage(hidden=received, attention_mask=mask)
        stage._received, stage._sent = received, hidden
        hidden = out
    loss = torch.nn.functional.cross_entropy(hidden[:, :-1].reshape(-1, 4096), labels[:, 1:].reshape(-1))
    loss.backward()
    for stage in reversed(stages[1:]):
        stage._sent.backward(stage._received.grad)
    assert (hidden - ref_logits).abs().max() <= 1e-5
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert (p.grad - ref_grads[name].grad).abs().max() <= 1e-5, name


def test_stage_boundaries_are_checked():
    model = build_model("tiny")
    with pytest.raises(ValueError, match="strictly increasing"):
        split_llama(model, [3, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        split_llama(model, [4])


@pytest.mark.parametrize("non_iid", [False, True])
def test_shards_partition_the_corpus_per_node(tokenizer, tmp_path, non_iid):
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    manifest = build_shards(topo, tokenizer, tmp_path, seq_len=64, non_iid=non_iid)
    ids_by_node = {n: pq.read_table(tmp_path / "train" / f"{n}.parquet").to_pydict() for n in topo.nodes}
    val = pq.read_table(tmp_path / "validation.parquet").to_pydict()
    seen = [i for rows in ids_by_node.values() for i in rows["sample_id"]]
    assert len(seen) == len(set(seen))  # no sample on two nodes
    assert not set(seen) & set(val["sample_id"])  # validation held out
    assert len(seen) + len(val["sample_id"]) == manifest["samples"]
    counts = [len(rows["sample_id"]) for rows in ids_by_node.values()]
    if non_iid:
        region_of_doc: dict[str, set[str]] = {}
        for node, rows in ids_by_node.items():
            for doc in rows["doc"]:
                region_of_doc.setdefault(doc, set()).add(topo.nodes[node].region)
        assert all(len(r) == 1 for r in region_of_doc.values())  # a document lives in one region
    else:
        assert max(counts) - min(counts) <= 1
    shard = read_shard(tmp_path, "campus-gw")
    assert shard.shape == (len(ids_by_node["campus-gw"]["sample_id"]), 65)
    assert shard.tolist() == ids_by_node["campus-gw"]["input_ids"]
    assert read_validation(tmp_path).shape[1] == 65
    with pytest.raises(FileNotFoundError, match="shards exist for"):
        read_shard(tmp_path, "mars")
