"""Link model: how long n bytes take over a topology link, with seeded jitter and loss.

    model = LinkModel(topology, seed=0)
    model.transfer("campus-gw", "cloud-1", nbytes=4 << 20)   # -> Transfer(link_class, bytes, seconds, ...)

time = latency + jitter + (bytes + retransmitted bytes) / bandwidth (+ one round trip per loss burst), where
jitter ~ Normal(0, jitter_ms) clipped so the latency never goes negative, and each of the ceil(bytes / MSS)
packets is lost independently with the link's loss probability (binomial draw) and sent again.
``expected_s`` is the same without randomness (jitter mean 0, loss as the expected retransmissions).

Contention: a transfer crosses physical resources - the sender's port out, each inter-region link on its
route (per direction) and the receiver's port in. A port runs at the node's ``bandwidth_mbps`` (else its
region's intra-link bandwidth), an inter-region link at its own bandwidth. Flows that run in the same step
of a collective (``concurrent``) split every resource they share equally; a flow's bandwidth is the
smallest share along its route. This is what makes a topology-unaware ring slow on an edge network: its
steps push several flows through the same backhaul at once.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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

        def port(node: str) -> float:
            n = topo.nodes[node]
            return n.bandwidth_mbps or topo.regions[n.region].intra_link.bandwidth_mbps

        out: list[tuple[tuple[str, ...], float]] = [(("out", src), port(src))]
        if route.link_class is LinkClass.INTER_REGION:
            for a, b in itertools.pairwise(route.regions):
                out.append((("wan", a, b), topo.inter_links[frozenset((a, b))].bandwidth_mbps))
        out.append((("in", dst), port(dst)))
        return out

    def bandwidth_mbps(self, src: str, dst: str, concurrent: Sequence[tuple[str, str]] = ()) -> float:
        """Bandwidth of ``src -> dst`` while the ``concurrent`` flows (this one included or not) also run."""
        flows = list(concurrent) if (src, dst) in concurrent else [*concurrent, (src, dst)]
        load = Counter(key for a, b in flows for key, _ in self.resources(a, b))
        return min(
            (cap / load[key] for key, cap in self.resources(src, dst)), default=INTRA_NODE_LINK.bandwidth_mbps
        )

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
        if route.link_class is not LinkClass.INTRA_NODE:
            link = Link(link.latency_ms, link.jitter_ms, self.bandwidth_mbps(src, dst, concurrent), link.loss)
        latency_s = (
            max(0.0, link.latency_ms + self._rng.normal(0.0, link.jitter_ms)) / 1e3
            if link.jitter_ms
            else link.latency_ms / 1e3
        )
        packets = math.ceil(nbytes / MSS_BYTES)
        lost = int(self._rng.binomial(packets, link.loss)) if link.loss > 0 else 0
        retransmitted = min(lost * MSS_BYTES, nbytes * 10)
        seconds = latency_s + (nbytes + retransmitted) * 8 / (link.bandwidth_mbps * 1e6)
        if lost:
            seconds += 2 * link.latency_ms / 1e3  # loss is detected a round trip later
        return Transfer(src, dst, route.link_class, nbytes, seconds, retransmitted)
