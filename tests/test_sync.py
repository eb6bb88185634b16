"""Sync strategies on a real labelled cluster, against single-process training and their own logs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from edgeray.model import build_model
from edgeray.model.shards import read_client_shard, read_shard, read_validation
from edgeray.topology import load_topology, resolve_topology_path
from edgeray.train.failures import WorkerFailed
from edgeray.train.strategies import Strategy, register, unregister
from edgeray.train.strategies.streaming_diloco import StreamingDiLoCo, StreamingParams, fragment_slices
from edgeray.train.sync import (
    STRATEGIES,
    ChurnEvent,
    SyncConfig,
    SyncError,
    WorkerPool,
    churn_from_topology,
    default_server_node,
    lm_loss,
    make_optimizer,
    prepare_data,
    run_sync,
)

from .conftest import assert_clean, run_bin, scrape, wait_for

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"batch_size": 2, "steps": 3, "evals": 1, "val_windows": 16}


def test_config_and_churn_are_validated():
    with pytest.raises(SyncError, match=r"strategy = 'allreduce'.*valid strategies are \['sync'"):
        SyncConfig(strategy="allreduce")
    with pytest.raises(SyncError, match=r"sync-hier: codec = 'zip'.*optimizer = 'adam'"):
        SyncConfig(strategy="sync-hier", params={"codec": "zip"}, optimizer="adam")
    with pytest.raises(SyncError, match=r"ssp: bound = -1"):
        SyncConfig(strategy="ssp", params={"bound": -1})
    with pytest.raises(SyncError, match=r"gossip: unknown hyperparameters \['h'\]; gossip takes none"):
        SyncConfig(strategy="gossip", params={"h": 3})
    with pytest.raises(SyncError, match=r"unknown hyperparameters \['H'\]; diloco takes \['h', 'fit'"):
        SyncConfig(strategy="diloco", params={"H": 3})
    with pytest.raises(SyncError, match=r"secagg = True needs clip.*codec = 'int8': secagg sends masked"):
        SyncConfig(strategy="federated", params={"secagg": True, "codec": "int8"})
    with pytest.raises(
        SyncError, match=r"drop_after_masking = 0.5: a secure-aggregation drill, needs secagg"
    ):
        SyncConfig(strategy="federated", params={"drop_after_masking": 0.5})
    config = SyncConfig(strategy="diloco", params={"h": 7})
    assert config.params.h == 7 and config.params.outer_momentum == 0.9  # typed, defaults filled in
    with pytest.raises(SyncError, match="slowdown"):
        SyncConfig(slowdown={"campus-gw": 0.5})
    assert ChurnEvent.parse("campus-jetson@2.5-7") == ChurnEvent("campus-jetson", 2.5, 7.0)
    assert ChurnEvent.parse("cloud-2@3!") == ChurnEvent("cloud-2", 3.0, None, crash=True)
    for bad in ("cloud-2", "cloud-2@x", "cloud-2@5-4"):
        with pytest.raises(SyncError, match="churn"):
            ChurnEvent.parse(bad)


def test_churn_sampled_from_the_topology_keeps_each_nodes_availability():
    topo = load_topology(resolve_topology_path("local"))
    horizon = 200_000.0
    events = churn_from_topology(topo, ["campus-jetson"], horizon_s=horizon, speedup=100.0, seed=1)
    spec = topo.nodes["campus-jetson"].churn  # availability 0.98, MTBF 7200 s -> 72 s at 100x
    down = sum(min(e.join_s, horizon) - e.leave_s for e in events)
    assert abs(1 - down / horizon - spec.availability) < 0.005
    gaps = np.diff([e.leave_s for e in events])
    assert abs(np.mean(gaps) - (spec.mtbf_s / 100) / spec.availability) / (spec.mtbf_s / 100) < 0.1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--slow", "nowhere=5"], "slowdown names ['nowhere']"),
        (["--churn", "cloud-2@9-3"], "need 0 <= LEAVE_S < JOIN_S"),
        (["--nodes", "cloud-1,cloud-2", "--churn", "campus-gw@1"], "churn names ['campus-gw']"),
    ],
)
def test_train_sync_refuses_bad_arguments_before_starting_a_cluster(args, message, tmp_path):
    res = run_bin(
        "python", str(ROOT / "jobs" / "train_sync.py"), "--strategy", "sync", "--out", str(tmp_path), *args,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.fixture(scope="module")
def fleet(local_cluster, tmp_path_factory):
    topo, state = local_cluster
    data = prepare_data(topo, tmp_path_factory.mktemp("data"), seq_len=32)
    with WorkerPool() as pool:  # one process per node for the whole module (runs reset them)
        yield topo, data, state, pool
    assert_clean()


def _reference(config: SyncConfig, data: Path, nodes: list[str]) -> tuple[list[float], torch.Tensor]:
    """Single-process large-batch training: each step, every worker's batch concatenated."""
    model = build_model(config.preset, seed=config.seed)
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr)
    shards = [read_shard(data, n) for n in nodes]
    b = config.batch_size
    losses = []
    for k in range(config.steps):
        batch = torch.cat([s[[(k * b + i) % len(s) for i in range(b)]] for s in shards])
        opt.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _checkpoint_vector(out: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _events(out: Path) -> list[dict]:
    return pq.read_table(out / "metrics.parquet").to_pylist()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,optimizer", [("sync", "adamw"), ("sync-hier", "sgd")])
def test_synchronous_strategies_equal_single_process_large_batch_training(
    fleet, tmp_path, strategy, optimizer
):
    topo, data, _, pool = fleet
    config = SyncConfig(
        strategy=strategy, optimizer=optimizer, lr=3e-3 if optimizer == "adamw" else 0.05, **SMALL
    )
    summary = run_sync(config, topo, data_dir=data, out=tmp_path, pool=pool)
    ref_losses, ref_params = _reference(config, data, list(topo.nodes))
    losses = [e["loss"] for e in _events(tmp_path) if e["event"] == "step"]
    assert np.allclose(losses, ref_losses, atol=1e-5), (losses, ref_losses)
    ref_model = build_model(config.preset)
    torch.nn.utils.vector_to_parameters(ref_params, ref_model.parameters())
    with torch.no_grad():
        ref_val = lm_loss(ref_model, read_validation(data)[: config.val_windows]).item()
    assert abs(summary["final_val_loss"] - ref_val) < 1e-5
    if optimizer == "sgd":
        # Parameters too. (AdamW divides each gradient element by its own scale, so the rounding noise of
        # elements that cancel to ~0 can move them by a fraction of the learning rate: losses still agree.)
        assert torch.allclose(_checkpoint_vector(tmp_path), ref_params, atol=1e-5)
    assert summary["replica_spread"] < 1e-6  # every worker holds the same model
    assert summary["tokens"] == config.steps * len(topo.nodes) * config.batch_size * 32
    ledger = pq.read_table(tmp_path / "ledger.parquet").to_pylist()
    inter = sum(r["bytes"] for r in ledger if r["link_class"] == "inter-region")
    assert inter == summary["inter_region_bytes"] > 0
    if strategy == "sync-hier":  # inter-region traffic only between region leaders
        leaders = {r.nodes[0].name for r in topo.regions.values()}
        assert all(
            r["src"] in leaders and r["dst"] in leaders for r in ledger if r["link_class"] == "inter-region"
        )


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_diloco_with_inner_sgd_h1_and_plain_outer_sgd_lr1_is_synchronous_sgd(fleet, tmp_path):
    topo, data, _, pool = fleet
    config = SyncConfig(
        strategy="diloco",
        optimizer="sgd",
        lr=0.05,
        params={"h": 1, "outer_lr": 1.0, "outer_momentum": 0.0},
        **SMALL,
    )
    run_sync(config, topo, data_dir=data, out=tmp_path, pool=pool)
    ref_losses, ref_params = _reference(config, data, list(topo.nodes))
    inner = [e for e in _events(tmp_path) if e["event"] == "inner"]
    assert len(inner) == config.steps * len(topo.regions)  # one inner step per region per round
    per_round = [np.mean([e["loss"] for e in inner if e["round"] == k]) for k in range(config.steps)]
    assert np.allclose(per_round, ref_losses, atol=1e-5), (per_round, ref_losses)
    assert torch.allclose(_checkpoint_vector(tmp_path), ref_params, atol=1e-5)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ssp_never_runs_more_than_its_bound_ahead_of_the_slowest_worker(fleet, tmp_path):
    topo, data, _, pool = fleet
    config = SyncConfig(
        strategy="ssp", params={"bound": 1}, slowdown={"campus-jetson": 5.0}, **{**SMALL, "steps": 4}
    )
    summary = run_sync(config, topo, data_dir=data, out=tmp_path, pool=pool)
    events = _events(tmp_path)
    starts = [e for e in events if e["event"] == "start"]
    assert starts and max(e["ahead"] for e in starts) <= config.params.bound
    assert summary["waits"] > 0  # the bound held the fast workers back: the check is not vacuous
    # Replaying the log: at every step start, the starting worker's completed steps minus the slowest's.
    done = dict.fromkeys(topo.nodes, 0)
    for e in events:
        if e["event"] == "start":
            assert done[e["node"]] - min(done.values()) <= config.params.bound
        elif e["event"] in ("update", "dropped"):
            done[e["node"]] += 1
    assert summary["nodes"]["campus-jetson"]["steps"] < summary["nodes"]["cloud-1"]["steps"]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "strategy,crash",
    [("async", False), ("gossip", True), ("diloco", True)],
    ids=["async", "gossip", "diloco"],
)
def test_a_node_killed_mid_run_leaves_a_record_and_the_run_completes(fleet, tmp_path, strategy, crash):
    topo, data, _, pool = fleet
    config = SyncConfig(
        strategy=strategy, params={"h": 2} if strategy == "diloco" else None, **{**SMALL, "steps": 4}
    )
    leave = 0.6  # modelled seconds: after every worker's first steps, well before the end
    summary = run_sync(
        config,
        topo,
        data_dir=data,
        out=tmp_path,
        churn=[ChurnEvent("cloud-2", leave, crash=crash)],
        pool=pool,
    )
    per_step = config.batch_size * 32
    assert summary["tokens"] >= summary["token_budget"] - 2 * per_step  # DiLoCo stops within one region step
    (left,) = summary["left"]
    assert left["node"] == "cloud-2" and left["t_s"] >= leave
    assert left["reason"] == ("failed" if crash else "churn")
    assert left["contributed_tokens"] > 0 and left["contributed_tokens"] % per_step == 0
    assert summary["nodes"]["cloud-2"]["alive"] is False
    events = _events(tmp_path)
    after = [e for e in events if e["node"] == "cloud-2" and e["t_s"] > left["t_s"] and e["event"] != "leave"]
    assert not after, after
    if strategy != "diloco":  # per-node events: the record matches what the node's updates carried
        mine = [e for e in events if e["node"] == "cloud-2" and e["event"] in ("update", "step")]
        assert left["contributed_tokens"] == len(mine) * per_step


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_over_its_energy_budget_is_drained_and_the_summary_bills_every_node(fleet, tmp_path):
    """campus-jetson gets a 5 J battery (15 W busy, 5 W idle; a 0.25 s step costs it ~3.8 J): it is taken
    out once its modelled energy passes the budget, never rejoins, and the run completes without it. The
    summary's joules per node are idle_w x (up - busy) + busy_w x busy with busy = its steps x 0.25 s."""
    import yaml

    topo, data, _, pool = fleet
    doc = yaml.safe_load(Path(topo.path).read_text())
    budget_j = 5.0
    for region in doc["regions"]:
        for node in region["nodes"]:
            if node["name"] == "campus-jetson":
                node["power"]["budget_wh"] = budget_j / 3600
    path = tmp_path / "battery.yaml"
    path.write_text(yaml.safe_dump(doc))
    battery = load_topology(path)
    config = SyncConfig(strategy="sync", **{**SMALL, "steps": 4})
    summary = run_sync(config, battery, data_dir=data, out=tmp_path / "run", pool=pool)
    assert summary["drained"] == ["campus-jetson"]
    (left,) = summary["left"]
    assert left["node"] == "campus-jetson" and left["reason"] == "energy budget"
    spent = left["spent_wh"] * 3600
    step_j = 15 * config.compute_s  # one more step's busy energy (waiting on the links adds ~ms x 5 W)
    assert budget_j < spent <= budget_j + step_j + 5 * 0.5
    events = _events(tmp_path / "run")
    mine = [e for e in events if e["node"] == "campus-jetson" and e["event"] == "step"]
    assert all(e["t_s"] <= left["t_s"] for e in mine)
    assert summary["tokens"] >= summary["token_budget"]  # the others finish the work
    bill = summary["energy"]
    assert bill["by_node"]["campus-jetson"]["joules"] == pytest.approx(spent)
    for name, row in summary["nodes"].items():
        if name == "campus-jetson":
            continue
        power = battery.nodes[name].power
        busy = row["steps"] * config.compute_s * battery.nodes[name].slowdown
        want = power.idle_w * (summary["modelled_s"] - busy) + power.busy_w * busy
        assert bill["by_node"][name]["joules"] == pytest.approx(want), name
    assert bill["per_step"]["joules"] == pytest.approx(bill["joules"] / summary["steps"])
    assert bill["usd"]["egress"] > 0  # campus and metro sent their gradients' bytes to other regions

    # the run's churn gauges on Ray's Prometheus endpoints: one drain, nobody left otherwise
    def churn() -> dict[str, float]:
        return {
            s.labels["kind"]: s.value
            for s in scrape("ray_edgeray_train_churn_events", run="run", strategy="sync")
        }

    wait_for(lambda: churn().get("drain") == 1.0, 60, "the run's drain on the metrics endpoints")
    assert churn() == {"drain": 1.0, "leave": 0.0, "join": 0.0}


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rejoining_node_fetches_the_current_state_over_the_fabric(fleet, tmp_path):
    topo, data, _, pool = fleet
    config = SyncConfig(strategy="sync", **{**SMALL, "steps": 4})
    summary = run_sync(
        config, topo, data_dir=data, out=tmp_path, churn=[ChurnEvent("metro-mec-2", 0.3, 0.9)], pool=pool
    )
    (joined,) = summary["joined"]
    assert joined["node"] == "metro-mec-2" and joined["source"] == "metro-mec-1"  # nearest live peer
    numel = sum(p.numel() for p in build_model("tiny").parameters())
    assert joined["fetched_bytes"] == (3 * numel + 1) * 4  # parameters + AdamW moments + step, fp32
    assert summary["replica_spread"] < 1e-6  # with the moments it took, it stays identical to the others
    ledger = pq.read_table(tmp_path / "ledger.parquet").to_pylist()
    assert any(
        r["op"] == "send" and r["dst"] == "metro-mec-2" and r["bytes"] == joined["fetched_bytes"]
        for r in ledger
    )
    # Five workers for a while: the budget is reached within one synchronous step.
    assert 0 <= summary["tokens"] - summary["token_budget"] < len(topo.nodes) * config.batch_size * 32


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_exception_in_a_live_worker_fails_the_run_and_resume_continues_its_trajectory(
    fleet, tmp_path, strategy
):
    """Only death is churn: a worker that raises (here an injected fault at its fourth step) fails the run at
    once, naming the call and showing the worker's traceback; nobody is recorded as having left, and the run
    directory keeps its configuration, the metrics measured until then and the last checkpoint. Resumed
    from it, the run retraces the uninterrupted one exactly: every event, loss, byte and modelled second
    (DiLoCo's outer momentum, EASGD's centre, the server's clock, gossip's peer draws and the link jitter
    all come back)."""
    topo, data, _, pool = fleet
    config = SyncConfig(
        strategy=strategy,
        params={"h": 2, "fit": False}  # every region runs h steps: the checkpoint falls between rounds
        if strategy == "diloco"
        else {"h": 2, "fragments": 2}
        if "streaming" in strategy
        else None,
        **{**SMALL, "steps": 4, "evals": 2},  # one checkpoint, at half the budget
    )
    server = default_server_node(topo, list(topo.nodes)) if strategy in ("async", "ssp", "easgd") else None
    kw = {"data_dir": data, "pool": pool, "server_node": server, "progress": lambda m: None}
    # sync and async share their driver code with sync-hier and ssp: their resume is covered there
    resume = strategy not in ("sync", "async")
    clean = run_sync(config, topo, out=tmp_path / "clean", **kw) if resume else None
    out = tmp_path / "failed"
    victim = pool.take(config, topo, "metro-mec-2", data, "worker")
    ray.get(victim.inject_fault.remote(3), timeout=60)
    try:
        with pytest.raises(WorkerFailed) as info:
            run_sync(config, topo, out=out, **kw)
    finally:
        ray.get(victim.inject_fault.remote(None), timeout=60)  # never left armed for the next test
    message = str(info.value)
    assert "injected fault on metro-mec-2 at local step 4" in message
    # its traceback (federated trains inside one strategy op, which calls compute)
    assert ("SyncWorker.compute" in message or "SyncWorker.op" in message) and "line" in message
    assert "in compute" in message
    assert "compute" in message and "not churn" in message
    assert json.loads((out / "config.json").read_text())["sync"]["strategy"] == strategy
    failed_events = _events(out)
    assert not [e for e in failed_events if e["event"] == "leave"]
    assert not (out / "summary.json").exists() and (out / "resume" / "driver.pt").exists()
    if clean is None:
        return
    other = SyncConfig(
        strategy=strategy, params=config.params, **{**SMALL, "steps": 5, "evals": 2, "lr": 0.1}
    )
    with pytest.raises(SyncError, match=r"other settings \(sync\.lr, sync\.steps differ\)"):
        run_sync(other, topo, out=out, resume=True, **kw)
    resumed = run_sync(config, topo, out=out, resume=True, **kw)
    assert 0 < resumed["resumed_at_tokens"] < clean["tokens"]
    assert _events(out) == _events(tmp_path / "clean")  # the same trajectory, event for event
    for key in ("final_val_loss", "inter_region_bytes", "modelled_wall_s", "tokens", "evals"):
        assert resumed[key] == clean[key], key
    assert torch.equal(_checkpoint_vector(out), _checkpoint_vector(tmp_path / "clean"))
    assert not (out / "resume").exists()  # a completed run leaves nothing to resume


