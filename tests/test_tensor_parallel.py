"""Tensor parallelism (edgeray.train.tensor_parallel) against the unsplit model: the shards' outputs and every
gradient equal the whole model's (<= 1e-5), in one process over an exact in-memory group (degrees 1, 2, 4;
4 copies the tiny preset's 2 key/value heads) and over the fabric on two nodes of a region, where the
ledger holds the all-reduces Megatron's scheme implies and training follows single-process AdamW."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from edgeray.model.presets import PRESETS, build_model
from edgeray.train.tensor_parallel import (
    TensorParallel,
    TPError,
    gather_state,
    shard_llama,
    shard_state,
    sync_replicated_grads,
    unsplit_name,
)

from .conftest import assert_clean


class ThreadGroup:
    """Ranks as threads of this process; all-reduce sums every rank's tensor in rank order, so every rank
    gets the same bits (as the fabric's ring all-reduce does)."""

    def __init__(self, n: int) -> None:
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n, timeout=60)

    def comm(self, rank: int):
        group = self

        class Comm:
            world_size = group.n

            def __init__(self) -> None:
                self.rank = rank

            def allreduce(self, t: torch.Tensor) -> None:
                group.slots[rank] = t.clone()
                group.barrier.wait()
                total = group.slots[0].clone()
                for s in group.slots[1:]:
                    total += s
                group.barrier.wait()
                t.copy_(total)

        return Comm()


def run_ranks(degree: int, fn):
    group, out, errors = ThreadGroup(degree), [None] * degree, []

    def work(rank: int) -> None:
        try:
            out[rank] = fn(rank, group.comm(rank))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(degree)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out


def lm_loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    ), logits


@pytest.fixture(scope="module")
def whole():
    model = build_model("tiny", seed=0)
    batch = torch.randint(0, model.config.vocab_size, (3, 33), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    loss, logits = lm_loss(ref, batch)
    loss.backward()
    return model, batch, loss.detach(), logits.detach(), {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_shards_give_the_whole_models_outputs_and_gradients(whole, degree):
    model, batch, ref_loss, ref_logits, ref_grads = whole

    def rank_fn(rank, comm):
        m = shard_llama(copy.deepcopy(model), rank, degree, comm)
        loss, logits = lm_loss(m, batch)
        loss.backward()
        sync_replicated_grads(m)
        return loss.detach(), logits.detach(), {unsplit_name(n): p.grad for n, p in m.named_parameters()}

    outs = run_ranks(degree, rank_fn)
    for loss, logits, _ in outs:
        assert float(loss) == pytest.approx(float(ref_loss), abs=1e-5)
        assert (logits - ref_logits).abs().max() <= 1e-5
    grads = gather_state([g for _, _, g in outs], model.config, degree)  # also checks copies are equal
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-5, name
    if degree > 1:  # the shards really are split: each rank holds 1/degree of every attention/MLP matrix
        part = shard_state(dict(model.named_parameters()), model.config, 1, degree)
        assert (
            part["model.layers.0.mlp.down_proj.weight"].shape[1] == model.config.intermediate_size // degree
        )
        assert part["model.layers.0.self_attn.q_proj.weight"].shape[0] == model.config.hidden_size // degree


def test_degree_4_inside_pipeline_stages_gives_the_whole_models_gradients(whole):
    """Split into TP shards, then into pipeline stages (the stages hold the sharded layers): chaining each
    rank's stages gives the whole model's logits and, gathered, its gradients."""
    from edgeray.model.stages import split_llama

    model, batch, _, ref_logits, ref_grads = whole

    def rank_fn(rank, comm):
        m = shard_llama(copy.deepcopy(model), rank, 4, comm)
        first, last = split_llama(m, [2])
        mask = torch.ones(batch.shape[0], batch.shape[1] - 1, dtype=torch.long)
        hidden = first(input_ids=batch[:, :-1], attention_mask=mask)
        received = hidden.detach().requires_grad_(True)  # what crosses to the next stage
        logits = last(hidden=received, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        hidden.backward(received.grad)
        sync_replicated_grads(m)
        return logits.detach(), {unsplit_name(n): p.grad for n, p in m.named_parameters()}

    outs = run_ranks(4, rank_fn)
    assert all((logits - ref_logits).abs().max() <= 1e-5 for logits, _ in outs)
    grads = gather_state([g for _, g in outs], model.config, 4)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-5, name


def test_shard_and_gather_round_trip(whole):
    model = whole[0]
    full = {n: p.detach() for n, p in model.named_parameters()}
    for degree in (2, 4):
        parts = [shard_state(full, model.config, r, degree) for r in range(degree)]
        back = gather_state(parts, model.config, degree)
        assert all(torch.equal(back[n], t) for n, t in full.items())


def test_a_degree_the_model_cannot_be_split_by_is_refused_by_name():
    config = PRESETS["tiny"].config()
    with pytest.raises(TPError, match=r"degree 3: .*num_attention_heads=4.*valid degrees: \[1, 2, 4\]"):
        shard_llama(build_model("tiny"), 0, 3, ThreadGroup(3).comm(0))
    assert config.num_attention_heads == 4


@pytest.mark.cluster
def test_two_nodes_of_a_region_train_as_the_whole_model_over_the_fabric(local_cluster):
    topo, _ = local_cluster
    nodes = [n.name for n in topo.regions["campus"].nodes][:2]
    model = build_model("tiny", seed=0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, model.config.vocab_size, (2, 33)) for _ in range(3)]
    with pytest.raises(TPError, match="span regions"):
        TensorParallel(topo, [nodes[0], topo.regions["cloud"].nodes[0].name])
    with TensorParallel(topo, nodes, seed=0, lr=0.5, optimizer="sgd") as tp:
        got = tp.gradients(batches[0])
        loss, logits = lm_loss(model, torch.from_numpy(batches[0]))
        loss.backward()
        assert got["loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert np.abs(got["logits"] - logits.detach().numpy()).max() <= 1e-5
        for name, p in model.named_parameters():
            assert (got["grads"][name] - p.grad).abs().max() <= 1e-5, name
        # Megatron's scheme: one all-reduce per attention and per MLP block forward, one each backward, of
        # the (batch, T, hidden) activations; two ranks swap them once (each rank sends the whole tensor)
        rows = tp.rows()
        activation = 2 * 32 * model.config.hidden_size * 4
        per_step = 4 * model.config.num_hidden_layers * 2 * activation
        assert sum(r["bytes"] for r in rows) == per_step
        assert {r["link_class"] for r in rows} == {"intra-region"}
        # training: the same trajectory as single-process SGD on the same batches (SGD: AdamW's division by
        # sqrt(v) would turn summation-order rounding of a near-zero gradient into a visible weight change)
        model.zero_grad(set_to_none=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for batch in batches:
            step = tp.train_step(batch)
            opt.zero_grad()
            loss, _ = lm_loss(model, torch.from_numpy(batch))
            loss.backward()
            opt.step()
            assert step["loss"] == pytest.approx(loss.item(), abs=1e-5)
            assert step["clock"] > 0
        state = tp.state()
        for name, p in model.named_parameters():
            assert (state[name] - p.detach()).abs().max() <= 1e-5, name
    assert_clean()
