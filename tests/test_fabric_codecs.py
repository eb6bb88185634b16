"""Codecs, the link model and the ledger against analytic references (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from edgeray.fabric.codecs import Codec, Fp16Codec, Int4BlockCodec, Int8BlockCodec, TopKCodec, get_codec
from edgeray.fabric.ledger import Ledger, modelled_critical_path
from edgeray.fabric.links import MSS_BYTES, LinkModel, departure, expected_s
from edgeray.topology import LinkClass, load_topology, loads_topology

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def gaussian():
    return torch.from_numpy(np.random.default_rng(0).standard_normal(1_000_003).astype(np.float32))


def test_identity_is_exact_and_fp32_sized(gaussian):
    c = Codec()
    assert torch.equal(c.decode(c.encode(gaussian), gaussian.numel()), gaussian)
    assert c.nbytes(gaussian.numel()) == 4 * gaussian.numel()


def test_fp16_halves_bytes_within_fp16_precision(gaussian):
    c = Fp16Codec()
    y = c.decode(c.encode(gaussian), gaussian.numel())
    assert _rel(y, gaussian) < 1e-3
    assert c.nbytes(gaussian.numel()) == 2 * gaussian.numel()


def test_int8_blockwise_bytes_and_error(gaussian):
    c = Int8BlockCodec(block=256)
    n = gaussian.numel()
    parts = c.encode(gaussian)
    y = c.decode(parts, n)
    assert _rel(y, gaussian) < 0.01
    blocks = math.ceil(n / 256)
    assert c.nbytes(n) == blocks * 256 + 4 * blocks == sum(p.numel() * p.element_size() for p in parts)
    assert 4 * n / c.nbytes(n) >= 3.9
    # Per element the error is at most half a quantisation step of its block.
    step = gaussian.new_zeros(blocks * 256)
    step[:n] = gaussian
    bound = step.view(blocks, 256).abs().amax(1).repeat_interleave(256)[:n] / 127 / 2
    assert bool(((y - gaussian).abs() <= bound + 1e-6).all())


def test_int4_blockwise_packs_two_values_per_byte_within_half_a_step(gaussian):
    c = Int4BlockCodec(block=256)
    n = gaussian.numel()
    parts = c.encode(gaussian)
    y = c.decode(parts, n)
    blocks = math.ceil(n / 256)
    assert c.nbytes(n) == blocks * 128 + 4 * blocks == sum(p.numel() * p.element_size() for p in parts)
    assert 4 * n / c.nbytes(n) >= 7.7
    # Reference: round(x / scale) clamped to [-7, 7], scale = block absmax / 7, computed here in numpy.
    x = np.zeros(blocks * 256, dtype=np.float32)
    x[:n] = gaussian.numpy()
    scale = np.abs(x.reshape(blocks, 256)).max(1) / 7
    want = (np.clip(np.round(x.reshape(blocks, 256) / scale[:, None]), -7, 7) * scale[:, None]).reshape(-1)[
        :n
    ]
    assert np.allclose(y.numpy(), want, atol=1e-6)
    assert bool(((y - gaussian).abs() <= torch.from_numpy(np.repeat(scale, 256)[:n]) / 2 + 1e-6).all())
    for z in (torch.zeros(9), torch.tensor([-2.0]), torch.tensor([7.0, -7.0, 0.5])):
        assert torch.allclose(c.decode(c.encode(z), z.numel()), z, atol=float(z.abs().max()) / 14 + 1e-6)


def test_int8_handles_zeros_and_short_tensors():
    c = Int8BlockCodec()
    for x in (torch.zeros(10), torch.tensor([1.5]), torch.tensor([-3.0, 0.0, 3.0])):
        assert torch.allclose(c.decode(c.encode(x), x.numel()), x, atol=3.0 / 127)


def test_topk_keeps_the_largest_and_error_feedback_conserves_the_sum():
    rng = np.random.default_rng(1)
    c = TopKCodec(ratio=0.01)
    n = 100_000
    assert 4 * n / c.nbytes(n) >= 50
    x = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    _values, idx = c.encode(x, key="w")
    expected = torch.topk(x.abs(), c.k(n)).indices
    assert set(idx.tolist()) == set(expected.tolist())
    # Over many steps, what was delivered plus the residual equals what was offered (nothing lost).
    c = TopKCodec(ratio=0.01)
    offered = torch.zeros(n)
    delivered = torch.zeros(n)
    for _ in range(20):
        g = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        offered += g
        delivered += c.decode(c.encode(g, key="w"), n)
    assert torch.allclose(delivered + c.residuals["w"], offered, atol=1e-3)


def test_unknown_codec_lists_valid_ones():
    with pytest.raises(ValueError, match="valid codecs are"):
        get_codec("zip")


def test_link_model_matches_latency_plus_size_over_bandwidth_without_jitter_or_loss():
    topo = loads_topology(
        "name: x\nregions:\n  - {name: a, tier: cloud, nodes: [{name: a-1}]}\n"
        "  - {name: b, tier: cloud, nodes: [{name: b-1}]}\n"
        "links: [{between: [a, b], latency_ms: 12, jitter_ms: 0, bandwidth_mbps: 400, loss: 0}]\n"
    )
    nbytes = 8 << 20
    t = LinkModel(topo, seed=0).transfer("a-1", "b-1", nbytes)
    assert t.link_class is LinkClass.INTER_REGION and t.retransmitted_bytes == 0
    assert t.seconds == pytest.approx(0.012 + nbytes * 8 / 400e6)
    assert expected_s(topo.link("a-1", "b-1"), nbytes) == pytest.approx(t.seconds)


def test_link_model_is_seeded_and_charges_loss_as_retransmissions():
    topo = load_topology(ROOT / "clusters" / "metro-5g.yaml")
    first, second = LinkModel(topo, seed=7), LinkModel(topo, seed=7)
    assert [first.transfer("phone-a1", "site-a", 1 << 20) for _ in range(5)] == [
        second.transfer("phone-a1", "site-a", 1 << 20) for _ in range(5)
    ]
    model = LinkModel(topo, seed=3)
    link = topo.link("phone-a1", "site-a")
    draws = [model.transfer("phone-a1", "site-a", 4 << 20) for _ in range(300)]
    packets = math.ceil((4 << 20) / MSS_BYTES)
    mean_retx = np.mean([d.retransmitted_bytes for d in draws])
    assert mean_retx == pytest.approx(packets * link.loss * MSS_BYTES, rel=0.1)
    mean_s = np.mean([d.seconds for d in draws])
    assert mean_s == pytest.approx(expected_s(link, 4 << 20), rel=0.05)


def test_ledger_saves_parquet_with_totals(tmp_path):
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    model = LinkModel(topo, seed=0)
    ledger = Ledger()
    ledger.record("allreduce", "g", model.transfer("campus-gw", "campus-jetson", 100), 0.001)
    ledger.record("allreduce", "g", model.transfer("campus-gw", "cloud-1", 300), 0.002)
    path = ledger.save(tmp_path / "ledger.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 2 and sum(table.column("bytes").to_pylist()) == 400
    assert table.column("notice_s").to_pylist() == [0.0, 0.0]  # recorded outside the fabric's transport
    assert ledger.bytes_by_class() == {"intra-region": 100, "inter-region": 300}


def test_a_message_leaves_once_sent_and_the_receivers_ready_notice_has_crossed():
    """gloo's rendezvous: the bytes leave at max(send posted, receive posted + one-way latency)."""
    assert departure(1.0, 0.5, 0.2) == 1.0  # the receive was posted early: no wait
    assert departure(1.0, 0.9, 0.2) == pytest.approx(1.1)  # both at about once: the notice's latency
    np.testing.assert_allclose(departure(np.array([0.0, 2.0]), np.array([1.0, 0.0]), 0.5), [1.5, 2.0])