def test_resume_refuses_a_missing_checkpoint_and_a_strategy_without_driver_state(tmp_path):
    """Checked before any actor starts."""
    topo = load_topology(resolve_topology_path("local"))
    with pytest.raises(SyncError, match=r"resume: no checkpoint at .*resume \(one is written"):
        run_sync(SyncConfig(strategy="diloco", **SMALL), topo, data_dir=tmp_path, out=tmp_path, resume=True)

    class Stateless(Strategy):
        name = "stateless-test"

    register(Stateless)
    try:
        with pytest.raises(
            SyncError, match=r"'stateless-test' names no driver state .* resumable strategies: \["
        ):
            run_sync(
                SyncConfig(strategy="stateless-test", **SMALL),
                topo,
                data_dir=tmp_path,
                out=tmp_path,
                resume=True,
            )
    finally:
        unregister("stateless-test")


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_strategy_written_only_against_the_interface_runs(fleet, tmp_path):
    """The federated-averaging sketch of edgeray/train/strategies/README.md, executed as written: a new
    strategy needs no change to the runner. One local SGD step on every client, averaged by tokens, is
    synchronous SGD: losses and parameters equal single-process large-batch training."""
    import re
    import sys
    import types

    from ray import cloudpickle  # the pickler Ray sends tasks' arguments with

    from edgeray.train.strategies import unregister

    readme = (ROOT / "edgeray" / "train" / "strategies" / "README.md").read_text()
    (code,) = re.findall(r"```python\n(import random\n.*?)```", readme, flags=re.S)
    module = types.ModuleType("fedavg_sketch")
    sys.modules[module.__name__] = module
    cloudpickle.register_pickle_by_value(module)  # the workers get the class by value, as a notebook's would
    try:
        exec(compile(code, "README.md", "exec"), module.__dict__)
        topo, data, _, pool = fleet
        config = SyncConfig(
            strategy="fedavg-sketch",
            params={"local_steps": 1, "clients_per_round": len(topo.nodes)},
            optimizer="sgd",
            lr=0.05,
            **SMALL,
        )
        run_sync(config, topo, data_dir=data, out=tmp_path, pool=pool, progress=lambda m: None)
    finally:
        unregister("fedavg-sketch")
        cloudpickle.unregister_pickle_by_value(module)
        del sys.modules[module.__name__]
    ref_losses, ref_params = _reference(config, data, list(topo.nodes))
    rounds = [e for e in _events(tmp_path) if e["event"] == "round"]
    assert np.allclose([e["loss"] for e in rounds], ref_losses, atol=1e-5)
    assert torch.allclose(_checkpoint_vector(tmp_path), ref_params, atol=1e-5)


