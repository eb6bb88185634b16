"""The fleet simulator against closed forms, the fabric's own cost functions and a SimPy oracle."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from edgeray.fabric.codecs import get_codec
from edgeray.fabric.links import LinkModel
from edgeray.sim.engine import FleetArrays, RoundConfig, SimError, plan_round, simulate
from edgeray.sim.fleet import FleetSpec, GeneratorError, generate, region_sizes, to_yaml
from edgeray.sim.oracle import replay
from edgeray.sim.serving import ServiceModel, ServingConfig, simulate_serving
from edgeray.topology import load_topology, loads_topology, resolve_topology_path

from .conftest import run_cli

MESH = """\
name: mesh
regions:
{regions}
links:
{links}
defaults:
  inter_link: {{latency_ms: 10, jitter_ms: 0, bandwidth_mbps: 100, loss: 0}}
"""


def _mesh(sizes: list[int], port_mbps: float = 1000.0, intra_ms: float = 1.0) -> str:
    """Regions of the given sizes, every pair linked alike (10 ms, 100 Mbit/s), no jitter or loss."""
    regions = "\n".join(
        f"  - name: r{i}\n    tier: micro\n"
        f"    intra_link: {{latency_ms: {intra_ms}, jitter_ms: 0, bandwidth_mbps: {port_mbps}, loss: 0}}\n"
        f"    nodes: [{', '.join(f'{{name: r{i}-{j}}}' for j in range(k))}]"
        for i, k in enumerate(sizes)
    )
    links = "\n".join(
        f"  - {{between: [r{a}, r{b}]}}" for a in range(len(sizes)) for b in range(a + 1, len(sizes))
    )
    return MESH.format(regions=regions, links=links or "  []").replace("links:\n  []", "links: []")


def test_bytes_per_round_are_the_closed_forms():
    sizes = [3, 1, 5, 2]
    topo = loads_topology(_mesh(sizes))
    params = 1001  # not divisible by the 4 leaders: tensor_split's uneven chunks
    for codec in ("none", "int8", "fp16"):
        res = simulate(topo, RoundConfig(params=params, rounds=2, codec=codec, churn=False))
        row = res.rows[0]
        # every non-leader sends the model to its leader and gets it back
        assert row["intra_region_bytes"] == 2 * sum(k - 1 for k in sizes) * params * 4
        # leaders ring: 2(L-1) steps, each sending every chunk once
        chunks = np.array_split(np.arange(params), len(sizes))
        per_step = sum(get_codec(codec).nbytes(len(c)) for c in chunks)
        assert row["inter_region_bytes"] == 2 * (len(sizes) - 1) * per_step
        if codec == "none":
            assert row["inter_region_bytes"] == 2 * (len(sizes) - 1) * 4 * params


def test_round_time_is_the_analytic_latency_and_bandwidth_bound():
    topo = loads_topology(_mesh([4, 4, 4], port_mbps=1000.0, intra_ms=1.0))
    params = 300_000  # 1.2 MB, three equal chunks
    res = simulate(topo, RoundConfig(params=params, rounds=1, compute_s=0.5, jitter=False, churn=False))
    row = res.rows[0]
    mbit = params * 4 * 8 / 1e6
    # three members share their leader's 1000 Mbit/s in-port (reduce) and out-port (broadcast). The reduce
    # starts when the leader's ready notices have crossed the 1 ms link (everyone posts at 0.5 s); each
    # member posted its broadcast receive long before the leader sends, so the broadcast pays no notice.
    assert row["reduce_s"] == pytest.approx(2e-3 + mbit / (1000 / 3), rel=1e-12)
    assert row["broadcast_s"] == pytest.approx(1e-3 + mbit / (1000 / 3), rel=1e-12)
    # the leaders' ring: 2(L-1) steps of a third of the model over 10 ms, 100 Mbit/s links; both ends of a
    # step post at once, so each step is the notice's 10 ms, then the transfer
    assert row["ring_s"] == pytest.approx(2 * 2 * (2 * 10e-3 + mbit / 3 / 100), rel=1e-12)
    assert row["compute_s"] == 0.5
    # latency-bound: two values, two regions; the round is the latencies (plus a few bits' worth)
    two = loads_topology(_mesh([4, 4], port_mbps=1000.0, intra_ms=1.0))
    tiny = simulate(two, RoundConfig(params=2, rounds=1, compute_s=0.0, jitter=False, churn=False)).rows[0]
    bits = 64 / (1e9 / 3)
    want = (2e-3 + bits) + (1e-3 + bits) + 2 * (2 * 10e-3 + 32 / 100e6)
    assert tiny["round_s"] == pytest.approx(want, rel=1e-12)


def test_diloco_rounds_add_inner_steps_and_idle_time_is_what_compute_leaves():
    """DiLoCo's round is H inner steps then the same all-reduce (of the pseudo-gradient, the model's size);
    each node's live time splits exactly into its compute and its idle time."""
    from edgeray.cli import DILOCO_H
    from edgeray.train.strategies.diloco import DiLoCoParams

    assert DiLoCoParams().h == DILOCO_H  # the CLI's default is the strategy's
    topo = loads_topology(_mesh([4, 4, 4], port_mbps=1000.0, intra_ms=1.0))
    base = RoundConfig(params=300_000, rounds=2, compute_s=0.5, jitter=False, churn=False)
    sync, diloco = simulate(topo, base), simulate(topo, RoundConfig(**{**base.__dict__, "local_steps": 20}))
    for a, b in zip(sync.rows, diloco.rows, strict=True):
        assert b["round_s"] == pytest.approx(a["round_s"] + 19 * 0.5, rel=1e-12)
        assert b["inter_region_bytes"] == a["inter_region_bytes"]
        busy = sum(b[f"live_s_{t}"] - b[f"idle_s_{t}"] for t in ("micro",))
        assert busy == pytest.approx(12 * 20 * 0.5, rel=1e-12)  # 12 nodes x 20 steps x 0.5 s
    s = diloco.summary()
    assert s["steps"] == 40 and s["local_steps"] == 20
    idle = 1 - 12 * 20 * 0.5 / sum(r["live_s_micro"] for r in diloco.rows[:1])
    assert s["idle_fraction_by_tier"]["micro"] == pytest.approx(idle, rel=1e-9)
    with pytest.raises(SimError, match="local_steps = 0: must be >= 1"):
        RoundConfig(local_steps=0).check()


