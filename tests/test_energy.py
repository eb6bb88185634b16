"""Energy and cost accounting (edgeray.energy) and the topology's price fields, against hand computations."""

from __future__ import annotations

import pytest

from edgeray.energy import account, egress_by_region, node_joules, over_budget
from edgeray.topology import TIER_COST, Tier, Topology, TopologyError

DOC = {
    "name": "bill",
    "regions": [
        {"name": "phones", "tier": "device", "nodes": [
            {"name": "p1", "power": {"idle_w": 0.5, "busy_w": 5, "budget_wh": 0.01}},
            {"name": "p2", "power": {"idle_w": 0.5, "busy_w": 5}},
        ]},
        {"name": "dc", "tier": "cloud", "cost": {"egress_usd_per_gb": 0.05},
         "nodes": [{"name": "gpu", "power": {"idle_w": 100, "busy_w": 400}}]},
    ],
    "links": [{"between": ["phones", "dc"]}],
    "defaults": {"cost": {"device": {"energy_usd_per_kwh": 0.40}}},
}  # fmt: skip


@pytest.fixture(scope="module")
def topo() -> Topology:
    return Topology.from_dict(DOC)


def test_prices_come_from_the_region_then_the_tier_defaults_then_the_built_in_table(topo):
    phones, dc = topo.regions["phones"].cost, topo.regions["dc"].cost
    assert phones.energy_usd_per_kwh == 0.40  # defaults.cost.device
    assert phones.node_hour_usd == TIER_COST[Tier.DEVICE].node_hour_usd  # built in
    assert dc.egress_usd_per_gb == 0.05  # the region's own
    assert dc.node_hour_usd == TIER_COST[Tier.CLOUD].node_hour_usd


def test_a_bad_price_is_refused_by_field():
    bad = {**DOC, "regions": [{**DOC["regions"][1], "cost": {"node_hour_usd": -1}}]}
    with pytest.raises(TopologyError, match=r"regions\[0\]\.cost\.node_hour_usd"):
        Topology.from_dict({**bad, "links": []})
    with pytest.raises(TopologyError, match=r"regions\[0\]\.cost\.watts"):
        Topology.from_dict({**DOC, "regions": [{**DOC["regions"][1], "cost": {"watts": 3}}], "links": []})


def test_joules_dollars_and_per_step_figures_equal_the_hand_computation(topo):
    busy = {"p1": 30.0, "p2": 10.0, "gpu": 50.0}
    bill = account(
        topo, busy_s=busy, wall_s=100.0, egress_bytes={"phones": 2e9, "dc": 5e8}, units={"step": 20}
    )
    # idle_w x (wall - busy) + busy_w x busy, per node
    p1, p2, gpu = 0.5 * 70 + 5 * 30, 0.5 * 90 + 5 * 10, 100 * 50 + 400 * 50
    assert bill["by_node"]["p1"]["joules"] == pytest.approx(p1)
    assert bill["joules"] == pytest.approx(p1 + p2 + gpu)
    assert bill["wh"] == pytest.approx((p1 + p2 + gpu) / 3600)
    hours = 100 / 3600
    hardware = 2 * TIER_COST[Tier.DEVICE].node_hour_usd * hours + TIER_COST[Tier.CLOUD].node_hour_usd * hours
    energy = 0.40 * (p1 + p2) / 3.6e6 + TIER_COST[Tier.CLOUD].energy_usd_per_kwh * gpu / 3.6e6
    egress = TIER_COST[Tier.DEVICE].egress_usd_per_gb * 2 + 0.05 * 0.5
    assert bill["usd"]["hardware"] == pytest.approx(hardware)
    assert bill["usd"]["energy"] == pytest.approx(energy)
    assert bill["usd"]["egress"] == pytest.approx(egress)
    assert bill["usd"]["total"] == pytest.approx(hardware + energy + egress)
    assert bill["per_step"] == pytest.approx(
        {"joules": (p1 + p2 + gpu) / 20, "usd": (hardware + energy + egress) / 20}
    )
    assert bill["by_tier"]["device"]["joules"] == pytest.approx(p1 + p2)
    assert bill["by_tier"]["cloud"]["egress_usd"] == pytest.approx(0.05 * 0.5)
    assert bill["usd_per_gb_inter_region"] == pytest.approx(egress / 2.5)
    # p1's 0.01 Wh battery (36 J) is spent; p2 has no budget
    assert bill["over_budget"] == ["p1"] == over_budget(topo, {"p1": p1, "p2": p2})


def test_busy_time_is_clipped_to_the_wall_and_egress_is_read_from_ledger_rows(topo):
    assert node_joules(topo.nodes["gpu"], busy_s=5, wall_s=2) == 400 * 2
    assert node_joules(topo.nodes["gpu"], busy_s=-1, wall_s=2) == 100 * 2
    rows = [
        {"src": "p1", "dst": "gpu", "bytes": 100},  # phones -> dc
        {"src": "p1", "dst": "p2", "bytes": 7},  # inside phones: not egress
        {"src": "gpu", "dst": "p2", "bytes": 40},
        {"src": "gpu", "dst": "p1", "bytes": 2},
    ]
    assert egress_by_region(topo, rows) == {"phones": 100.0, "dc": 42.0}


def test_bench_energy_routing_prices_a_request_per_region_by_hand(topo):
    """jobs/bench_energy_routing.py's per-region price: the node-hour share of the engine time, the energy
    at the region's price, and the answer's bytes at the region's egress price when it left the caller's
    region; its digest's p95 and means."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    try:
        import bench_energy_routing as bench
    finally:
        sys.path.pop(0)
    rows = [
        {"caller": "phones", "region": "dc", "status": 200, "bytes": 4e8, "energy_j": 36.0, "engine_ms": 100.0,
         "answer_ms": 130.0},
        {"caller": "dc", "region": "dc", "status": 200, "bytes": 4e8, "energy_j": 72.0, "engine_ms": 200.0,
         "answer_ms": 201.0},
        {"caller": "dc", "status": 429, "bytes": 80},
    ]  # fmt: skip
    dc = topo.regions["dc"].cost
    want = [
        dc.node_hour_usd * 0.1 / 3600 + dc.energy_usd_per_kwh * 36 / 3.6e6 + 0.05 * 0.4,  # left for phones
        dc.node_hour_usd * 0.2 / 3600 + dc.energy_usd_per_kwh * 72 / 3.6e6,  # stayed in dc
    ]
    priced = bench.price(topo, rows)
    assert list(priced) == ["dc"]
    assert priced["dc"]["mean_usd"] == pytest.approx(sum(want) / 2)
    assert priced["dc"]["mean_energy_j"] == pytest.approx(54.0)
    d = bench.digest(rows)
    assert (d["requests"], d["answered"], d["statuses"]) == (3, 2, {"200": 2, "429": 1})
    assert d["p95_answer_ms"] == 201.0 and d["mean_energy_j"] == pytest.approx(54.0)