def test_the_ledgers_critical_path_is_each_steps_slowest_transfer_after_its_notice():
    """Two participants, two steps of one op: per step the slowest of notice + modelled seconds, summed;
    rows without a notice (outside the fabric's transport) count their transfer alone."""
    a = [
        {"op": "allreduce", "modelled_s": 0.010, "notice_s": 0.005},
        {"op": "allreduce", "modelled_s": 0.030, "notice_s": 0.005},
        {"op": "keys", "modelled_s": 0.002},
    ]
    b = [
        {"op": "allreduce", "modelled_s": 0.012, "notice_s": 0.001},
        {"op": "allreduce", "modelled_s": 0.001, "notice_s": 0.020},
    ]
    assert modelled_critical_path([a, b]) == pytest.approx(0.015 + 0.035 + 0.002)


CONTENTION = """
name: c
regions:
  - {name: a, tier: regional, nodes: [{name: a-1}, {name: a-2}], intra_link: {bandwidth_mbps: 10000}}
  - {name: b, tier: regional, nodes: [{name: b-1}, {name: b-2}], intra_link: {bandwidth_mbps: 10000}}
links: [{between: [a, b], latency_ms: 5, jitter_ms: 0, loss: 0, bandwidth_mbps: 100}]
"""


def test_flows_sharing_a_backhaul_split_its_bandwidth():
    model = LinkModel(loads_topology(CONTENTION))
    assert model.bandwidth_mbps("a-1", "b-1") == 100
    # Two flows a -> b share the a->b direction of the backhaul; the reverse direction is separate.
    assert model.bandwidth_mbps("a-1", "b-1", [("a-1", "b-1"), ("a-2", "b-2")]) == 50
    assert model.bandwidth_mbps("a-1", "b-1", [("a-1", "b-1"), ("b-2", "a-2")]) == 100
    # A node sending to two peers at once shares its own port (10 Gbit/s here).
    assert model.bandwidth_mbps("a-1", "a-2", [("a-1", "a-2"), ("a-1", "b-1")]) == 5000
    nbytes = 1 << 20
    alone = model.transfer("a-1", "b-1", nbytes).seconds
    shared = model.transfer("a-1", "b-1", nbytes, concurrent=[("a-1", "b-1"), ("a-2", "b-2")]).seconds
    assert shared - 0.005 == pytest.approx(2 * (alone - 0.005))