def test_the_flat_ring_is_bound_by_its_slowest_hop_and_sends_the_closed_form_bytes():
    """``sync``'s flat ring over every node (rank order region by region): 2(n-1) steps, each as long as its
    slowest hop (here the 10 ms, 100 Mbit/s WAN hops where the ring leaves a region) plus that hop's ready
    notice (every rank posts its receive when it sends); every rank sends 2(n-1)/n of the model, the ranks
    at a region's end across the WAN."""
    topo = loads_topology(_mesh([4, 4, 4], port_mbps=1000.0, intra_ms=1.0))
    n, params = 12, 1_200_000
    res = simulate(topo, RoundConfig(params=params, rounds=2, allreduce="ring", jitter=False, churn=False))
    chunk = params * 4 / n
    for row in res.rows:
        assert row["ring_s"] == pytest.approx(2 * (n - 1) * (2 * 10e-3 + chunk * 8 / 100e6), rel=1e-12)
        assert row["reduce_s"] == row["broadcast_s"] == 0 and row["compute_s"] == 0.5
        assert row["inter_region_bytes"] == 3 * 2 * (n - 1) * chunk
        assert row["intra_region_bytes"] == 9 * 2 * (n - 1) * chunk
    # uneven chunks (tensor_split): every chunk crosses each rank's link once per phase but its own two
    uneven = simulate(topo, RoundConfig(params=1001, rounds=1, allreduce="ring", churn=False)).rows[0]
    assert uneven["intra_region_bytes"] + uneven["inter_region_bytes"] == 2 * (n - 1) * 1001 * 4
    with pytest.raises(SimError, match="codec = 'int8': the flat ring"):
        RoundConfig(allreduce="ring", codec="int8").check()


def test_bandwidth_shares_are_the_fabric_link_models():
    topo = generate(FleetSpec(nodes=80, regions=6, seed=2))
    fleet = FleetArrays(topo)
    live = np.arange(fleet.n)
    plan = plan_round(fleet, live, 1000, "none")
    model = LinkModel(topo)
    for messages in (plan.reduce, plan.ring[0], plan.broadcast):
        flows = [(fleet.names[a], fleet.names[b]) for a, b in zip(messages.src, messages.dst, strict=True)]
        want = model.flow_bandwidths(flows)
        assert messages.bandwidth_mbps.tolist() == want.tolist()
        for (a, b), bw in zip(flows[:5], messages.bandwidth_mbps[:5], strict=False):
            link = topo.route(a, b).link
            i = fleet.names.index(a)
            assert messages.latency_ms[list(messages.src).index(i)] == link.latency_ms
            assert bw == model.bandwidth_mbps(a, b, flows)


@pytest.mark.parametrize("nodes,regions", [(40, 4), (300, 9), (1200, 16)])
def test_the_vectorised_engine_equals_a_simpy_process_per_node(nodes, regions):
    """Same sampled costs (jitter, loss, permanent and transient stragglers, churn), every node's clock after
    every round: equal to the last bit."""
    topo = generate(
        FleetSpec(nodes=nodes, regions=regions, stragglers=0.1, availability=0.9, mtbf_s=200, seed=nodes)
    )
    config = RoundConfig(params=20_000, rounds=8, transient=0.1, codec="int8", seed=1)
    res = simulate(topo, config, trace=True)
    assert res.clocks is not None
    assert min(r["live"] for r in res.rows) < nodes  # churn happened
    ref = replay(res)
    for mine, theirs in zip(res.clocks, ref, strict=True):
        assert np.array_equal(np.isnan(mine), np.isnan(theirs))
        assert np.nanmax(np.abs(mine - theirs)) == 0.0


