"""The partition planner: unsplit, layer split or tensor split of one region's nodes, chosen by modelled
step time and memory fit; decisions checked on hand-built topologies against hand-computed times."""

from __future__ import annotations

import pytest

from edgeray.fabric.links import expected_s
from edgeray.model.presets import PRESETS
from edgeray.topology import loads_topology
from edgeray.train.partition import ComputeProfile, PartitionError, choose_partition
from edgeray.train.planner import LinkConditions

pytestmark = pytest.mark.unit

# A compute profile with round numbers (seconds per token): a layer 1 ms, one rank of a layer split two
# ways 0.5 ms, four ways 0.25 ms, the head 2 ms (as much as two layers), the embedding free.
PROFILE = ComputeProfile("tiny", {1: 1e-3, 2: 5e-4, 4: 2.5e-4}, 2e-3, 0.0, "test")


def region(latency_ms: float, mbps: float, memory_gb: float = 8, nodes: int = 2, extra: str = "") -> str:
    names = ", ".join(f"{{name: n{i}, memory_gb: {memory_gb}}}" for i in range(nodes))
    return (
        "name: t\nregions:\n"
        f"  - {{name: r, tier: regional, intra_link: {{latency_ms: {latency_ms}, jitter_ms: 0, "
        f"bandwidth_mbps: {mbps}, loss: 0}}, nodes: [{names}]}}\n{extra}"
    )


def test_the_modelled_times_are_the_formulas_of_the_module():
    topo = loads_topology(region(1.0, 1000))
    rows, seq, m = 8, 16, 4
    c = choose_partition(
        topo, ["n0", "n1"], preset="tiny", rows=rows, seq_len=seq, microbatches=m, profile=PROFILE
    )
    tokens, h, layers = rows * seq, PRESETS["tiny"].hidden_size, PRESETS["tiny"].num_hidden_layers
    link = topo.link("n0", "n1")
    assert c.get("unsplit on n0").modelled_s == pytest.approx(tokens * (4 * 1e-3 + 2e-3))
    # tensor split x2: half of every layer plus the whole head on each rank, 4 all-reduces per layer, each
    # one exchange of the step's activations after the peer's ready notice (one latency)
    exchange = link.latency_ms / 1e3 + expected_s(link, tokens * h * 4)
    tensor = tokens * (layers * 5e-4 + 2e-3) + 4 * layers * exchange
    assert c.get("tensor split x2").modelled_s == pytest.approx(tensor)
    # layer split x2 (equal CPUs): 4 layers + head = 6 layer-units, 3 each: layers 0-2 | 3 + head
    layer = c.get("layer split x2")
    assert layer.boundaries == (3,)
    micro = tokens // m
    s = [micro * 3e-3, micro * (1e-3 + 2e-3)]
    mu = expected_s(link, micro * h * 4)
    assert layer.modelled_s == pytest.approx(sum(s) + 2 * mu + (m - 1) * max(*s, mu))
    assert c.get("expert placement").modelled_s is None and "dense" in c.get("expert placement").note


def test_the_choice_follows_the_link_and_the_micro_batches():
    """Analytic cases (tiny: 4 layers + a head worth 2; 8 x 64 tokens a step):
    - one micro-batch on a fast LAN: a layer split is a relay (one stage always idle, never faster than
      unsplit), a tensor split halves every layer: tensor (512 x 4 ms = 2.05 s vs unsplit 3.07 s);
    - one micro-batch on a 10 Mbit/s LAN: the tensor split's 16 all-reduces of the step's 256 KiB of
      activations take ~3.4 s, more than they save: unsplit;
    - eight micro-batches: the pipeline is full most of the time (~1.74 s on 50 Mbit/s), and the tensor
      split keeps its replicated head (2.05 s + links): layer, on the fast LAN and the slow one alike."""
    kw = {"preset": "tiny", "rows": 8, "seq_len": 64, "profile": PROFILE}
    fast, slow, starved = (loads_topology(region(0.05, 100_000)), loads_topology(region(2.0, 50)),
                           loads_topology(region(2.0, 10)))  # fmt: skip
    cases = [(fast, 1, "tensor split x2"), (starved, 1, "unsplit on n0"), (fast, 8, "layer split x2"),
             (slow, 8, "layer split x2")]  # fmt: skip
    for topo, m, expected in cases:
        choice = choose_partition(topo, ["n0", "n1"], microbatches=m, **kw)
        assert choice.best.name == expected, (m, choice.table())
        # the fastest alternative that fits; ties go to fewer nodes
        assert choice.best.modelled_s == min(a.modelled_s for a in choice.alternatives if a.fits)
        assert f"chosen: {expected}" in choice.table()


def test_four_nodes_consider_degree_four_and_a_four_stage_split():
    c = choose_partition(
        loads_topology(region(0.05, 100_000, nodes=4)),
        ["n0", "n1", "n2", "n3"],
        preset="tiny",
        rows=8,
        seq_len=64,
        microbatches=1,
        profile=PROFILE,
    )
    names = {a.name for a in c.alternatives}
    assert {
        "tensor split x2",
        "tensor split x4",
        "layer split x2",
        "layer split x3",
        "layer split x4",
    } <= names
    # four ranks do a quarter of each layer each: faster than two on a LAN this fast
    assert c.best.name == "tensor split x4"


