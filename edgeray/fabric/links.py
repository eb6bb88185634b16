"""Link model: how long n bytes take over a topology link, with seeded jitter and loss.

    model = LinkModel(topology, seed=0)
    model.transfer("campus-gw", "cloud-1", nbytes=4 << 20)   # -> Transfer(link_class, bytes, seconds, ...)

time = latency + jitter + (bytes + retransmitted bytes) / bandwidth (+ one round trip per loss burst), where
jitter ~ Normal(0, jitter_ms) clipped so the latency never goes negative, and each of the ceil(bytes / MSS)
packets is lost independently with the link's loss probability (binomial draw) and sent again.
``expected_s`` is the same without randomness (jitter mean 0, loss as the expected retransmissions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeray.topology import Link, LinkClass, Topology

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

    def transfer(self, src: str, dst: str, nbytes: int) -> Transfer:
        """Model sending ``nbytes`` from node ``src`` to node ``dst`` (one draw of jitter and loss)."""
        route = self.topology.route(src, dst)
        link = route.link
        if nbytes <= 0:
            return Transfer(src, dst, route.link_class, 0, 0.0, 0)
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