def test_fabric_rejects_an_unknown_transport():
    from edgeray.fabric.backend import Fabric, FabricError

    topo = load_topology(ROOT / "clusters" / "local.yaml")
    assert Fabric(topo, node="campus-gw").transport == "auto"
    with pytest.raises(FabricError, match=r"transport = 'mpi': valid values are \['auto', 'gloo'\]"):
        Fabric(topo, node="campus-gw", transport="mpi")


def test_the_modelled_clock_charges_work_times_the_nodes_slowdown():
    """Fabric.compute and Fabric.working: seconds at reference speed times the node's slowdown; time
    blocked on the fabric is not work."""
    import time

    from edgeray.fabric.backend import Fabric

    text = (ROOT / "edgeray" / "presets" / "local.yaml").read_text()
    text = text.replace("{name: campus-gw, cpus: 2,", "{name: campus-gw, slowdown: 3, cpus: 2,")
    fabric = Fabric.from_topology(loads_topology(text), node="campus-gw")
    assert fabric.compute(0.5) == pytest.approx(1.5)
    with fabric.working():
        time.sleep(0.05)
        fabric.charge_work()  # a fabric boundary: the work so far is charged
        time.sleep(0.5)
        fabric._not_work()  # ...then 0.5 s blocked on a receive, which is not work
    assert 1.5 + 3 * 0.05 <= fabric.clock < 1.5 + 3 * 0.5