def test_streaming_fragments_cover_the_model_and_take_turns():
    sizes = [p.numel() for p in build_model("tiny").parameters()]
    for fragments in (1, 2, 3, 4):
        slices = fragment_slices(sizes, fragments)
        assert len(slices) == fragments and slices[0].start == 0 and slices[-1].stop == sum(sizes)
        assert all(a.stop == b.start for a, b in itertools.pairwise(slices))
        assert max(s.stop - s.start for s in slices) <= 1.1 * sum(sizes) / fragments + max(sizes)
    strategy = StreamingDiLoCo(StreamingParams(h=8, fragments=4, overlap=1))
    offsets = strategy.offsets(4)
    syncs = {f: [t for t in range(1, 17) if t % 8 == o] for f, o in enumerate(offsets)}
    assert syncs == {0: [8, 16], 1: [6, 14], 2: [4, 12], 3: [2, 10]}  # every h steps, h / fragments apart
    with pytest.raises(SyncError, match=r"overlap = 8: must be in \[0, h = 8\)"):
        SyncConfig(strategy="streaming-diloco", params={"h": 8, "fragments": 4, "overlap": 8})


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_streaming_diloco_with_one_fragment_h1_and_no_overlap_is_synchronous_sgd(fleet, tmp_path):
    topo, data, _, pool = fleet
    config = SyncConfig(
        strategy="streaming-diloco",
        optimizer="sgd",
        lr=0.05,
        params={"h": 1, "fragments": 1, "overlap": 0, "mix": 0.0, "outer_lr": 1.0, "outer_momentum": 0.0,
                "codec": "none"},
        **SMALL,
    )  # fmt: skip
    run_sync(config, topo, data_dir=data, out=tmp_path, pool=pool, progress=lambda m: None)
    ref_losses, ref_params = _reference(config, data, list(topo.nodes))
    inner = [e for e in _events(tmp_path) if e["event"] == "inner"]
    per_step = [np.mean([e["loss"] for e in inner if e["step"] == k + 1]) for k in range(config.steps)]
    assert np.allclose(per_step, ref_losses, atol=1e-5), (per_step, ref_losses)
    assert torch.allclose(_checkpoint_vector(tmp_path), ref_params, atol=1e-5)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_streaming_diloco_moves_one_fragment_per_outer_step_on_its_turn(fleet, tmp_path):
    topo, data, _, pool = fleet
    common = {**SMALL, "steps": 8}
    stream = run_sync(
        SyncConfig(strategy="streaming-diloco", params={"h": 4, "fragments": 2, "overlap": 1}, **common),
        topo, data_dir=data, out=tmp_path / "stream", pool=pool, progress=lambda m: None,
    )  # fmt: skip
    whole = run_sync(
        SyncConfig(strategy="diloco", params={"h": 4, "codec": "int4"}, **common),
        topo, data_dir=data, out=tmp_path / "whole", pool=pool, progress=lambda m: None,
    )  # fmt: skip
    outer = [(e["step"], e["fragment"]) for e in _events(tmp_path / "stream") if e["event"] == "outer"]
    assert outer == [(2, 1), (4, 0), (6, 1), (8, 0)]  # each fragment every h = 4 steps, h / 2 apart
    sizes = [p.numel() for p in build_model("tiny").parameters()]
    share = max(s.stop - s.start for s in fragment_slices(sizes, 2)) / sum(sizes)
    peak = stream["peak_outer_inter_region_bytes"] / whole["peak_outer_inter_region_bytes"]
    assert peak == pytest.approx(share, rel=0.02)  # the same codec on half the model
    assert stream["tokens"] == whole["tokens"] == 8 * len(topo.nodes) * 2 * 32
    assert np.isfinite(stream["final_val_loss"]) and stream["final_val_loss"] < 8.0


