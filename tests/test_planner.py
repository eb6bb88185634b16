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
