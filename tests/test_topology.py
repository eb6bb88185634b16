"""The topology model: presets, link resolution and routing against independent references."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import pytest
import yaml

from edgeray.topology import (
    INTRA_NODE_LINK,
    TIER_INTER_LINK,
    TIER_INTRA_LINK,
    LinkClass,
    Tier,
    Topology,
    TopologyError,
    load_topology,
    loads_topology,
    preset_names,
    resolve_topology_path,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["local", "metro-5g", "continental"]


def _raw(name: str) -> dict:
    return yaml.safe_load((ROOT / "clusters" / f"{name}.yaml").read_text())


def _reference_graph(doc: dict) -> nx.Graph:
    """Inter-region graph built straight from the YAML document (latency as weight)."""
    g = nx.Graph()
    g.add_nodes_from(r["name"] for r in doc["regions"])
    for link in doc.get("links", []):
        g.add_edge(*link["between"], latency=link["latency_ms"])
    return g


def test_presets_are_shipped_and_valid():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        topo = load_topology(resolve_topology_path(name))
        assert topo.name == name
        assert topo.source, f"{name} must name the source of its figures"


def test_local_preset_fits_the_brief():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    assert len(topo.regions) == 3
    assert 5 <= len(topo.nodes) <= 6
    assert len({r.tier for r in topo.regions.values()}) >= 2


@pytest.mark.parametrize("name,shape", [("local", "star"), ("metro-5g", "tree"), ("continental", "mesh")])
def test_star_tree_and_mesh_fleets_are_expressible(name, shape):
    assert load_topology(resolve_topology_path(name)).shape() == shape


@pytest.mark.parametrize("name", PRESETS)
def test_path_latency_equals_networkx_shortest_path(name):
    doc = _raw(name)
    topo = Topology.from_dict(doc)
    g = _reference_graph(doc)
    for src in g.nodes:
        ref = nx.single_source_dijkstra_path_length(g, src, weight="latency")
        for dst, latency in ref.items():
            if src == dst:
                continue
            assert topo.path_latency_ms(src, dst) == pytest.approx(latency)
        # A region reaches itself over its intra link (a cell's phones talk through the base station,
        # so their own region can be farther than the site next door).
        ref[src] = topo.regions[src].intra_link.latency_ms
        nearest = topo.nearest_regions(src)
        assert {r for r, _ in nearest} == set(ref)
        assert [ms for _, ms in nearest] == pytest.approx(sorted(ref.values()))


def test_routes_by_link_class():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    same = topo.route("metro-mec-1", "metro-mec-1")
    assert same.link_class is LinkClass.INTRA_NODE and same.link == INTRA_NODE_LINK
    peer = topo.route("metro-mec-1", "metro-mec-2")
    assert peer.link_class is LinkClass.INTRA_REGION
    assert peer.link == TIER_INTRA_LINK[Tier.REGIONAL]  # no override in the file: the tier default
    far = topo.route("campus-gw", "cloud-1")
    assert far.link_class is LinkClass.INTER_REGION
    assert far.regions == ("campus", "metro", "cloud")
    # Chain rule by hand from the file's two links.
    assert far.link.latency_ms == pytest.approx(2.5 + 7.5)
    assert far.link.jitter_ms == pytest.approx(math.hypot(0.5, 1.0))
    assert far.link.bandwidth_mbps == 1000
    assert far.link.loss == pytest.approx(1 - (1 - 0.0005) * (1 - 0.0001))


def test_node_uplink_caps_bandwidth_both_ways():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    assert topo.link("campus-jetson", "cloud-1").bandwidth_mbps == 500
    assert topo.link("cloud-1", "campus-jetson").bandwidth_mbps == 500
    assert topo.link("campus-gw", "cloud-1").bandwidth_mbps == 1000


def test_defaults_fill_partial_links_by_tier():
    topo = loads_topology(
        """
name: d
regions:
  - {name: a, tier: device, nodes: [{name: a1}, {name: a2}], intra_link: {latency_ms: 9}}
  - {name: b, tier: cloud, nodes: [{name: b1}]}
links:
  - {between: [a, b], bandwidth_mbps: 3}
defaults:
  intra_link: {cloud: {loss: 0.5}}
"""
    )
    intra = topo.regions["a"].intra_link
    assert intra.latency_ms == 9 and intra.bandwidth_mbps == TIER_INTRA_LINK[Tier.DEVICE].bandwidth_mbps
    assert topo.regions["b"].intra_link.loss == 0.5
    inter = topo.link("a", "b")  # slower end is the device tier
    assert inter.bandwidth_mbps == 3 and inter.latency_ms == TIER_INTER_LINK[Tier.DEVICE].latency_ms


def test_churn_inherits_node_then_region_then_defaults():
    topo = loads_topology(
        """
name: c
defaults: {churn: {availability: 0.9}}
regions:
  - name: a
    tier: micro
    churn: {availability: 0.8, mtbf_s: 60}
    nodes: [{name: a1, churn: {availability: 0.5}}, {name: a2}]
  - {name: b, tier: micro, nodes: [{name: b1}]}
links: [{between: [a, b]}]
"""
    )
    assert topo.node("a1").churn.availability == 0.5
    assert topo.node("a2").churn.availability == 0.8 and topo.node("a2").churn.mtbf_s == 60
    assert topo.node("b1").churn.availability == 0.9


def test_node_labels_carry_region_tier_and_name():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    labels = topo.node("campus-jetson").labels
    assert labels["edgeray.io/region"] == "campus"
    assert labels["edgeray.io/tier"] == "micro"
    assert labels["edgeray.io/node"] == "campus-jetson"
    assert labels["edgeray.io/accelerator"] == "jetson-orin-nano"


def test_unknown_endpoints_name_the_valid_ones():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    with pytest.raises(TopologyError, match="campus-gw"):
        topo.route("mars", "campus-gw")
    with pytest.raises(TopologyError, match=r"regions are \['campus', 'cloud', 'metro'\]"):
        topo.region("mars")


def test_unknown_preset_lists_presets():
    with pytest.raises(TopologyError, match="presets are"):
        resolve_topology_path("no-such-fleet")
