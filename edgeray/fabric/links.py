"""Link model: how long n bytes take over a topology link, with seeded jitter and loss.

    model = LinkModel(topology, seed=0)
    model.transfer("campus-gw", "cloud-1", nbytes=4 << 20)   # -> Transfer(link_class, bytes, seconds, ...)

time = latency + jitter + (bytes + retransmitted bytes) / bandwidth (+ one round trip per loss burst), where
jitter ~ Normal(0, jitter_ms) clipped so the latency never goes negative, and each of the ceil(bytes / MSS)
packets is lost independently with the link's loss probability (binomial draw) and sent again.
``expected_s`` is the same without randomness (jitter mean 0, loss as the expected retransmissions).

Rendezvous: gloo's TCP transport (the fabric's) sends a buffer only once the receiver has posted a
receive for it and that receive's ready notice has crossed the link back, so a message leaves at
:func:`departure` = max(send posted, receive posted + one-way latency). Where both ends post at once (every
step of a ring) a step costs two one-way latencies plus the bytes; a receive posted early costs nothing.

Contention: a transfer crosses physical resources - the sender's port out, each inter-region link on its
route (per direction) and the receiver's port in. A port runs at the node's ``bandwidth_mbps`` (else its
region's intra-link bandwidth), an inter-region link at its own bandwidth. Flows that run in the same step
of a collective (``concurrent``) split every resource they share equally; a flow's bandwidth is the
smallest share along its route. This is what makes a topology-unaware ring slow on an edge network: its
steps push several flows through the same backhaul at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from edgeray.topology import INTRA_NODE_LINK, Link, LinkClass, Topology

MSS_BYTES = 1448  # TCP payload per packet on a 1500-byte MTU with timestamps


@dataclass(frozen=True)
class Transfer:
    """One modelled transfer. ``seconds`` includes latency, jitter, serialisation and retransmissions."""

    src: str
    dst: str
    link_class: LinkClass
    nbytes: int
    seconds: float
    retransmitted_bytes: int


def expected_s(link: Link, nbytes: int) -> float:
    """Mean transfer time of ``nbytes`` over ``link``, seconds (loss as expected retransmissions)."""
    if nbytes <= 0:
        return 0.0
    wire = nbytes / (1.0 - link.loss)
    return link.latency_ms / 1e3 + wire * 8 / (link.bandwidth_mbps * 1e6)


def departure(send_posted: ArrayLike, receive_posted: ArrayLike, notice_s: ArrayLike) -> Any:
    """When a message's bytes leave: once the sender has posted it and the receiver's ready notice, sent
    when it posted the receive, has crossed the link (``notice_s``: the link's one-way latency). Arrays
    broadcast; the fabric's clocks (scalars) and the fleet simulator (arrays) both use it."""
    return np.maximum(send_posted, np.add(receive_posted, notice_s))


def port_mbps(topology: Topology, node: str) -> float:
    """A node's port speed: its ``bandwidth_mbps``, else its region's intra-link bandwidth."""
    n = topology.nodes[node]
    return n.bandwidth_mbps or topology.regions[n.region].intra_link.bandwidth_mbps


def fair_share(resources: ArrayLike, capacity: ArrayLike) -> np.ndarray:
    """Bandwidth of each of F concurrent flows: ``resources`` (F x K, int) lists the resources each flow
    crosses (-1 pads), ``capacity`` their Mbit/s; a resource is split equally among the flows on it and a
    flow gets its smallest share. Flows crossing nothing (within one node) get the intra-node bandwidth.
    The fabric (:meth:`LinkModel.bandwidth_mbps`) and the fleet simulator (edgeray.sim) both call this."""
    ids = np.asarray(resources, dtype=np.int64)
    ids = ids.reshape(len(ids), -1)
    cap = np.asarray(capacity, dtype=np.float64)
    used = ids >= 0
    load = np.bincount(ids[used], minlength=len(cap)).astype(np.float64)
    ids = np.where(used, ids, 0)
    shares = np.where(used, cap[ids] / np.maximum(load[ids], 1.0), np.inf)
    out = shares.min(axis=1, initial=np.inf)
    return np.where(np.isinf(out), INTRA_NODE_LINK.bandwidth_mbps, out)


def transfer_seconds(
    rng: np.random.Generator,
    latency_ms: ArrayLike,
    jitter_ms: ArrayLike,
    bandwidth_mbps: ArrayLike,
    loss: ArrayLike,
    nbytes: ArrayLike,
) -> tuple[np.ndarray, np.ndarray]:
    """Seconds and retransmitted bytes of transfers (arrays, one element per transfer; see the module
    docstring for the formula). Draws one jitter sample for each transfer with jitter and one binomial for
    each with loss, in order. The fabric (:meth:`LinkModel.transfer`, one element) and the fleet simulator
    (thousands at once) both call this."""
    latency_ms, jitter_ms, bandwidth_mbps, loss, nbytes = np.broadcast_arrays(
        *(
            np.atleast_1d(np.asarray(a, dtype=np.float64))
            for a in (latency_ms, jitter_ms, bandwidth_mbps, loss, nbytes)
        )
    )
    latency_s = np.array(latency_ms / 1e3)
    jittered = jitter_ms > 0
    if jittered.any():
        draws = rng.normal(0.0, jitter_ms[jittered])
        latency_s[jittered] = np.maximum(0.0, latency_ms[jittered] + draws) / 1e3
    lost = np.zeros(nbytes.shape, dtype=np.int64)
    lossy = (loss > 0) & (nbytes > 0)
    if lossy.any():
        packets = np.ceil(nbytes[lossy] / MSS_BYTES).astype(np.int64)
        lost[lossy] = rng.binomial(packets, loss[lossy])
    retransmitted = np.minimum(lost * MSS_BYTES, nbytes * 10)
    seconds = latency_s + (nbytes + retransmitted) * 8 / (bandwidth_mbps * 1e6)
    seconds = seconds + np.where(lost > 0, 2 * latency_ms / 1e3, 0.0)  # loss is detected a round trip later
    return np.where(nbytes > 0, seconds, 0.0), retransmitted.astype(np.int64)


class LinkModel:
    """Transfer times between topology nodes, seeded: the same seed and call order give the same times."""

    def __init__(self, topology: Topology, *, seed: int = 0) -> None:
        self.topology = topology
        self._rng = np.random.default_rng(seed)

    def rng_state(self) -> dict[str, Any]:
        """The jitter/loss stream's position (a checkpoint holds it, so a resumed run draws the same)."""
        return dict(self._rng.bit_generator.state)

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state

    def resources(self, src: str, dst: str) -> list[tuple[tuple[str, ...], float]]:
        """Physical resources (key, Mbit/s) a transfer from ``src`` to ``dst`` crosses; none within a node."""
        if src == dst:
            return []
        topo = self.topology
        route = topo.route(src, dst)
        out: list[tuple[tuple[str, ...], float]] = [(("out", src), port_mbps(topo, src))]
        if route.link_class is LinkClass.INTER_REGION:
            for a, b in itertools.pairwise(route.regions):
                out.append((("wan", a, b), topo.inter_links[frozenset((a, b))].bandwidth_mbps))
        out.append((("in", dst), port_mbps(topo, dst)))
        return out

    def bandwidth_mbps(self, src: str, dst: str, concurrent: Sequence[tuple[str, str]] = ()) -> float:
        """Bandwidth of ``src -> dst`` while the ``concurrent`` flows (this one included or not) also run."""
        flows = list(concurrent) if (src, dst) in concurrent else [*concurrent, (src, dst)]
        return float(self.flow_bandwidths(flows)[flows.index((src, dst))])

    def flow_bandwidths(self, flows: Sequence[tuple[str, str]]) -> np.ndarray:
        """Bandwidth of every flow of ``flows`` running together (Mbit/s), by :func:`fair_share`."""
        keys: dict[tuple[str, ...], int] = {}
        capacity: list[float] = []
        rows = []
        for a, b in flows:
            row = []
            for key, cap in self.resources(a, b):
                if key not in keys:
                    keys[key] = len(capacity)
                    capacity.append(cap)
                row.append(keys[key])
            rows.append(row)
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return fair_share(ids, np.asarray(capacity, dtype=np.float64))

    def transfer(
        self, src: str, dst: str, nbytes: int, *, concurrent: Sequence[tuple[str, str]] = ()
    ) -> Transfer:
        """Model sending ``nbytes`` from node ``src`` to node ``dst`` (one draw of jitter and loss).

        ``concurrent``: every (src, dst) flow in the same step of a collective; shared resources split.
        """
        route = self.topology.route(src, dst)
        link = route.link
        if nbytes <= 0:
            return Transfer(src, dst, route.link_class, 0, 0.0, 0)
        bandwidth = link.bandwidth_mbps
        if route.link_class is not LinkClass.INTRA_NODE:
            bandwidth = self.bandwidth_mbps(src, dst, concurrent)
        seconds, retransmitted = transfer_seconds(
            self._rng, link.latency_ms, link.jitter_ms, bandwidth, link.loss, nbytes
        )
        return Transfer(src, dst, route.link_class, nbytes, float(seconds[0]), int(retransmitted[0]))