def test_a_seed_gives_one_fleet_and_one_run():
    spec = FleetSpec(nodes=500, regions=7, stragglers=0.2, seed=5)
    a, b = generate(spec), generate(spec)
    assert a.digest() == b.digest() and loads_topology(to_yaml(a)).digest() == a.digest()
    sizes = [len(r.nodes) for r in a.regions.values()]
    assert sum(sizes) == 500 and min(sizes) >= 1
    assert sum(1 for n in a.nodes.values() if n.slowdown == 5.0) == pytest.approx(100, abs=30)
    config = RoundConfig(params=1000, rounds=5, transient=0.2)
    assert simulate(a, config).rows == simulate(b, config).rows
    assert generate(FleetSpec(nodes=500, regions=7, seed=6)).digest() != a.digest()
    rng = np.random.default_rng(0)
    even = region_sizes(FleetSpec(nodes=103, regions=10, size_sigma=0), rng)
    assert sorted(even.tolist()) == [10] * 7 + [11] * 3


@pytest.mark.parametrize(
    "spec,message",
    [
        (FleetSpec(nodes=5, regions=9), "regions = 9: must be in [1, nodes = 5]"),
        (FleetSpec(tiers={"device": 0.5}), "fractions sum to 0.5, must sum to 1"),
        (FleetSpec(tiers={"phone": 1.0}), "unknown tier(s) ['phone']"),
        (FleetSpec(stragglers=1.5), "stragglers = 1.5: must be in [0, 1]"),
        (FleetSpec(availability=0.0), "availability = 0.0: must be in (0, 1]"),
    ],
)
def test_a_bad_fleet_spec_names_the_field_and_what_is_valid(spec, message):
    with pytest.raises(GeneratorError) as info:
        generate(spec)
    assert message in str(info.value)


def test_the_cli_spec_parses_and_refuses_unknown_names():
    spec = FleetSpec.parse("nodes=2000,regions=20,stragglers=0.05,tiers=device:0.5/cloud:0.5,seed=3")
    assert (spec.nodes, spec.regions, spec.stragglers, spec.seed) == (2000, 20, 0.05, 3)
    assert spec.tiers == {"device": 0.5, "cloud": 0.5}
    with pytest.raises(GeneratorError, match="'node=5' is not NAME=VALUE"):
        FleetSpec.parse("node=5")
    with pytest.raises(GeneratorError, match="nodes = 'many' is not a number"):
        FleetSpec.parse("nodes=many")


def test_a_round_config_it_cannot_honour_is_refused_by_name():
    topo = loads_topology(_mesh([2, 2]))
    with pytest.raises(SimError, match="codec = 'topk': not ring-compatible"):
        simulate(topo, RoundConfig(codec="topk"))
    with pytest.raises(SimError, match="rounds = 0: must be >= 1"):
        simulate(topo, RoundConfig(rounds=0))


def test_edgeray_sim_writes_a_run_directory_and_refuses_bad_input(tmp_path):
    out = tmp_path / "run"
    res = run_cli("sim", "nodes=300,regions=6,stragglers=0.1", "--rounds", "12", "--transient", "0.05",
                  "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "loss of the model is not simulated" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["round"] for r in rows] == list(range(12)) and summary["rounds"] == 12
    assert summary["modelled_s"] == rows[-1]["end_s"] and summary["loss_simulated"] is False
    assert summary["inter_region_bytes"] == sum(r["inter_region_bytes"] for r in rows)
    assert (out / "rounds.png").stat().st_size > 10_000
    # the same fleet from its YAML file gives the same run
    path = tmp_path / "fleet.yaml"
    path.write_text(to_yaml(generate(FleetSpec(nodes=300, regions=6, stragglers=0.1))))
    again = run_cli(
        "sim", str(path), "--rounds", "12", "--transient", "0.05", "--out", str(tmp_path / "again")
    )
    assert again.returncode == 0, again.stderr
    assert pq.read_table(tmp_path / "again" / "rounds.parquet").to_pylist() == rows
    # a calibration (jobs/calibrate_sim.py's file) slows every message: the same run takes longer
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"overhead_s": 0.01, "goodput": 0.5}))
    slower = run_cli(
        "sim", str(path), "--rounds", "12", "--transient", "0.05", "--calibration", str(calibration),
        "--out", str(tmp_path / "calibrated"),
    )  # fmt: skip
    assert slower.returncode == 0, slower.stderr
    assert (
        json.loads((tmp_path / "calibrated" / "summary.json").read_text())["modelled_s"]
        > summary["modelled_s"]
    )
    for args, message in [
        (["nodes=3,regions=9"], "regions = 9: must be in [1, nodes = 3]"),
        (["local", "--codec", "topk"], "codec = 'topk': not ring-compatible"),
        (["nowhere.yaml"], "nowhere.yaml"),
        (["local", "--workload", "async", "--calibration", str(calibration)], "--calibration: not an option"),
        (["local", "--workload", "diloco", "--fragments", "3"], "--fragments: not an option of the diloco"),
        (["local", "--workload", "gossip", "--codec", "int8"], "--codec: not an option of the gossip"),
        (["local", "--calibration", str(tmp_path / "none.json")], "none.json: cannot read it as JSON"),
    ]:
        bad = run_cli("sim", *args, "--out", str(tmp_path / "bad"))
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


