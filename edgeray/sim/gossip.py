"""Gossip (AD-PSGD style) at fleet scale, with the runtime's own event rules
(edgeray.train.strategies.gossip.Gossip.run):

- a worker computes a local step (``compute_s`` x its slowdown x a transient factor), then averages its
  parameters with one uniformly drawn other worker: both send the whole model (float32) to each other, and
  the exchange takes the longer of the two transfers (each one flow on its route: the ports and the WAN
  hops' bottleneck, with the fabric's formula, edgeray.fabric.links.transfer_seconds); then it starts its
  next step. Nobody waits for anyone else: the peer keeps its own timeline (the runtime averages into it
  whenever the exchange happens);
- a run is ``rounds`` x workers local steps (the runtime's token budget), in the order of their end times.

Peers and transfers are drawn per (worker, its k-th step) in blocks, vectorised, rather than in event order
as the runtime's single random stream does: the same distribution, not the same draws. No churn in this
engine. Loss of the model is not simulated.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeray.fabric.links import transfer_seconds
from edgeray.sim.engine import FleetArrays, SimError
from edgeray.topology import Topology


@dataclass(frozen=True)
class GossipConfig:
    params: int = 1_000_000
    compute_s: float = 0.5
    rounds: int = 100
    """Local steps in all: rounds x workers."""
    jitter: bool = True
    transient: float = 0.0
    transient_factor: float = 5.0
    overhead_s: float = 0.0
    goodput: float = 1.0
    seed: int = 0

    def check(self) -> GossipConfig:
        out = []
        if self.params < 1:
            out.append(f"params = {self.params}: must be >= 1")
        if not (self.compute_s > 0 and math.isfinite(self.compute_s)):
            out.append(f"compute_s = {self.compute_s}: must be > 0")
        if self.rounds < 1:
            out.append(f"rounds = {self.rounds}: must be >= 1")
        if not 0 <= self.transient <= 1:
            out.append(f"transient = {self.transient}: must be in [0, 1]")
        if not self.transient_factor >= 1:
            out.append(f"transient_factor = {self.transient_factor}: must be >= 1")
        if not (self.overhead_s >= 0 and math.isfinite(self.overhead_s)):
            out.append(f"overhead_s = {self.overhead_s}: must be >= 0")
        if not 0 < self.goodput <= 10:
            out.append(f"goodput = {self.goodput}: must be in (0, 10]")
        if out:
            raise SimError("gossip config: " + "; ".join(out))
        return self


@dataclass
class GossipResult:
    config: GossipConfig
    topology: str
    nodes: int
    regions: int
    modelled_s: float = 0.0
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    busy_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    comm_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    intra_region_bytes: int = 0
    inter_region_bytes: int = 0
    retransmitted_bytes: int = 0
    exchanges: int = 0
    tier: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tier_names: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        total = int(self.steps.sum())
        live = np.full(self.nodes, self.modelled_s)
        idle = np.maximum(live - self.busy_s, 0.0)
        return {
            "topology": self.topology,
            "nodes": self.nodes,
            "regions": self.regions,
            "modelled_s": self.modelled_s,
            "steps": total,
            "rounds": self.config.rounds,
            "steps_per_s": total / self.modelled_s if self.modelled_s else 0.0,
            "steps_min": int(self.steps.min()) if total else 0,
            "steps_max": int(self.steps.max()) if total else 0,
            "exchange_s_mean": float(self.comm_s.sum() / max(1, self.exchanges)),
            "intra_region_bytes": self.intra_region_bytes,
            "inter_region_bytes": self.inter_region_bytes,
            "retransmitted_bytes": self.retransmitted_bytes,
            "idle_fraction_by_tier": {
                t: float(idle[self.tier == k].sum() / live[self.tier == k].sum())
                if live[self.tier == k].sum()
                else 0.0
                for k, t in enumerate(self.tier_names)
            },
            "loss_simulated": False,
        }


class PairLinks:
    """One flow a -> b between any two workers: a region's own link inside it, else the route between the
    regions; the bandwidth is the bottleneck of a's out-port, the WAN hops and b's in-port. Region pairs are
    tabulated once (R x R), so a block of pairs is a few array lookups."""

    def __init__(self, fleet: FleetArrays) -> None:
        self.fleet = fleet
        r = len(fleet.region_names)
        self.table = np.zeros((4, r, r))  # latency ms, jitter ms, loss, WAN bottleneck Mbit/s
        for a in range(r):
            self.table[:3, a, a] = fleet.intra[a]
            self.table[3, a, a] = np.inf
            for b in range(r):
                if a != b:
                    lat, jit, loss, hops = fleet.route(a, b)
                    self.table[:, a, b] = (lat, jit, loss, min(fleet.capacity[h] for h in hops))

    def __call__(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
        f = self.fleet
        ra, rb = f.region[a], f.region[b]
        lat, jit, loss, wan = self.table[:, ra, rb]
        bw = np.minimum(np.minimum(f.port[a], f.port[b]), wan)
        return lat, jit, loss, bw, ra != rb


def simulate_gossip(topology: Topology, config: GossipConfig) -> GossipResult:
    """Run ``config.rounds`` x workers gossip steps; see the module docstring."""
    config.check()
    fleet = FleetArrays(topology)
    n = fleet.n
    if n < 2:
        raise SimError(f"gossip needs at least 2 workers; {topology.name} has {n}")
    rng = np.random.default_rng(config.seed)
    nbytes = float(config.params * 4)
    block = max(4, config.rounds // 4)  # steps drawn ahead per worker (another block when one runs out)
    peers = np.zeros((n, 0), dtype=np.int64)
    seconds = np.zeros((n, 0))
    cross = np.zeros((n, 0), dtype=bool)
    retx = np.zeros((n, 0), dtype=np.int64)
    factors = np.zeros((n, 0))
    base = config.compute_s * fleet.slowdown
    links = PairLinks(fleet)
    result = GossipResult(config, topology.name, n, len(fleet.region_names), tier=fleet.tier,
                          tier_names=fleet.tier_names)  # fmt: skip

    def more() -> None:
        nonlocal peers, seconds, cross, retx, factors
        me = np.repeat(np.arange(n), block)
        other = rng.integers(0, n - 1, n * block)
        other += other >= me  # uniform over the other workers
        there, back = links(me, other), links(other, me)
        jit = config.jitter
        out_s, out_r = transfer_seconds(
            rng,
            there[0],
            there[1] if jit else 0.0,
            there[3] * config.goodput,
            there[2] if jit else 0.0,
            nbytes,
        )
        in_s, in_r = transfer_seconds(
            rng, back[0], back[1] if jit else 0.0, back[3] * config.goodput, back[2] if jit else 0.0, nbytes
        )
        f = np.ones(n * block)
        if config.transient:
            f[rng.random(n * block) < config.transient] = config.transient_factor
        peers = np.concatenate([peers, other.reshape(n, block)], axis=1)
        seconds = np.concatenate(
            [seconds, (np.maximum(out_s, in_s) + config.overhead_s).reshape(n, block)], axis=1
        )
        cross = np.concatenate([cross, there[4].reshape(n, block)], axis=1)
        retx = np.concatenate([retx, (out_r + in_r).reshape(n, block)], axis=1)
        factors = np.concatenate([factors, f.reshape(n, block)], axis=1)

    more()
    steps = np.zeros(n, dtype=np.int64)
    busy = np.zeros(n)
    comm = np.zeros(n)
    # (end of the step's compute, node): a step is counted when its compute ends, as the runtime counts it
    events = [(float(base[i] * factors[i, 0]), i) for i in range(n)]
    busy += base * factors[:, 0]
    heapq.heapify(events)
    total = config.rounds * n
    done = 0
    crossing = 0
    end = 0.0
    pop, push = heapq.heappop, heapq.heappush
    while done < total:
        t, i = pop(events)
        k = int(steps[i])
        if k + 1 >= seconds.shape[1]:
            more()
        steps[i] = k + 1
        done += 1
        s = float(seconds[i, k])
        comm[i] += s
        crossing += bool(cross[i, k])
        result.retransmitted_bytes += int(retx[i, k])
        end = max(end, t + s)
        c = float(base[i] * factors[i, k + 1])
        busy[i] += c
        push(events, (t + s + c, i))
    # the run ends when the last counted step's exchange ends; the steps then in flight are not counted
    result.modelled_s = end
    for _, i in events:
        busy[i] -= float(base[i] * factors[i, int(steps[i])])
    result.steps, result.busy_s, result.comm_s = steps, busy, comm
    result.exchanges = done
    result.inter_region_bytes = int(crossing * 2 * nbytes)
    result.intra_region_bytes = int((done - crossing) * 2 * nbytes)
    return result


def write_gossip_run(result: GossipResult, out: Any) -> dict[str, Any]:
    """``out``/summary.json, nodes.parquet (steps, compute and exchange seconds per worker) and steps.png
    (how many local steps each worker made: stragglers make fewer, nobody waits for them)."""
    import json
    import os
    from dataclasses import asdict
    from pathlib import Path

    import matplotlib
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edgeray.atomic import write_atomic
    from edgeray.sim.report import LOSS_NOTE

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**result.summary(), "strategy": "gossip", "config": asdict(result.config), "note": LOSS_NOTE}
    table = pa.table(
        {"node": np.arange(result.nodes), "steps": result.steps, "compute_s": result.busy_s,
         "exchange_s": result.comm_s}
    )  # fmt: skip
    tmp = out / "nodes.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "nodes.parquet")
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(result.steps, bins=50)
    ax.set_xlabel("local steps (each followed by one exchange)")
    ax.set_ylabel("workers")
    ax.set_title(f"gossip on {result.nodes} nodes: {int(result.steps.sum()):,} steps")
    fig.tight_layout()
    fig.savefig(out / "steps.png", dpi=110)
    plt.close(fig)
    return summary