# --- federated rounds -----------------------------------------------------------------------------------------


def _federated_reference(
    config: SyncConfig, data: Path, rounds: list[list[str]]
) -> tuple[list[float], torch.Tensor]:
    """Single-process federated rounds: each sampled client trains local_steps SGD steps from the global model
    on its own shard (its batches continue where its last round left off; a virtual client's shard is its file
    of the node's), with FedProx's mu (w - w_global) added to the gradient; the updates are averaged (equal
    batches: equal token weights) and the global model moves by FedAvg (w += lr u) or FedAdam (m, v;
    w += lr m / (sqrt(v) + tau))."""
    p = config.params
    model = build_model(config.preset, seed=config.seed)
    params = list(model.parameters())
    w = torch.cat([q.detach().reshape(-1) for q in params]).clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    k = p.clients_per_node
    shards = {
        c: read_shard(data, c)
        if k == 1
        else read_client_shard(data, c.split("/")[0], k, int(c.split("/")[1]))
        for r in rounds
        for c in r
    }
    steps = dict.fromkeys(shards, 0)
    b = config.batch_size
    losses = []
    for clients in rounds:
        updates, round_losses = [], []
        for c in clients:
            offset = 0
            for q in params:  # start from the global model
                q.data.copy_(w[offset : offset + q.numel()].view_as(q))
                offset += q.numel()
            for _ in range(p.local_steps):
                batch = shards[c][[(steps[c] * b + i) % len(shards[c]) for i in range(b)]]
                steps[c] += 1
                model.zero_grad()
                loss = lm_loss(model, batch)
                loss.backward()
                round_losses.append(loss.item())
                with torch.no_grad():
                    for q, g0 in zip(params, _split(w, params), strict=True):
                        q -= config.lr * (q.grad + p.mu * (q - g0))
            updates.append(torch.cat([q.detach().reshape(-1) for q in params]) - w)
        u = torch.stack(updates).mean(0)
        if p.server_optimizer == "avg":
            w = w + p.server_lr * u
        else:
            m = p.beta1 * m + (1 - p.beta1) * u
            v = p.beta2 * v + (1 - p.beta2) * u * u
            w = w + p.server_lr * m / (v.sqrt() + p.tau)
        losses.append(float(np.mean(round_losses)))
    return losses, w