# --- Streaming DiLoCo ---------------------------------------------------------------------------------------


def test_streaming_diloco_syncs_fragments_on_the_runtimes_schedule():
    from edgeray.sim.streaming import fragment_offsets
    from edgeray.train.strategies.streaming_diloco import StreamingDiLoCo, StreamingParams

    for h, f in [(30, 4), (20, 4), (6, 3), (7, 7), (5, 1)]:
        runtime = StreamingDiLoCo(StreamingParams(h=h, fragments=f)).offsets(f)
        assert fragment_offsets(h, f) == runtime


def test_streaming_diloco_hides_what_overlap_covers_and_cuts_the_peak_by_the_fragment_count():
    """No jitter, no stragglers: every inner step takes c on every node and a fragment's all-reduce T (one
    engine round of params / F values). overlap 0 adds F x T per round of h steps; an overlap of k steps
    with k c >= T hides it all (only the last merge can outlast the run); a fragment moves 1/F of
    DiLoCo's inter-region bytes."""
    from edgeray.sim.streaming import StreamingConfig, simulate_streaming

    topo = loads_topology(_mesh([3, 2, 2]))
    c, h, f, params = 0.5, 8, 4, 40_000
    one = simulate(topo, RoundConfig(params=params // f, rounds=1, compute_s=0, jitter=False, churn=False,
                                     codec="int4")).rows[0]  # fmt: skip
    t = one["round_s"]
    base = {"params": params, "compute_s": c, "rounds": 3, "h": h, "fragments": f, "jitter": False}
    blocking = simulate_streaming(topo, StreamingConfig(**base, overlap=0)).summary()
    assert blocking["modelled_s"] == pytest.approx(3 * (h * c + f * t), rel=1e-9)
    assert blocking["exposed_s"] == pytest.approx(3 * f * t, rel=1e-9)
    assert t < c  # one step of overlap covers the all-reduce
    hidden = simulate_streaming(topo, StreamingConfig(**base, overlap=1)).summary()
    # fragment 0 syncs at the run's last step (offset 0): its merge is the one that outlasts the run
    assert hidden["modelled_s"] == pytest.approx(3 * h * c + t, rel=1e-9)
    assert hidden["exposed_s"] == pytest.approx(t, rel=1e-9)
    assert hidden["outer_syncs"] == 3 * f and hidden["steps"] == 3 * h
    diloco = simulate(topo, RoundConfig(params=params, rounds=1, compute_s=0, jitter=False, churn=False,
                                        codec="int4")).rows[0]  # fmt: skip
    assert hidden["peak_outer_inter_region_bytes"] == one["inter_region_bytes"]
    assert hidden["inter_region_bytes"] == 3 * f * one["inter_region_bytes"]
    # int4's per-block scales weigh a little more on smaller chunks: within 10% of DiLoCo's / F
    assert one["inter_region_bytes"] == pytest.approx(diloco["inter_region_bytes"] / f, rel=0.1)
    # churn: nodes up half the time (MTBF 2 s, 0.5 s steps) sit steps and syncs out; syncs plan over the
    # nodes up then, so they move fewer bytes; churn=False is the run without it
    churny = "{name: r0-1, churn: {availability: 0.5, mtbf_s: 2}}, {name: r0-2, churn: {availability: 0.5, mtbf_s: 2}}"
    flaky = loads_topology(_mesh([3, 2, 2]).replace("{name: r0-1}, {name: r0-2}", churny))
    churned = simulate_streaming(flaky, StreamingConfig(**base, overlap=1)).summary()
    assert churned["live_min"] < 7 and churned["intra_region_bytes"] < hidden["intra_region_bytes"]
    calm = simulate_streaming(flaky, StreamingConfig(**base, overlap=1, churn=False)).summary()
    assert calm["intra_region_bytes"] == hidden["intra_region_bytes"] and calm["live_min"] == 7
    with pytest.raises(SimError, match=r"fragments = 9: must be in \[1, h = 8\]"):
        simulate_streaming(topo, StreamingConfig(**{**base, "fragments": 9}))
    with pytest.raises(SimError, match=r"overlap = 8: must be in \[0, h = 8\)"):
        simulate_streaming(topo, StreamingConfig(**base, overlap=8))


