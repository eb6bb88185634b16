"""Mixture-of-Experts: routing and the load-balancing loss by hand, the model against transformers' Mixtral,
and experts spread over a real labelled cluster against all experts in one process."""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import Counter

import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import MixtralForCausalLM

from edgeray.fabric.groups import live_keys
from edgeray.model.shards import read_shard
from edgeray.topology import load_topology, resolve_topology_path
from edgeray.train.moe import (
    LocalExperts,
    MoEConfig,
    MoEError,
    MoEFleet,
    MoERouting,
    build_moe_model,
    load_balancing_loss,
    moe_loss,
    plan_experts,
    route,
    train_moe,
)
from edgeray.train.sync import prepare_data

from .conftest import assert_clean, submit_job, submit_twice_at_once


def test_load_balancing_loss_matches_a_hand_computed_example():
    # 4 tokens, 2 experts, top-1. Probabilities of expert 1: .75, .75, .75, .25 -> P = (.375, .625);
    # selections: expert 1 three times, expert 0 once -> f = (.25, .75); loss = 2 (.25 .375 + .75 .625) = 1.125
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [0.0, ln3], [0.0, ln3], [ln3, 0.0]])
    r = route(logits, 1)
    assert r.indices.flatten().tolist() == [1, 1, 1, 0]
    assert load_balancing_loss([r], 2).item() == pytest.approx(1.125)
    # perfectly balanced routing costs exactly 1
    balanced = route(torch.tensor([[0.0, ln3], [ln3, 0.0]]), 1)
    assert load_balancing_loss([balanced], 2).item() == pytest.approx(1.0)


def test_routing_respects_capacity_keeps_the_strongest_and_counts_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 2
    free = route(logits, 2)
    capped = route(logits, 2, capacity=20)
    for e in range(4):
        mine = (capped.indices == e) & capped.kept
        assert int(mine.sum()) <= 20
        chosen = (free.indices == e).sum()
        if chosen > 20:  # the kept ones are the expert's highest-weight assignments
            kept_w = capped.weights[mine].min()
            lost_w = capped.weights[(capped.indices == e) & ~capped.kept].max()
            assert kept_w >= lost_w
    assert (
        capped.dropped
        == int((~capped.kept).sum())
        == sum(max(0, int((free.indices == e).sum()) - 20) for e in range(4))
    )
    # overflow to the local expert: nothing dropped unless the token already uses it
    local = route(logits, 2, capacity=20, overflow="local", local_expert=3)
    assert local.fallback > 0 and local.dropped + local.fallback == capped.dropped
    assert all(len(set(row.tolist())) == 2 for row in local.indices[local.kept.all(dim=1)])


def test_locality_penalty_and_dead_experts_steer_the_selection():
    torch.manual_seed(1)
    logits = torch.randn(32, 4)
    near = route(logits, 2, penalty=torch.tensor([0.0, 0.0, 100.0, 100.0]))
    assert set(near.indices.flatten().tolist()) == {0, 1}
    alive = torch.tensor([True, False, True, True])
    rerouted = route(logits, 2, alive=alive)
    assert 1 not in rerouted.indices.flatten().tolist()
    assert torch.allclose(rerouted.weights.sum(dim=1), torch.ones(32))
    with pytest.raises(MoEError, match="every expert is dead"):
        route(logits, 2, alive=torch.zeros(4, dtype=torch.bool))


def test_the_moe_model_is_transformers_mixtral():
    config = MoEConfig()
    reference = build_moe_model(config)
    ours = copy.deepcopy(reference)
    MoERouting(config, None, LocalExperts(ours)).install(ours).eval()
    ids = torch.randint(3, 4096, (2, 19))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


def test_experts_are_spread_over_regions_nearest_first():
    topo = load_topology(resolve_topology_path("local"))
    plan = plan_experts(topo, 6, "campus-gw")
    assert plan.nodes[0] == "campus-gw" and plan.distance[0] == 0.0
    assert sorted(plan.regions) == ["campus", "campus", "cloud", "cloud", "metro", "metro"]
    assert len(set(plan.nodes)) == 6 and max(plan.distance) == 1.0
    assert plan_experts(topo, 8, "metro-mec-1").regions[:3] == ("metro", "campus", "cloud")
    with pytest.raises(MoEError, match="nowhere"):
        plan_experts(topo, 4, "nowhere")
    replicated = plan_experts(topo, 6, "campus-gw", replicas=2)
    for e in range(6):
        home, (standby,) = replicated.nodes[e], replicated.standbys[e]
        assert topo.nodes[standby].region != topo.nodes[home].region  # another region first
    with pytest.raises(MoEError, match="replicas = 7"):
        plan_experts(topo, 6, "campus-gw", replicas=7)
    # every actor (the trunk too) declares its threads' CPUs: no node is given more than it offers
    for replicas, threads in ((1, 1), (2, 1), (1, 2)):
        p = plan_experts(topo, 6, "campus-gw", replicas=replicas, threads=threads)
        held = Counter([p.trunk, *(n for e in range(6) for n in p.replica_nodes(e))])
        assert all(held[n] * threads <= topo.nodes[n].cpus for n in held), (replicas, threads, held)
    with pytest.raises(MoEError, match=r"6 experts x 3 replicas with 2 CPU\(s\) each do not fit"):
        plan_experts(topo, 6, "campus-gw", replicas=3, threads=2)