def _split(vec: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for q in like:
        out.append(vec[offset : offset + q.numel()].view_as(q))
        offset += q.numel()
    return out


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_federated_rounds_equal_single_process_fedavg_fedprox_and_fedadam(fleet, tmp_path):
    """``federated`` with every client, one local SGD step and plain averaging is synchronous SGD (losses and
    parameters equal large-batch training). With Poisson sampling (half the clients on average), two local
    steps, FedProx's proximal term and FedAdam on the server, it equals the same rounds computed in one
    process from the clients each round sampled."""
    from edgeray.train.strategies.federated import sample_clients

    topo, data, _, pool = fleet
    nodes = list(topo.nodes)
    plain = SyncConfig(strategy="federated", params={"local_steps": 1}, optimizer="sgd", lr=0.05, **SMALL)
    run_sync(plain, topo, data_dir=data, out=tmp_path / "fedavg", pool=pool, progress=lambda m: None)
    ref_losses, ref_params = _reference(plain, data, nodes)
    rounds = [e for e in _events(tmp_path / "fedavg") if e["event"] == "round"]
    assert [sorted(e["clients"]) for e in rounds] == [sorted(nodes)] * SMALL["steps"]
    assert np.allclose([e["loss"] for e in rounds], ref_losses, atol=1e-5)
    assert torch.allclose(_checkpoint_vector(tmp_path / "fedavg"), ref_params, atol=1e-5)

    params = {"sample_rate": 0.5, "local_steps": 2, "mu": 0.5, "server_optimizer": "adam", "server_lr": 0.01}
    config = SyncConfig(strategy="federated", params=params, optimizer="sgd", lr=0.05,
                        **{**SMALL, "steps": 4})  # fmt: skip
    summary = run_sync(
        config, topo, data_dir=data, out=tmp_path / "fedadam", pool=pool, progress=lambda m: None
    )
    rounds = [e for e in _events(tmp_path / "fedadam") if e["event"] == "round"]
    sampled = [sorted(e["clients"]) for e in rounds]
    assert sampled == [sample_clients(config.seed, r, sorted(nodes), 0.5) for r in range(len(rounds))]
    assert min(map(len, sampled)) > 0 and max(map(len, sampled)) < len(nodes)  # the sampling was partial
    ref_losses, ref_params = _federated_reference(config, data, [r for r in sampled if r])
    assert np.allclose([e["loss"] for e in rounds if e["clients"]], ref_losses, atol=1e-5)
    assert torch.allclose(_checkpoint_vector(tmp_path / "fedadam"), ref_params, atol=1e-5)
    assert summary["rounds"] == len(rounds) and summary["inter_region_bytes"] > 0

    # aggregated by region, then in the cloud: the same rounds, fewer inter-region bytes
    config = SyncConfig(**{**config.__dict__, "params": {**params, "hierarchical": True}})
    hier = run_sync(config, topo, data_dir=data, out=tmp_path / "hier", pool=pool, progress=lambda m: None)
    assert torch.allclose(_checkpoint_vector(tmp_path / "hier"), ref_params, atol=1e-5)
    assert hier["inter_region_bytes"] < summary["inter_region_bytes"]

    # three virtual clients per node, each on its own file (the node's shard cut in three), a third sampled
    params = {"clients_per_node": 3, "sample_rate": 0.3, "local_steps": 2}
    config = SyncConfig(strategy="federated", params=params, optimizer="sgd", lr=0.05,
                        **{**SMALL, "steps": 2})  # fmt: skip
    out = tmp_path / "virtual"
    summary = run_sync(config, topo, data_dir=data, out=out, pool=pool, progress=lambda m: None)
    for n in nodes:
        parts = [read_client_shard(data, n, 3, i) for i in range(3)]
        assert torch.equal(torch.cat(parts), read_shard(data, n)) and min(len(x) for x in parts) > 0
    rounds = [e for e in _events(out) if e["event"] == "round"]
    sampled = [sorted(e["clients"]) for e in rounds]
    names = sorted(f"{n}/{i}" for n in nodes for i in range(3))
    assert sampled == [sample_clients(config.seed, r, names, 0.3) for r in range(len(rounds))]
    assert len({c.split("/")[0] for r in sampled for c in r}) > 1 and any(  # some node ran two clients
        len(r) > len({c.split("/")[0] for c in r}) for r in sampled
    )
    ref_losses, ref_params = _federated_reference(config, data, [r for r in sampled if r])
    assert np.allclose([e["loss"] for e in rounds if e["clients"]], ref_losses, atol=1e-5)
    assert torch.allclose(_checkpoint_vector(out), ref_params, atol=1e-5)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_federated_client_dp_clips_adds_the_planned_noise_and_reports_the_accountants_epsilon(
    fleet, tmp_path
):
    """One round of every client, one local SGD step, plain averaging, DP on (clip 0.01, z 2): the global model
    is w0 + the mean of the clipped updates (computed here in one process) + Gaussian noise of standard
    deviation z clip / N, which the difference must show over the model's ~1M values. A second run with a
    target epsilon: its noise multiplier meets the target over its planned rounds, the epsilon it reports
    equals dp-accounting's from scratch over its own (z, q, rounds) history, and its audit log verifies."""
    from edgeray.federated.audit import read_entries, verify
    from edgeray.federated.dp import noise_multiplier_for

    topo, data, _, pool = fleet
    nodes = list(topo.nodes)
    clip, z = 0.01, 2.0
    params = {"local_steps": 1, "clip": clip, "noise_multiplier": z}
    config = SyncConfig(
        strategy="federated", params=params, optimizer="sgd", lr=0.05, **{**SMALL, "steps": 1}
    )
    summary = run_sync(config, topo, data_dir=data, out=tmp_path / "one", pool=pool, progress=lambda m: None)
    assert summary["rounds"] == 1 and summary["planned_rounds"] == 1
    model = build_model(config.preset, seed=config.seed)
    w0 = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).clone()
    b, updates = config.batch_size, []
    for n in nodes:
        m = build_model(config.preset, seed=config.seed)
        shard = read_shard(data, n)
        lm_loss(m, shard[list(range(b))]).backward()
        grad = torch.cat([q.grad.reshape(-1) for q in m.parameters()])
        u = -config.lr * grad
        updates.append(u * min(1.0, clip / float(u.norm())))
    assert all(float(u.norm()) == pytest.approx(clip, rel=1e-4) for u in updates)  # every update was clipped
    noise = _checkpoint_vector(tmp_path / "one") - (w0 + torch.stack(updates).mean(0))
    assert float(noise.mean()) == pytest.approx(0, abs=5 * z * clip / len(nodes) / noise.numel() ** 0.5)
    assert float(noise.std()) == pytest.approx(z * clip / len(nodes), rel=0.01)

    params = {"sample_rate": 0.5, "local_steps": 1, "clip": 0.05, "target_epsilon": 5.0}
    config = SyncConfig(
        strategy="federated", params=params, optimizer="sgd", lr=0.05, **{**SMALL, "steps": 3}
    )
    out = tmp_path / "target"
    summary = run_sync(config, topo, data_dir=data, out=out, pool=pool, progress=lambda m: None)
    delta = 1 / len(nodes)
    assert summary["planned_rounds"] == 6 and summary["rounds"] <= 6 and summary["delta"] == delta
    assert summary["noise_multiplier"] == pytest.approx(noise_multiplier_for(5.0, delta, 0.5, 6), rel=1e-6)
    z, rounds = summary["noise_multiplier"], summary["rounds"]
    assert [tuple(h) for h in summary["dp_history"]] == [(z, 0.5, rounds)]
    assert abs(summary["epsilon"] - _dp_accounting_epsilon(z, 0.5, rounds, delta)) <= 1e-6
    assert summary["epsilon"] <= 5.0
    rounds = [e for e in _events(out) if e["event"] == "round"]
    assert all(a["epsilon"] < b["epsilon"] for a, b in itertools.pairwise(rounds))
    assert verify(out) == []
    entries = read_entries(out / "audit.jsonl")
    assert [e["round"] for e in entries] == list(range(summary["rounds"]))
    assert [e["epsilon"] for e in entries] == [e["epsilon"] for e in rounds]
    assert all(e["completed"] and e["clip"] == 0.05 and e["noise_multiplier"] == summary["noise_multiplier"]
               for e in entries)  # fmt: skip