def test_a_parameter_server_worker_that_is_up_half_the_time_pushes_about_half_the_gradients():
    """Churn in the server engine: r2-0 is up for Exp(2 s), down for Exp(2 s); its step in flight is lost
    when it fails, and back it fetches the parameters first. Async: ~0.44 of the others' gradients (as the
    gossip engine's worker). SSP with bound 0 still finishes: a worker that is down, or back, holds nobody
    back."""
    from edgeray.sim.server import ServerConfig, simulate_server

    churny = "{name: r2-0, churn: {availability: 0.5, mtbf_s: 2}}"
    topo = loads_topology(_mesh([1, 1, 1]).replace("{name: r2-0}", churny))
    result = simulate_server(topo, ServerConfig(params=1000, compute_s=0.5, rounds=600, jitter=False, seed=0))
    steps = dict(zip(["r0-0", "r1-0", "r2-0"], result.steps.tolist(), strict=True))
    assert 0.3 < steps["r2-0"] / steps["r0-0"] < 0.6 and result.lost_steps > 50, (steps, result.lost_steps)
    calm = simulate_server(
        topo, ServerConfig(params=1000, compute_s=0.5, rounds=600, jitter=False, churn=False)
    )
    assert calm.lost_steps == 0 and calm.steps.sum() == 1800 and min(calm.steps) > 550
    ssp = simulate_server(topo, ServerConfig(params=1000, compute_s=0.5, rounds=200, bound=0, jitter=False))
    assert ssp.updates == 600 and ssp.lost_steps > 0 and ssp.waits > 0
    # back, it takes the slowest live worker's step count (the runtime's join rule): had it kept its own, the
    # lock-step bound would hold the others until it caught up, and it would push as many gradients as they do
    ssp_steps = dict(zip(["r0-0", "r1-0", "r2-0"], ssp.steps.tolist(), strict=True))
    assert ssp_steps["r2-0"] < 0.7 * ssp_steps["r0-0"], ssp_steps


# --- gossip -------------------------------------------------------------------------------------------------


def test_gossip_steps_are_compute_then_one_exchange_and_nobody_waits_for_a_straggler():
    """Two workers in two regions, no jitter: each step is c of compute then an exchange of T = 10 ms +
    4P x 8 bits / 100 Mbit/s (the longer direction; both alike), so R rounds end at R (c + T) with R steps
    each and 2 x 4P bytes per step across regions. With a third worker 5x slower, the others do not wait:
    they make about 5x its steps."""
    from edgeray.sim.gossip import GossipConfig, simulate_gossip

    topo = loads_topology(_mesh([1, 1]))
    params, c, rounds = 100_000, 0.5, 6
    s = simulate_gossip(topo, GossipConfig(params=params, compute_s=c, rounds=rounds, jitter=False)).summary()
    t = 0.010 + params * 4 * 8 / 100e6
    assert s["modelled_s"] == pytest.approx(rounds * (c + t), rel=1e-12)
    assert (s["steps_min"], s["steps_max"], s["steps"]) == (rounds, rounds, 2 * rounds)
    assert s["inter_region_bytes"] == 2 * rounds * 2 * params * 4 and s["intra_region_bytes"] == 0
    assert s["exchange_s_mean"] == pytest.approx(t, rel=1e-12)
    slow = loads_topology(_mesh([1, 1, 1]).replace("{name: r2-0}", "{name: r2-0, slowdown: 5}"))
    s = simulate_gossip(slow, GossipConfig(params=1000, compute_s=c, rounds=40, jitter=False)).summary()
    assert s["steps"] == 120 and s["steps_min"] * 4 < s["steps_max"] < s["steps_min"] * 6
    with pytest.raises(SimError, match="compute_s = 0: must be > 0"):
        simulate_gossip(topo, GossipConfig(compute_s=0))


def test_a_gossip_worker_that_is_up_half_the_time_makes_about_half_the_steps():
    """Churn in continuous time: r2-0 is up for Exp(2 s) and down for Exp(2 s) (availability 0.5, ~100
    failures in the run); it loses the step it was computing when it fails (about a quarter of a 2 s up
    period: 0.5 x 7/8 ~ 0.44 of the others' steps expected; 0.39-0.51 over ten seeds) and fetches the model
    before its next one; the others never wait for it."""
    from edgeray.sim.gossip import GossipConfig, simulate_gossip

    churny = "{name: r2-0, churn: {availability: 0.5, mtbf_s: 2}}"
    topo = loads_topology(_mesh([1, 1, 1]).replace("{name: r2-0}", churny))
    result = simulate_gossip(topo, GossipConfig(params=1000, compute_s=0.5, rounds=600, jitter=False, seed=3))
    steps = dict(zip(["r0-0", "r1-0", "r2-0"], result.steps.tolist(), strict=True))
    assert 0.3 < steps["r2-0"] / steps["r0-0"] < 0.55, steps
    assert abs(steps["r0-0"] - steps["r1-0"]) < 0.1 * steps["r0-0"]
    assert result.lost_steps == result.rejoins > 0
    calm = simulate_gossip(
        topo, GossipConfig(params=1000, compute_s=0.5, rounds=600, jitter=False, churn=False)
    )
    assert calm.lost_steps == 0 and calm.steps.tolist() == [600, 600, 600]