# ---------------------------------------------------------------------------------------------- on a cluster
@pytest.fixture(scope="module")
def fleet(local_cluster, tmp_path_factory):
    topo, state = local_cluster
    data = prepare_data(topo, tmp_path_factory.mktemp("data"), seq_len=32)
    yield topo, data, state
    assert_clean()


def _single_process(config: MoEConfig, plan, alive=None):
    model = build_moe_model(config)
    routing = MoERouting(config, plan, LocalExperts(model))
    routing.install(model)
    if alive is not None:
        routing.alive = torch.tensor(alive)
    return model, routing


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_experts_on_actors_equal_all_experts_in_one_process(fleet):
    topo, data, _ = fleet
    # capacity binds and the bias is on, so dropping and steering run in both
    config = MoEConfig(batch_size=4, capacity_factor=1.0, locality_bias=1.0)
    plan = plan_experts(topo, config.experts, "campus-gw")
    moe = MoEFleet(config, topo, plan, data, progress=lambda m: None)
    try:
        result = moe.train_step(0, apply=False)
        trunk_grads = ray.get(moe.trunk.grads.remote(), timeout=60)
        expert_grads = ray.get([x.grads.remote() for x in moe.experts], timeout=60)
    finally:
        moe.close()
    batch = read_shard(data, "campus-gw")[list(range(config.batch_size))]
    model, routing = _single_process(config, plan)
    model.train()
    lm, aux = moe_loss(model, routing, batch)
    (lm + config.aux_loss_coef * aux).backward()
    assert result["loss"] == pytest.approx(lm.item(), abs=1e-5)
    assert result["aux_loss"] == pytest.approx(aux.item(), abs=1e-5)
    assert result["dropped"] == sum(r.dropped for r in routing.routings) > 0
    reference = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in trunk_grads.items():
        assert torch.allclose(grad, reference[name], atol=1e-5), name
    for i, (gate_up, down) in enumerate(routing.dispatcher.weights):  # the reference's expert tensors
        for e, g in enumerate(expert_grads):
            assert torch.allclose(g["gate_up"][i], gate_up.grad[e], atol=1e-5), (i, e)
            assert torch.allclose(g["down"][i], down.grad[e], atol=1e-5), (i, e)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_expert_during_inference_its_tokens_go_to_the_survivors(fleet):
    topo, data, _ = fleet
    config = MoEConfig(batch_size=4)
    plan = plan_experts(topo, config.experts, "campus-gw")
    moe = MoEFleet(config, topo, plan, data, progress=lambda m: None)
    prompt = read_shard(data, "campus-gw")[0, :12].tolist()
    try:
        before = moe.generate(prompt, 6)
        ray.kill(moe.experts[4], no_restart=True)  # a metro expert, mid-deployment
        after = moe.generate(prompt, 6)
        alive = list(moe.alive)
    finally:
        moe.close()
    assert alive == [True, True, True, True, False, True]
    assert after["expert_load"][4] == 0 and len(after["tokens"]) == 6
    # the rerouted answer is exactly the single-process model's with that expert masked out
    for alive, got in (([True] * 6, before), ([True, True, True, True, False, True], after)):
        model, _ = _single_process(config, plan, alive)
        model.eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(6):
                ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        assert ids[0, len(prompt) :].tolist() == got["tokens"]


