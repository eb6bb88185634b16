"""Gossip (AD-PSGD style) at fleet scale, with the runtime's own event rules
(edgeray.train.strategies.gossip.Gossip.run):

- a worker computes a local step (``compute_s`` x its slowdown x a transient factor), then averages its
  parameters with one uniformly drawn other worker: both send the whole model (float32) to each other, and
  the exchange takes the longer of the two transfers (each one flow on its route: the ports and the WAN
  hops' bottleneck, with the fabric's formula, edgeray.fabric.links.transfer_seconds); then it starts its
  next step. Nobody waits for anyone else: the peer keeps its own timeline (the runtime averages into it
  whenever the exchange happens);
- a run is ``rounds`` x workers local steps (the runtime's token budget), in the order of their end times;
- churn (:class:`Renewal`): each worker is up for Exp(MTBF) and down for Exp(MTTR), MTTR = MTBF (1 - a) / a
  (the round engine's chain in continuous time). A worker that fails during a step loses it; when it is up
  again it fetches the model from a peer (one model transfer) and starts a new step. Peers are drawn among
  the workers up at that instant.

Peers and transfers are drawn per (worker, its k-th draw) in blocks, vectorised, rather than in event order
as the runtime's single random stream does: the same distribution, not the same draws (a drawn peer that
is down is replaced by another draw, with its own transfer). Loss of the model is not simulated.
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
    churn: bool = True
    """Workers fail and come back from their MTBF and availability."""
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
    lost_steps: int = 0
    """Steps a worker was computing when it failed (not counted)."""
    rejoins: int = 0
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
            "exchanges": self.exchanges,
            "intra_region_bytes": self.intra_region_bytes,
            "inter_region_bytes": self.inter_region_bytes,
            "retransmitted_bytes": self.retransmitted_bytes,
            "lost_steps": self.lost_steps,
            "rejoins": self.rejoins,
            "idle_fraction_by_tier": {
                t: float(idle[self.tier == k].sum() / live[self.tier == k].sum())
                if live[self.tier == k].sum()
                else 0.0
                for k, t in enumerate(self.tier_names)
            },
            "loss_simulated": False,
        }


class Renewal:
    """Each worker up or down in continuous time: up periods Exp(MTBF), down periods Exp(MTTR), MTTR = MTBF
    (1 - a) / a; every worker starts up; one that never fails (no MTBF, availability 1) stays up. Advanced
    lazily: query it at nondecreasing times."""

    def __init__(self, fleet: FleetArrays, rng: np.random.Generator) -> None:
        a, mtbf = fleet.availability, fleet.mtbf
        churns = np.isfinite(mtbf) & (a < 1)
        self.mtbf = np.where(churns, mtbf, np.inf)
        self.mttr = np.where(churns, np.where(churns, mtbf, 1.0) * (1 - a) / np.where(a > 0, a, 1.0), np.inf)
        self.up = np.ones(fleet.n, dtype=bool)
        self.change = np.full(fleet.n, np.inf)
        self.change[churns] = rng.exponential(self.mtbf[churns])
        self.rng = rng

    def _advance(self, i: int, t: float) -> None:
        while self.change[i] <= t:
            self.up[i] = not self.up[i]
            self.change[i] += self.rng.exponential(self.mtbf[i] if self.up[i] else self.mttr[i])

    def up_at(self, i: int, t: float) -> bool:
        self._advance(i, t)
        return bool(self.up[i])

    def survives(self, i: int, t0: float, t1: float) -> float | None:
        """None if worker ``i`` is up from ``t0`` to ``t1``, else the time it is up again after it was
        down then (already down at ``t0``, or failing in (t0, t1])."""
        self._advance(i, t0)
        if self.up[i]:
            if self.change[i] > t1:
                return None
            self._advance(i, self.change[i])  # down now
        back = float(self.change[i])
        self._advance(i, back)  # up again
        return back


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
    used = np.zeros(n, dtype=np.int64)  # draws consumed (steps, lost steps, fetches)
    busy = np.zeros(n)
    comm = np.zeros(n)
    renewal = Renewal(fleet, rng) if config.churn else None
    began = np.zeros(n)  # when each worker's current step began (up then)
    # (end of the step's compute, node): a step is counted when its compute ends, as the runtime counts it
    events = [(float(base[i] * factors[i, 0]), i) for i in range(n)]
    busy += base * factors[:, 0]
    heapq.heapify(events)
    total = config.rounds * n
    done = 0
    crossing = 0
    end = 0.0
    pop, push = heapq.heappop, heapq.heappush

    def pair(i: int, p: int) -> tuple[float, bool, int]:
        """A fresh exchange between ``i`` and ``p`` (for a redrawn peer)."""
        a, b = np.array([i]), np.array([p])
        there, back = links(a, b), links(b, a)
        jit = config.jitter
        secs, retx_ = zip(
            *(
                transfer_seconds(
                    rng, x[0], x[1] if jit else 0.0, x[3] * config.goodput, x[2] if jit else 0.0, nbytes
                )
                for x in (there, back)
            ),
            strict=True,
        )
        return (
            float(max(secs[0][0], secs[1][0])) + config.overhead_s,
            bool(there[4][0]),
            int(retx_[0][0] + retx_[1][0]),
        )

    while done < total:
        if not events:
            raise SimError("gossip: every worker is down (availability too low for this fleet)")
        t, i = pop(events)
        k = int(used[i])
        if k + 2 >= seconds.shape[1]:
            more()
        used[i] = k + 1
        if renewal is not None:
            back = renewal.survives(i, float(began[i]), t)
            if back is not None:  # failed during the step: lost; back up, it fetches the model, then starts
                result.lost_steps += 1
                result.rejoins += 1
                fetch = float(seconds[i, k])  # one model transfer with a peer
                c = float(base[i] * factors[i, k + 1])
                busy[i] += c
                began[i] = back + fetch
                push(events, (back + fetch + c, i))
                continue
        p, s, crosses, retx_k = int(peers[i, k]), float(seconds[i, k]), bool(cross[i, k]), int(retx[i, k])
        if renewal is not None and not renewal.up_at(p, t):
            for _ in range(100):  # another peer among those up now
                p = int(rng.integers(0, n - 1))
                p += p >= i
                if renewal.up_at(p, t):
                    s, crosses, retx_k = pair(i, p)
                    break
            else:
                s, crosses, retx_k = 0.0, False, 0  # nobody up to average with: the step stands alone
        steps[i] += 1
        done += 1
        comm[i] += s
        if s > 0:
            crossing += crosses
            result.exchanges += 1
        result.retransmitted_bytes += retx_k
        end = max(end, t + s)
        c = float(base[i] * factors[i, k + 1])
        busy[i] += c
        began[i] = t + s
        push(events, (t + s + c, i))
    # the run ends when the last counted step's exchange ends; the steps then in flight are not counted
    result.modelled_s = end
    for _, i in events:
        busy[i] -= float(base[i] * factors[i, int(used[i])])
    result.steps, result.busy_s, result.comm_s = steps, busy, comm
    result.inter_region_bytes = int(crossing * 2 * nbytes)
    result.intra_region_bytes = int((result.exchanges - crossing) * 2 * nbytes)
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