# --- calibration against the emulated cluster ---------------------------------------------------------------


def test_overhead_and_goodput_apply_to_every_message():
    """Each transfer takes latency + overhead + bytes / (share x goodput) once its ready notice (one more
    latency, never scaled) has crossed: with no jitter, the reduce (one message on the critical path) and
    the leaders' ring (2(L-1) = 2 steps) follow that formula exactly."""
    topo = loads_topology(_mesh([2, 2]))
    base = simulate(topo, RoundConfig(params=50_000, rounds=1, compute_s=0, jitter=False, churn=False))
    o, g = 0.003, 0.6
    calibrated = simulate(
        topo,
        RoundConfig(params=50_000, rounds=1, compute_s=0, jitter=False, churn=False, overhead_s=o, goodput=g),
    )
    r0, r1 = base.rows[0], calibrated.rows[0]
    intra, inter = 0.001, 0.010  # the mesh's latencies
    assert r1["reduce_s"] == pytest.approx(2 * intra + o + (r0["reduce_s"] - 2 * intra) / g, rel=1e-12)
    assert r1["ring_s"] == pytest.approx(2 * (2 * inter + o) + (r0["ring_s"] - 4 * inter) / g, rel=1e-12)
    with pytest.raises(SimError, match=r"goodput = 0.0: must be in \(0, 10\]"):
        simulate(topo, RoundConfig(goodput=0.0))
    with pytest.raises(SimError, match=r"overhead_s = -1\.0: must be >= 0"):
        simulate(topo, RoundConfig(overhead_s=-1.0))


def test_the_calibration_fit_recovers_parameters_it_was_given(tmp_path):
    """Rows "emulated" by the simulator itself with known parameters: the fit on two sizes finds them
    again, and the held-out size is predicted within a fraction of the tolerance."""
    from edgeray.sim.calibrate import PHASES, Calibration, compare, fit_calibration, load_calibration

    topo = load_topology(resolve_topology_path("local"))
    truth = Calibration(overhead_s=0.0015, goodput=0.7)
    seeds = range(3)
    rows = []
    for strategy, allreduce in (("hierarchical", "hierarchical"), ("sync", "ring")):
        for size in (10_000, 100_000, 1_000_000):
            for s in seeds:
                row = simulate(
                    topo,
                    truth.config(
                        params=size, rounds=1, compute_s=0.0, churn=False, seed=s, allreduce=allreduce
                    ),
                ).rows[0]
                rows.append({"strategy": strategy, "values": size, "rep": s, **{p: row[p] for p in PHASES},
                             "round_s": row["round_s"]})  # fmt: skip
    fit = fit_calibration(topo, rows, train=[10_000, 1_000_000], seeds=seeds)
    assert fit.overhead_s == pytest.approx(truth.overhead_s, abs=2.5e-4)
    assert fit.goodput == pytest.approx(truth.goodput, rel=0.05)
    report = compare(topo, rows, fit, seeds=seeds)
    held = [r for r in report if r["held_out"]]
    assert {r["values"] for r in held} == {100_000} and all(abs(r["error"]) < 0.03 for r in held), held
    assert any(abs(r["raw_error"]) > 0.1 for r in held)  # uncalibrated, it was off
    # the file the job writes, and files that are not one
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(fit.to_dict()))
    assert load_calibration(path) == fit
    path.write_text(json.dumps({"overhead_s": 0.001, "goodput": "fast"}))
    with pytest.raises(SimError, match="goodput = 'fast': expected a number"):
        load_calibration(path)
    path.write_text(json.dumps({"overhead_s": 0.001, "goodput": 0}))
    with pytest.raises(SimError, match=r"goodput = 0.0: must be in \(0, 10\]"):
        load_calibration(path)


# --- the inference workload -------------------------------------------------------------------------------

FLAT = ServiceModel(ttft_ms=50.0, ttft_slope_ms=0.0, itl_ms=10.0, itl_slope_ms=0.0)
"""Service time independent of the batch: 50 + 31 x 10 = 360 ms per 32-token request."""


def _erlang_b(c: int, a: float) -> float:
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