def test_resume_refuses_a_directory_without_a_checkpoint_or_of_another_run(tmp_path):
    """Checked before any actor starts."""
    topo = load_topology(resolve_topology_path("local"))
    with pytest.raises(MoEError, match=r"resume: no checkpoint at .*checkpoint \(trainer_state.json missing"):
        train_moe(MoEConfig(), topo, data_dir=tmp_path, out=tmp_path, steps=4, resume=True)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.json").write_text('{"step": 2}')
    (tmp_path / "config.json").write_text('{"moe": {"lr": 0.5}}')
    with pytest.raises(MoEError, match=r"other settings \(moe\..*moe\.lr.*, plan, topology_digest differ\)"):
        train_moe(MoEConfig(), topo, data_dir=tmp_path, out=tmp_path, steps=4, resume=True)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_restarts_from_the_last_checkpoint_after_an_expert_dies_and_resume_continues_it(
    fleet, tmp_path
):
    topo, data, _ = fleet
    # three experts, one per region (routing crosses regions): five runs of a full fleet of six would start
    # 35 actor processes
    config = MoEConfig(batch_size=4, experts=3)
    drill = train_moe(
        config, topo, data_dir=data, out=tmp_path / "drill", steps=4, checkpoint_every=2,
        kill_expert_at=(3, 1), progress=lambda m: None,
    )  # fmt: skip
    # the death is found before the step or inside it (timing): either way, expert 1's actor, at step 3
    [restart] = drill["restarts"]
    assert (restart["at_step"], restart["resumed_from"]) == (3, 2)
    assert "expert actors (expert, replica) [(1, 0)]" in restart["error"]
    # the same run without the failure, as `ray job submit` of jobs/train_moe.py, twice at once on the cluster
    # (as tests/test_jobs.py does for the other jobs: each run's groups are its own, and they train the same
    # model side by side)
    job = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--experts", "3", "--data", str(data)]
    out, twin = tmp_path / "clean", tmp_path / "twin"
    for code, log in submit_twice_at_once(
        "train_moe", [[*job, "--out", str(out)], [*job, "--out", str(twin)]]
    ):
        assert code == 0, log[-3000:]
    clean = json.loads((out / "summary.json").read_text())
    # its energy (edgeray.energy): the trunk's and every expert's node, up for the run's modelled time and
    # busy for the work their fabric charged, at the topology's idle and busy watts
    trunk = json.loads((out / "config.json").read_text())["plan"]["trunk"]
    bill = clean["energy"]
    assert set(bill["by_node"]) == {trunk, *clean["expert_nodes"]}
    for name, row in bill["by_node"].items():
        power = topo.nodes[name].power
        assert row["wall_s"] == pytest.approx(clean["modelled_s"]) and 0 < row["busy_s"] < row["wall_s"], name
        want = power.idle_w * (row["wall_s"] - row["busy_s"]) + power.busy_w * row["busy_s"]
        assert row["joules"] == pytest.approx(want), name
    assert bill["per_step"]["joules"] == pytest.approx(bill["joules"] / 4)
    losses = [
        pq.read_table(d / "metrics.parquet").column("loss").to_pylist()
        for d in (tmp_path / "drill", out, twin)
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the restart replayed steps 3-4 exactly
    assert losses[2] == pytest.approx(losses[1], abs=1e-5)
    # a run stopped after step 2, then continued by a new process (`--resume`), retraces the clean one
    split = tmp_path / "split"
    train_moe(
        config, topo, data_dir=data, out=split, steps=2, checkpoint_every=2, progress=lambda m: None
    )  # fmt: skip
    again = submit_job("train_moe", [*job, "--out", str(split), "--resume"])  # and again, on the same cluster
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log[-3000:]
    assert "resuming from step 2" in log
    resumed = json.loads((split / "summary.json").read_text())
    split_metrics = pq.read_table(split / "metrics.parquet").to_pylist()
    assert [m["step"] for m in split_metrics] == [1, 2, 3, 4]
    assert [m["loss"] for m in split_metrics] == pytest.approx(losses[1], abs=1e-5)
    assert resumed["final_val_loss"] == pytest.approx(clean["final_val_loss"], abs=1e-5)
    assert resumed["inter_region_bytes"] == clean["inter_region_bytes"]
    # one modelled clock (edgeray.fabric.backend.Fabric.clock), continued across the resume
    for run, rows in (
        (clean, clean_metrics := pq.read_table(out / "metrics.parquet").to_pylist()),
        (resumed, split_metrics),
    ):
        clocks = [m["modelled_s"] for m in rows]
        assert all(x < y for x, y in itertools.pairwise(clocks)) and run["modelled_s"] == clocks[-1]
    assert drill["final_val_loss"] == pytest.approx(clean["final_val_loss"], abs=1e-5)
    assert clean["dropped_tokens"] == sum(m["dropped"] for m in clean_metrics)
    assert clean["inter_region_bytes"] == clean_metrics[-1]["inter_region_bytes"]  # the training traffic
    # the checkpoint is a transformers Mixtral model whose loss is the fleet's
    model = MixtralForCausalLM.from_pretrained(out / "checkpoint")
    assert model.config.num_local_experts == config.experts
    assert abs(sum(clean["expert_load"]) - 1) < 1e-6 and clean["inter_region_bytes"] > 0
    assert live_keys() == []  # none of the runs left rendezvous keys behind
    assert_clean()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_standby_replicas_track_training_and_take_over_a_dead_expert(fleet):
    topo, data, _ = fleet
    config = MoEConfig(batch_size=4, replicas=2)
    plan = plan_experts(topo, config.experts, "campus-gw", replicas=config.replicas)
    moe = MoEFleet(config, topo, plan, data, progress=lambda m: None)
    prompt = read_shard(data, "campus-gw")[0, :12].tolist()
    try:
        for step in range(2):
            moe.train_step(step)
        weights = ray.get([a.weights.remote() for a in moe.actors[4]], timeout=60)
        for key in ("gate_up", "down"):  # the standby holds exactly what the serving replica learned
            assert all(torch.equal(a, b) for a, b in zip(weights[0][key], weights[1][key], strict=True))
        assert any(row["op"] == "replica-sync" for row in moe.ledger.rows())
        before = moe.generate(prompt, 6)
        ray.kill(moe.actors[4][0], no_restart=True)
        after = moe.generate(prompt, 6)
        alive = list(moe.alive)
    finally:
        moe.close()
    assert alive[4] and after["expert_load"][4] > 0  # the standby served expert 4
    assert after["tokens"] == before["tokens"]
