"""The partition planner: data locality, layers by CPUs, and a clear refusal when memory cannot fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeray.model import build_model
from edgeray.model.presets import PRESETS
from edgeray.topology import load_topology, loads_topology
from edgeray.train.planner import PlanError, _stage_params, plan_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_parameter_count_matches_the_real_model():
    for name in PRESETS:
        model = build_model(name)
        n = PRESETS[name].num_hidden_layers
        assert _stage_params(PRESETS[name], 0, n) == sum(p.numel() for p in model.parameters())


def test_stage_zero_on_the_data_node_then_nearest_nodes_and_layers_by_cpu():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    plan = plan_pipeline(topo, preset="tiny-8l", stages=3, data_node="campus-jetson")
    assert plan.nodes[0] == "campus-jetson"
    assert plan.nodes[1] == "campus-gw"  # same region: the nearest
    assert sum(b - a for a, b in (s.layers for s in plan.stages)) == 8
    assert plan.stages[0].layers[0] == 0 and plan.stages[-1].layers[1] == 8
    assert "campus-jetson" in plan.table()


def test_a_plan_that_cannot_fit_is_refused_with_the_plan_and_shortfall():
    topo = loads_topology(
        "name: m\nregions:\n  - {name: a, tier: device, nodes: [{name: phone, memory_gb: 0.01}, {name: watch, memory_gb: 0.01}]}\n"
    )
    with pytest.raises(PlanError) as info:
        plan_pipeline(topo, preset="small", stages=2)
    message = str(info.value)
    assert "phone needs" in message and "short by" in message and "stage" in message and "layers" in message


def test_too_many_stages_is_refused():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    with pytest.raises(PlanError, match=r"stages must be in 1\.\.4"):
        plan_pipeline(topo, preset="tiny", stages=5)


def test_replicas_get_disjoint_nodes_one_region_each_and_one_layer_split():
    from edgeray.train.planner import plan_replicas

    topo = load_topology(ROOT / "clusters" / "local.yaml")
    plans = plan_replicas(topo, replicas=3, stages=2)
    nodes = [n for p in plans for n in p.nodes]
    assert len(nodes) == len(set(nodes)) == 6
    assert [topo.nodes[p.nodes[0]].region for p in plans] == ["campus", "metro", "cloud"]
    assert len({p.boundaries for p in plans}) == 1
    with pytest.raises(PlanError, match="need 8 nodes"):
        plan_replicas(topo, replicas=4, stages=2)


def test_measured_link_conditions_reroute_the_chain_around_a_slow_link():
    from edgeray.fabric.links import expected_s
    from edgeray.train.planner import LinkConditions, replan

    topo = load_topology(ROOT / "clusters" / "local.yaml")
    plan = plan_pipeline(topo, stages=3, data_node="campus-gw")
    assert plan.nodes == ["campus-gw", "campus-jetson", "metro-mec-1"]
    declared = expected_s(topo.route("campus-gw", "campus-jetson").link, 65536)
    rows = [
        # the fastest sample counts: a late receiver only inflates samples
        {"op": "activations", "src": "campus-gw", "dst": "campus-jetson", "bytes": 65536, "seconds": s}
        for s in (declared * 40, declared * 30, declared * 55)
    ] + [
        {"op": "targets", "src": "campus-gw", "dst": "metro-mec-1", "bytes": 100, "seconds": 9.0}
    ]  # too small
    conditions = LinkConditions.from_arrivals(topo, rows)
    assert conditions.slowdown(topo, "campus-jetson", "campus-gw") == pytest.approx(30)
    assert conditions.slowdown(topo, "campus-gw", "metro-mec-1") == 1.0
    moved = replan(topo, plan, conditions)
    assert moved.nodes[0] == "campus-gw" and "campus-jetson" not in moved.nodes
    assert [s.layers for s in moved.stages] == [s.layers for s in plan.stages]
    assert conditions.chain_ms(topo, moved.nodes) < conditions.chain_ms(topo, plan.nodes) / 1.25
    assert replan(topo, plan, LinkConditions()).nodes == plan.nodes  # as declared: nothing moves
    assert "campus-gw->campus-jetson x30.0" in conditions.describe(topo, plan.nodes)
    # A later window that did not use the jetson keeps what was measured on it.
    later = conditions.merged(LinkConditions.from_arrivals(topo, []))
    assert later.slowdown(topo, "campus-gw", "campus-jetson") == pytest.approx(30)