@pytest.mark.parametrize("capacity,rate", [(4, 8.0), (8, 20.0)])
def test_one_region_with_poisson_arrivals_blocks_as_erlang_b(capacity, rate):
    """A region whose replicas are full rejects: with the budget out of the way it is an M/G/c/c loss system,
    whose blocking probability is Erlang's B formula for c slots and offered load rate x service time."""
    topo = loads_topology(_mesh([2]))
    config = ServingConfig(requests=60_000, rate_per_s=rate, capacity=capacity, budget_ms=1e9, seed=1)
    result = simulate_serving(topo, config, FLAT)
    offered = rate * (50.0 + 31 * 10.0) / 1e3
    assert result.summary()["rejected"] == pytest.approx(_erlang_b(capacity, offered), abs=0.01)
    served = result.served_by >= 0
    # every served request: the engine's TTFT plus the intra-region link in and out (1 ms each + bytes)
    link_ms = 2 * 1.0 + (512 + 256) * 8 / (1000.0 * 1e3)
    assert np.allclose(result.ttft_ms[served], 50.0 + link_ms)


def test_a_full_region_spills_to_the_nearest_and_a_slow_one_is_skipped_by_budget():
    """The router's own policy: the caller's region first; full, the nearest other region; slower than the
    budget (after three first-token samples), not at all."""
    topo = loads_topology(_mesh([1, 1, 1]))
    # r0 calls 4 at once; each region holds 1: r0, then the two others (10 ms away), then rejected
    times, caller = np.zeros(4), np.zeros(4, dtype=np.int32)
    result = simulate_serving(topo, ServingConfig(capacity=1, budget_ms=1e9), FLAT, arrivals=(times, caller))
    assert sorted(result.served_by.tolist()) == [-1, 0, 1, 2] and result.served_by[0] == 0
    assert result.summary()["regions"]["r0"]["spilled"] == 0.5
    # an engine slower (150 ms) than the 100 ms budget: the router's optimistic guess admits requests until
    # three first tokens have been seen, then refuses until those samples leave its 10 s window
    slow = ServiceModel(ttft_ms=150.0, ttft_slope_ms=0.0, itl_ms=1.0, itl_slope_ms=0.0)
    one = loads_topology(_mesh([1]))
    times = np.arange(0.0, 12.0, 1.0)
    out = simulate_serving(one, ServingConfig(capacity=64), slow, arrivals=(times, np.zeros(12, np.int32)))
    # 0, 1, 2 admitted (samples at 0.15, 1.15, 2.15 s); 3..10 refused; at 11 s the 0.15 s sample has left
    assert (out.served_by >= 0).tolist() == [True] * 3 + [False] * 8 + [True]