def test_measured_link_conditions_move_the_choice():
    """The same declared LAN measured 1000x slower than declared (the pipeline's arrivals): the tensor
    split's 16 all-reduces now take ~1.1 s, more than the 1 s it saves over unsplit."""
    topo = loads_topology(region(0.05, 100_000))
    kw = {"preset": "tiny", "rows": 8, "seq_len": 64, "microbatches": 1, "profile": PROFILE}
    assert choose_partition(topo, ["n0", "n1"], **kw).best.name == "tensor split x2"
    slow = LinkConditions({("n0", "n1"): 1000.0})
    moved = choose_partition(topo, ["n0", "n1"], conditions=slow, **kw)
    assert moved.best.name == "unsplit on n0"
    assert "n0<->n1 x1000.00 of declared" in moved.table()


def test_memory_decides_when_one_node_cannot_hold_the_model():
    """small needs ~176 MiB to train unsplit (4 x 32 tokens) (16 bytes a parameter plus activations); 0.15 GiB nodes hold
    only a half, so the planner splits even where unsplit would be faster (a 1 Mbit/s LAN)."""
    topo = loads_topology(region(5.0, 1, memory_gb=0.15))
    c = choose_partition(
        topo,
        ["n0", "n1"],
        preset="small",
        rows=4,
        seq_len=32,
        microbatches=2,
        profile=ComputeProfile.analytic("small"),
    )
    unsplit = c.get("unsplit on n0")
    assert not unsplit.fits and unsplit.modelled_s < c.best.modelled_s
    assert c.best.kind in ("layer", "tensor") and c.best.fits
    assert "does not fit" in c.table()
    with pytest.raises(PartitionError, match="no alternative fits"):
        choose_partition(
            loads_topology(region(5.0, 1, memory_gb=0.01)), ["n0", "n1"], preset="small", rows=4, seq_len=32,
            microbatches=2,
        )  # fmt: skip


def test_a_tensor_split_across_regions_and_bad_settings_are_refused_by_name():
    extra = (
        "  - {name: s, tier: regional, nodes: [{name: m0}]}\n"
        "links:\n  - {between: [r, s], latency_ms: 0.01, bandwidth_mbps: 100000}\n"
    )
    topo = loads_topology(region(0.05, 100_000, nodes=1, extra=extra))
    c = choose_partition(
        topo, ["n0", "m0"], preset="tiny", rows=8, seq_len=64, microbatches=1, profile=PROFILE
    )
    assert "spans regions ['r', 's']" in c.get("tensor split x2").note and not c.get("tensor split x2").fits
    assert c.best.kind != "tensor"
    with pytest.raises(PartitionError, match="rows 6 must split into microbatches 4"):
        choose_partition(topo, ["n0"], preset="tiny", rows=6, seq_len=8, microbatches=4)
    with pytest.raises(PartitionError, match="unknown preset"):
        choose_partition(topo, ["n0"], preset="huge", rows=4, seq_len=8)
    with pytest.raises(Exception, match="nope"):
        choose_partition(topo, ["nope"], preset="tiny", rows=4, seq_len=8)


def test_the_measured_profile_orders_the_costs_as_the_model_assumes():
    """Measured on this machine (8 x 32 and 2 x 32 tokens): one rank's share of a layer split two ways costs
    less than the whole layer, the head more than the embedding lookup, the optimizer step something."""
    p = ComputeProfile.measure("tiny", rows=8, seq_len=32, degrees=(1, 2), repeats=2)
    assert set(p.layer_s) == {1, 2}
    tokens = 256
    assert (
        0
        < p.stage_s(tokens, 4, head=False, embed=False, degree=2)
        < p.stage_s(tokens, 4, head=False, embed=False)
    )
    assert p.stage_s(tokens, 0, head=True, embed=False) > p.stage_s(tokens, 0, head=False, embed=True) >= 0
    assert p.update_s > 0
    with pytest.raises(PartitionError, match="no tensor-parallel degree 4"):
        p.layer(4)