def _one_step_updates(
    config: SyncConfig, data: Path, nodes: list[str], clip: float
) -> dict[str, torch.Tensor]:
    """Each node's one-SGD-step update from the initial model on its first batch, clipped to ``clip``."""
    out = {}
    for n in nodes:
        m = build_model(config.preset, seed=config.seed)
        lm_loss(m, read_shard(data, n)[list(range(config.batch_size))]).backward()
        u = -config.lr * torch.cat([q.grad.reshape(-1) for q in m.parameters()])
        out[n] = u * min(1.0, clip / float(u.norm()))
    return out


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_federated_secure_aggregation_sums_exactly_recovers_dropouts_and_spreads_the_dp_noise(
    fleet, tmp_path
):
    """``secagg`` with a clip far above any update: two rounds of every client (one local SGD step, plain
    averaging) equal large-batch SGD to the quantisation step; every masked update crossed the fabric as one
    uint32 per parameter and the key messages are in the ledger. The dropout drill (a third of the clients killed
    after sharing their keys): the round's model is w0 + the mean of the survivors' updates, computed here,
    and the audit log names the dropped. DP with secagg: the clients add the noise, each sized so that
    min_survivors of them carry z clip / N; with all N surviving the sum's standard deviation is
    z clip / N x sqrt(N / min_survivors)."""
    from edgeray.federated.audit import read_entries, verify
    from edgeray.train.strategies.federated import FederatedParams

    topo, data, _, pool = fleet
    nodes = list(topo.nodes)
    w0 = torch.cat([q.detach().reshape(-1) for q in build_model("tiny", seed=0).parameters()])
    params = {"local_steps": 1, "secagg": True, "clip": 100.0}
    config = SyncConfig(
        strategy="federated", params=params, optimizer="sgd", lr=0.05, **{**SMALL, "steps": 2}
    )
    out = tmp_path / "exact"
    summary = run_sync(config, topo, data_dir=data, out=out, pool=pool, progress=lambda m: None)
    ref_losses, ref_params = _reference(config, data, nodes)
    rounds = [e for e in _events(out) if e["event"] == "round"]
    assert np.allclose([e["loss"] for e in rounds], ref_losses, atol=1e-5)
    assert torch.allclose(_checkpoint_vector(out), ref_params, atol=1e-5)
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    masked = [r for r in ledger if r["op"] == "secagg"]
    assert len(masked) == 2 * len(nodes) and {r["bytes"] for r in masked} == {4 * w0.numel()}
    assert {r["dst"] for r in masked} == {default_server_node(topo, nodes)}
    assert len([r for r in ledger if r["op"] == "secagg-keys"]) == 2 * 5 * len(nodes)  # 5 key messages
    assert summary["secagg"] and summary["dropped"] == 0 and summary["aborted_rounds"] == 0
    assert summary["secagg_client_ms"] > 0 and summary["secagg_server_ms"] > 0

    # aggregated by region, then in the cloud: the sums of masked vectors unmask to the same model, and one
    # masked vector per other region crosses to the server's
    out = tmp_path / "hierarchical"
    run_sync(SyncConfig(**{**config.__dict__, "params": {**params, "hierarchical": True}}), topo, data_dir=data,
             out=out, pool=pool, progress=lambda m: None)  # fmt: skip
    assert torch.allclose(_checkpoint_vector(out), ref_params, atol=1e-5)
    masked = [r for r in pq.read_table(out / "ledger.parquet").to_pylist() if r["op"] == "secagg"]
    cross = [r for r in masked if r["link_class"] == "inter-region"]  # the server is in one of the regions
    assert len(masked) == 2 * len(nodes) and len(cross) == 2 * (len(topo.regions) - 1)

    params = {**params, "drop_after_masking": 0.34}
    config = SyncConfig(
        strategy="federated", params=params, optimizer="sgd", lr=0.05, **{**SMALL, "steps": 1}
    )
    out = tmp_path / "drill"
    summary = run_sync(config, topo, data_dir=data, out=out, pool=pool, progress=lambda m: None)
    gone = [e["node"] for e in _events(out) if e["event"] == "leave"]
    assert len(gone) == 2 and summary["dropped"] == 2 and summary["rounds"] == 1
    survivors = [n for n in nodes if n not in gone]
    updates = _one_step_updates(config, data, survivors, 100.0)
    expected = w0 + torch.stack(list(updates.values())).mean(0)
    assert torch.allclose(_checkpoint_vector(out), expected, atol=1e-6)
    [entry] = read_entries(out / "audit.jsonl")
    assert sorted(entry["dropouts"]) == sorted(gone) and entry["completed"] and verify(out) == []

    clip, z = 0.01, 2.0
    params = {"local_steps": 1, "secagg": True, "clip": clip, "noise_multiplier": z}
    config = SyncConfig(
        strategy="federated", params=params, optimizer="sgd", lr=0.05, **{**SMALL, "steps": 1}
    )
    out = tmp_path / "dp"
    summary = run_sync(config, topo, data_dir=data, out=out, pool=pool, progress=lambda m: None)
    updates = _one_step_updates(config, data, nodes, clip)
    noise = _checkpoint_vector(out) - (w0 + torch.stack(list(updates.values())).mean(0))
    n = len(nodes)
    std = z * clip / n * (n / FederatedParams(secagg_dropout=0.3).min_survivors(n)) ** 0.5
    assert float(noise.std()) == pytest.approx(std, rel=0.01)
    assert float(noise.mean()) == pytest.approx(0, abs=5 * std / noise.numel() ** 0.5)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_pruned_checkpoint_fine_tunes_with_sync_as_large_batch_training(fleet, tmp_path):
    """The device tier's recovery fine-tune (jobs/bench_prune.py): a checkpoint edgeray.model.prune wrote
    (half the MLP channels and query heads: an explicit head_dim, fewer heads than the preset) trains with
    ``sync`` from ``init_from``; losses and parameters equal single-process large-batch SGD of that model."""
    from edgeray.model.presets import save_pretrained
    from edgeray.model.prune import prune_llama
    from edgeray.model.tokenizer import train_tokenizer

    topo, data, _, pool = fleet
    pruned, _ = prune_llama(build_model("tiny", seed=0), mlp_keep=0.5, heads_keep=0.5)
    ckpt = save_pretrained(pruned, train_tokenizer(), tmp_path / "pruned")
    config = SyncConfig(strategy="sync", optimizer="sgd", lr=0.05, init_from=str(ckpt), **SMALL)
    run_sync(config, topo, data_dir=data, out=tmp_path / "run", pool=pool, progress=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 256
    opt = make_optimizer("sgd", model.parameters(), config.lr)
    shards = [read_shard(data, n) for n in topo.nodes]
    b = config.batch_size
    ref_losses = []
    for k in range(config.steps):
        opt.zero_grad()
        loss = lm_loss(model, torch.cat([s[[(k * b + i) % len(s) for i in range(b)]] for s in shards]))
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    losses = [e["loss"] for e in _events(tmp_path / "run") if e["event"] == "step"]
    assert np.allclose(losses, ref_losses, atol=1e-5), (losses, ref_losses)
    ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(_checkpoint_vector(tmp_path / "run"), ref, atol=1e-5)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_federated_lora_fine_tunes_a_checkpoint_edgeray_wrote(fleet, tmp_path):
    """A federated run writes checkpoint/; a LoRA run (rank 4, peft) starts from it (``init_from``): its first
    evaluation is the first run's final loss, only the adapters travel (each upload is their size), and its
    checkpoint (the adapters merged in) equals large-batch SGD on the same adapters computed here with peft."""
    from peft import LoraConfig, get_peft_model

    topo, data, _, pool = fleet
    nodes = list(topo.nodes)
    kw = {"data_dir": data, "pool": pool, "progress": lambda m: None}
    plain = {"strategy": "federated", "params": {"local_steps": 1}, "optimizer": "sgd", "lr": 0.05}
    base = run_sync(SyncConfig(**plain, **{**SMALL, "steps": 1}), topo, out=tmp_path / "base", **kw)
    ckpt = tmp_path / "base" / "checkpoint"
    params = {"local_steps": 1, "lora_rank": 4}
    config = SyncConfig(
        strategy="federated", params=params, optimizer="sgd", lr=0.5, init_from=str(ckpt), **SMALL
    )
    summary = run_sync(config, topo, out=tmp_path / "lora", **kw)
    assert summary["evals"][0]["val_loss"] == pytest.approx(base["final_val_loss"], abs=1e-5)

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    torch.manual_seed(config.seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    adapters = [q for q in model.parameters() if q.requires_grad]
    numel = sum(q.numel() for q in adapters)
    assert 0 < numel < 0.01 * sum(q.numel() for q in model.parameters())
    opt = torch.optim.SGD(adapters, lr=config.lr)
    shards = [read_shard(data, n) for n in nodes]
    b = config.batch_size
    for k in range(config.steps):
        opt.zero_grad()
        lm_loss(model, torch.cat([s[[(k * b + i) % len(s) for i in range(b)]] for s in shards])).backward()
        opt.step()
    merged = torch.cat([q.detach().reshape(-1) for q in model.merge_and_unload().parameters()])
    assert torch.allclose(_checkpoint_vector(tmp_path / "lora"), merged, atol=1e-5)
    uploads = [
        r for r in pq.read_table(tmp_path / "lora" / "ledger.parquet").to_pylist() if r["op"] == "send"
    ]
    assert uploads and {r["bytes"] for r in uploads} == {4 * numel}


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_federated_example_level_dp_sgd_clips_each_example_and_adds_opacus_noise(fleet, tmp_path):
    """Example-level DP-SGD (Opacus) inside every client: one round of every client, one local SGD step of
    batch B. The global model is w0 + the mean over clients of -lr x (the sum of the per-example gradients,
    each clipped to C, computed here one example at a time) / B, plus the mean of their Gaussian noise: standard
    deviation lr sigma C / (B sqrt(clients)). The example-level epsilon is dp-accounting's for one pass."""
    topo, data, _, pool = fleet
    nodes = list(topo.nodes)
    sigma, clip, lr = 1.0, 0.5, 0.05
    params = {"local_steps": 1, "dp_sgd_noise": sigma, "dp_sgd_clip": clip}
    config = SyncConfig(strategy="federated", params=params, optimizer="sgd", lr=lr, **{**SMALL, "steps": 1})
    summary = run_sync(
        config, topo, data_dir=data, out=tmp_path / "dpsgd", pool=pool, progress=lambda m: None
    )
    b = config.batch_size
    model = build_model(config.preset, seed=config.seed)
    w0 = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    updates, clipped = [], 0
    for n in nodes:
        total = torch.zeros_like(w0)
        for row in read_shard(data, n)[:b]:
            model.zero_grad()
            lm_loss(model, row[None]).backward()
            g = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
            clipped += float(g.norm()) > clip
            total += g * min(1.0, clip / float(g.norm()))
        updates.append(-lr * total / b)
    assert clipped > 0  # the clip bound bit
    noise = _checkpoint_vector(tmp_path / "dpsgd") - (w0 + torch.stack(updates).mean(0))
    std = lr * sigma * clip / (b * len(nodes) ** 0.5)
    assert float(noise.std()) == pytest.approx(std, rel=0.01)
    assert float(noise.mean()) == pytest.approx(0, abs=5 * std / noise.numel() ** 0.5)
    assert summary["example_passes"] == 1 and summary["example_delta"] == 1e-5
    assert abs(summary["example_epsilon"] - _dp_accounting_epsilon(sigma, 1.0, 1, 1e-5)) <= 1e-6


def _dp_accounting_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting from scratch, one round at a time: the independent check of a run's reported epsilon."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    for _ in range(rounds):
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return acc.get_epsilon(delta)