def test_the_service_model_fits_the_serving_benchmark_and_refuses_what_is_not_one(tmp_path):
    line = {c: (17.0 + 4.0 * (c - 1), 8.0 + 0.25 * (c - 1)) for c in (1, 8, 32)}
    summary = {"edgeray": {str(c): {"p50_ttft_ms": t, "p50_itl_ms": i} for c, (t, i) in line.items()}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    model = ServiceModel.from_bench(path)
    assert (model.ttft(1), model.ttft(32), model.itl(8)) == pytest.approx((17.0, 141.0, 9.75))
    path.write_text("{}")
    with pytest.raises(SimError, match=r"summary\.json: not a jobs/bench_serve\.py summary"):
        ServiceModel.from_bench(path)
    with pytest.raises(SimError, match="capacity=0: must be >= 1; weights='zipf'"):
        simulate_serving(loads_topology(_mesh([1])), ServingConfig(capacity=0, weights="zipf"))


def test_edgeray_sim_serving_writes_requests_summary_and_plot(tmp_path):
    out = tmp_path / "serving"
    trace = tmp_path / "trace.csv"
    trace.write_text("t_s,region\n0.2,metro\n0.0,campus\n0.1,cloud\n")
    res = run_cli("sim", "local", "--workload", "serving", "--requests", "3000", "--rate", "30",
                  "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = pq.read_table(out / "requests.parquet").to_pylist()
    assert len(rows) == summary["requests"] == 3000
    assert sum(r["served_by"] == r["caller"] for r in rows) / 3000 == pytest.approx(summary["in_region"])
    assert sum(v["requests"] for v in summary["regions"].values()) == 3000
    assert (out / "serving.png").stat().st_size > 10_000
    res = run_cli(
        "sim", "local", "--workload", "serving", "--trace", str(trace), "--out", str(tmp_path / "t")
    )
    assert res.returncode == 0, res.stderr
    rows = pq.read_table(tmp_path / "t" / "requests.parquet").to_pylist()
    assert [(r["arrival_s"], r["caller"], r["served_by"]) for r in rows] == [
        (0.0, "campus", "campus"), (0.1, "cloud", "cloud"), (0.2, "metro", "metro")
    ]  # fmt: skip
    trace.write_text("t_s,region\n0.2,mars\n")
    for args, message in [
        (["--workload", "serving", "--rounds", "3"], "--rounds: not an option of the serving workload"),
        (["--workload", "serving", "--trace", str(trace)], "unknown regions ['mars']"),
    ]:
        bad = run_cli("sim", "local", *args, "--out", str(tmp_path / "bad"))
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_the_default_service_model_is_the_fit_of_the_readme_benchmark_run():
    """The built-in service times are fit() of the README's bench_serve figures (edgeray side), not typed in."""
    readme = {1: (22.0, 6.0), 8: (60.7, 8.4), 32: (196.6, 15.8)}
    fitted, default = ServiceModel.fit(readme), ServiceModel()
    for k in (1, 8, 16, 32):
        assert default.ttft(k) == pytest.approx(fitted.ttft(k), abs=0.1)
        assert default.itl(k) == pytest.approx(fitted.itl(k), abs=0.02)


# --- the parameter-server strategies ------------------------------------------------------------------------


def test_the_server_goes_where_the_runtime_puts_it():
    from edgeray.sim.server import server_node
    from edgeray.topology import load_topology, resolve_topology_path
    from edgeray.train.sync import default_server_node

    for topo in (
        load_topology(resolve_topology_path("local")),
        loads_topology(_mesh([1, 2, 3])),
        generate(FleetSpec(nodes=120, regions=6, seed=3)),
    ):
        fleet = FleetArrays(topo)
        assert fleet.names[server_node(fleet)] == default_server_node(topo, list(topo.nodes)), topo.name


def test_async_and_ssp_follow_the_runtime_event_rules():
    from edgeray.sim.server import ServerConfig, simulate_server

    # one node: the server on it; every update is compute + the intra-node transfer up and back
    one = loads_topology(_mesh([1]))
    res = simulate_server(one, ServerConfig(params=1000, compute_s=0.5, rounds=7, jitter=False)).summary()
    t = 0.005e-3 + 4000 * 8 / 100_000e6
    # the run ends, as the runtime's clock does, when the server applies the last update (before its pull)
    assert res["modelled_s"] == pytest.approx(7 * (0.5 + 2 * t) - t, rel=1e-12)
    assert res["updates"] == 7 and res["staleness_max"] == 0 and res["inter_region_bytes"] == 0
    # a 5x straggler among six: ssp with bound 0 is lock-step (every step waits for the straggler's last),
    # async lets the others run ahead, and a staleness limit of 0 drops exactly the stale gradients
    text = _mesh([3, 3]).replace("{name: r1-2}", "{name: r1-2, slowdown: 5}")
    topo = loads_topology(text)
    base = {"params": 10_000, "compute_s": 0.5, "rounds": 10, "jitter": False}
    ssp0 = simulate_server(topo, ServerConfig(**base, bound=0)).summary()
    free = simulate_server(topo, ServerConfig(**base)).summary()
    limited = simulate_server(topo, ServerConfig(**base, staleness=0))
    assert ssp0["modelled_s"] >= 10 * 2.5 and ssp0["ssp_waits"] > 0
    assert free["modelled_s"] < ssp0["modelled_s"] / 2 and free["ssp_waits"] == 0
    assert free["staleness_max"] > ssp0["staleness_max"]
    assert limited.dropped == int((limited.staleness > 0).sum()) > 0 and limited.updates == 60
    assert free["updates"] == ssp0["updates"] == 60
    # eight workers in one region in lock-step (ssp, bound 0: 5 updates each), 4 MB gradients: the server's
    # 1000 Mbit/s port takes one at a time, so the 7 remote workers' 35 pushes need at least 35 x 32 ms of
    # it (the runtime's clock has no such queue)
    crowd = loads_topology(_mesh([8]))
    cfg = {"params": 1_000_000, "compute_s": 0.001, "rounds": 5, "jitter": False, "bound": 0}
    queued = simulate_server(crowd, ServerConfig(**cfg)).summary()["modelled_s"]
    unqueued = simulate_server(crowd, ServerConfig(**cfg, server_port=False)).summary()["modelled_s"]
    assert queued >= 35 * 0.032 > 3 * unqueued
    with pytest.raises(SimError, match="ssp takes a bound, async a staleness limit"):
        ServerConfig(bound=1, staleness=1).check()
    # a limit far below the worker count (50 workers, staleness 0) drops nearly every gradient: refused by
    # name after ten runs' worth of drops instead of simulating for hours
    with pytest.raises(SimError, match=r"staleness = 0 drops .* raise staleness"):
        simulate_server(loads_topology(_mesh([50])), ServerConfig(params=1000, rounds=1, staleness=0))


def test_the_sweep_job_refuses_bad_sizes_and_workloads(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")}
    for args, message in [
        (["--sizes", "100x5"], "each size is NODES:REGIONS"),
        (["--sizes", "3:9", "--workloads", "gossipy"], "workload 'gossipy': valid are"),
    ]:
        out = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "sweep_sim.py"), *args, "--out", str(tmp_path / "s")],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "s").exists()