def test_a_pipeline_whose_first_stage_is_a_tensor_split_wins_where_the_model_says():
    """Three equally slow nodes (slowdown 2): n0, n1 on a fast LAN in region r, m0 in region s. Eight
    micro-batches of 64 tokens. The mixed plan (n0 + n1 as a tensor-parallel stage 0 with layers 0-2, m0
    with layer 3 and the head) paces at 0.384 s a micro-batch like a 3-stage layer split, with one stage
    fewer to fill; the tensor split alone pays its replicated head on slow nodes: mixed is chosen, and its
    time is the module's formula."""
    topo = loads_topology(
        "name: t\nregions:\n"
        "  - {name: r, tier: regional, intra_link: {latency_ms: 0.05, jitter_ms: 0, bandwidth_mbps: 100000, "
        "loss: 0}, nodes: [{name: n0, slowdown: 2}, {name: n1, slowdown: 2}]}\n"
        "  - {name: s, tier: regional, nodes: [{name: m0, slowdown: 2}]}\n"
        "links:\n  - {between: [r, s], latency_ms: 1, jitter_ms: 0, bandwidth_mbps: 1000, loss: 0}\n"
    )
    c = choose_partition(
        topo, ["n0", "n1", "m0"], preset="tiny", rows=8, seq_len=64, microbatches=8, profile=PROFILE
    )
    mixed = c.get("mixed (tensor x2 | 1 node)")
    assert c.best == mixed, c.table()
    assert mixed.boundaries == (3,) and mixed.stage_degrees == (2, 1) and mixed.nodes == ("n0", "n1", "m0")
    act = 64 * 128 * 4
    lan = expected_s(topo.link("n0", "n1"), act)
    s0 = 64 * 3 * 5e-4 * 2 + 4 * 3 * (0.05e-3 + lan) + 2 * lan  # all-reduces wait for the ready notice
    s1 = 64 * (1e-3 + 2e-3) * 2
    mu = expected_s(topo.link("n0", "m0"), act)
    assert mixed.modelled_s == pytest.approx(s0 + s1 + 2 * mu + 7 * max(s0, s1, mu))
    assert mixed.modelled_s < c.get("layer split x3").modelled_s < c.get("tensor split x2").modelled_s
    assert "mixed (tensor x2 | 1 node)" in c.table() and "tensor split x2" in c.table()
    # a tensor-parallel group never spans regions: no stage group (n1, m0)
    assert all(a.nodes[:2] != ("n1", "m0") for a in c.alternatives if a.kind == "mixed")


def test_prefer_energy_takes_the_frugal_node_within_the_slack_and_bills_each_alternative():
    """Two nodes, one 5% slower (slowdown 1.05) at a tenth of the power. Unsplit, the step computes the whole
    time: 100 W x T on the fast node, 10 W x 1.05 T on the frugal one (edgeray.energy). Time picks the fast
    node; energy with 10% slack picks the frugal one; with 4% slack the frugal one is too slow to count."""
    doc = (
        "name: t\nregions:\n"
        "  - {name: r, tier: regional, intra_link: {latency_ms: 1, jitter_ms: 0, bandwidth_mbps: 1000, loss: 0},\n"
        "     nodes: [{name: fast, memory_gb: 8, power: {idle_w: 20, busy_w: 100}},\n"
        "             {name: frugal, memory_gb: 8, slowdown: 1.05, power: {idle_w: 2, busy_w: 10}}]}\n"
    )
    topo = loads_topology(doc)
    kw = dict(preset="tiny", rows=8, seq_len=16, microbatches=4, profile=PROFILE, kinds=("unsplit",))
    t = 8 * 16 * (4 * 1e-3 + 2e-3)  # tokens x (4 layers + the head); no optimizer time in PROFILE
    by_time = choose_partition(topo, ["fast", "frugal"], **kw)
    assert by_time.best.nodes == ("fast",) and by_time.best.modelled_s == pytest.approx(t)
    assert by_time.joules[by_time.get("unsplit on fast")] == pytest.approx(100 * t)
    assert by_time.joules[by_time.get("unsplit on frugal")] == pytest.approx(10 * 1.05 * t)
    by_energy = choose_partition(topo, ["fast", "frugal"], prefer="energy", energy_slack=1.10, **kw)
    assert by_energy.best.nodes == ("frugal",)
    assert "fewest joules" in by_energy.table() and "J/step" in by_energy.table()
    tight = choose_partition(topo, ["fast", "frugal"], prefer="energy", energy_slack=1.04, **kw)
    assert tight.best.nodes == ("fast",)
    with pytest.raises(PartitionError, match="prefer='cheap'"):
        choose_partition(topo, ["fast", "frugal"], prefer="cheap", **kw)
    with pytest.raises(PartitionError, match=r"energy_slack=0\.5"):
        choose_partition(topo, ["fast", "frugal"], prefer="energy", energy_slack=0.5, **kw)


def test_a_layer_split_bills_each_stage_for_its_micro_batches():
    """Each stage's node is busy for its compute on every micro-batch (plus its update) and idle for the rest
    of the step: joules = sum over nodes of idle_w x (T - busy) + busy_w x busy."""
    topo = loads_topology(region(1.0, 1000))
    c = choose_partition(
        topo, ["n0", "n1"], preset="tiny", rows=8, seq_len=16, microbatches=4, profile=PROFILE
    )
    layer = c.get("layer split x2")
    micro = 8 * 16 // 4
    assert layer.busy_s == pytest.approx((4 * micro * 3e-3, 4 * micro * 3e-3))
    power = topo.nodes["n0"].power
    want = sum(power.idle_w * (layer.modelled_s - b) + power.busy_w * b for b in layer.busy_s)
    assert c.joules[layer] == pytest.approx(want)
