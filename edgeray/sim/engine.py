"""Vectorised fleet simulation of synchronous training rounds: every node's modelled clock as a numpy array.

    topo = generate(FleetSpec(nodes=10_000, regions=50))
    result = simulate(topo, RoundConfig(params=1_000_000, rounds=100))
    result.summary()            # modelled time per round and phase, bytes per link class, energy

A round is ``local_steps`` local steps (``compute_s`` x the node's slowdown x a transient factor, drawn per
step; 1 step: ``sync-hier``, H steps: DiLoCo's inner steps, whose outer step all-reduces a pseudo-gradient
of the model's size) and one hierarchical all-reduce of the model, exactly as :func:`edgeray.fabric.collectives.hierarchical_allreduce` runs it on the
cluster: every region's nodes send to the region's leader (its first live node, as
:class:`~edgeray.fabric.collectives.GroupPlan` ranks them), the leaders ring-all-reduce (reduce-scatter then
all-gather, 2(L-1) steps, chunks as ``torch.tensor_split`` cuts them, encoded by ``codec``), and each leader
sends the result back to its region. The clocks follow the fabric's rules (edgeray.fabric.backend): a message
leaves at :func:`edgeray.fabric.links.departure` (the sender's clock, or the receiver's when it posted the
receive plus the link's one-way latency, gloo's ready notice, if later) and arrives its transfer time later;
a receiver's clock moves to the arrival, a sender's to its own clock plus the transfer time. Transfer times
come from :func:`edgeray.fabric.links.transfer_seconds` and the bandwidth shares from
:func:`edgeray.fabric.links.fair_share`, the functions the fabric itself calls: one cost model, not a copy. Loss (of the model being trained) is not simulated; only time, bytes and energy.
A node's idle time in a round is its clock's advance less its compute (waiting for the fabric or for the
slowest); the summary gives it per tier as a fraction of the tier's live time.

Churn: each node is up or down per round, a two-state Markov chain whose per-round failure and repair
probabilities come from its MTBF and availability and the nominal round time (the first round without
churn): p_fail = 1 - exp(-T / MTBF), p_repair = 1 - exp(-T / MTTR), MTTR = MTBF (1 - a) / a. A node that is
down sits the round out; the region's next live node leads; a node coming back starts at the round's start.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeray.errors import EdgerayError
from edgeray.fabric.codecs import get_codec
from edgeray.fabric.links import departure, fair_share, port_mbps, transfer_seconds
from edgeray.topology import Topology


class SimError(EdgerayError, ValueError):
    """A simulation request that cannot be honoured, naming the parameter and what is valid."""


@dataclass(frozen=True)
class RoundConfig:
    params: int = 1_000_000
    """Model size: float32 values all-reduced each round."""
    compute_s: float = 0.5
    """One local step on a reference node (slowdown 1), modelled seconds."""
    rounds: int = 100
    codec: str = "none"
    """Codec on the leaders' ring (the inter-region hops), as in hierarchical_allreduce."""
    jitter: bool = True
    """Draw jitter and loss from the links (False: every transfer takes its latency plus bytes/bandwidth)."""
    churn: bool = True
    """Nodes fail and come back from their MTBF and availability."""
    transient: float = 0.0
    """Probability that a node is a transient straggler in a round (``transient_factor`` x slower)."""
    transient_factor: float = 5.0
    allreduce: str = "hierarchical"
    """``hierarchical`` (``sync-hier``, DiLoCo) or ``ring``: one ring over every live node in rank order (region
    by region, as GroupPlan ranks the global group), the ``sync`` strategy's flat all-reduce."""
    local_steps: int = 1
    """Local steps per round: 1 is synchronous data parallelism (``sync-hier``: an all-reduce every step);
    H > 1 is DiLoCo (H inner steps, then the all-reduce of the pseudo-gradient, the model's size)."""
    overhead_s: float = 0.0
    """Calibration: seconds every message costs on top of the link model (jobs/calibrate_sim.py fits it
    against the emulated cluster)."""
    goodput: float = 1.0
    """Calibration: the fraction of its bandwidth share a transfer achieves (fitted with ``overhead_s``)."""
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.params < 1:
            out.append(f"params = {self.params}: must be >= 1")
        if not (self.compute_s >= 0 and math.isfinite(self.compute_s)):
            out.append(f"compute_s = {self.compute_s}: must be >= 0")
        if self.rounds < 1:
            out.append(f"rounds = {self.rounds}: must be >= 1")
        try:
            codec = get_codec(self.codec)
            if not codec.ring_compatible:
                out.append(f"codec = {self.codec!r}: not ring-compatible; the simulator models ring codecs")
        except (KeyError, ValueError) as exc:
            out.append(f"codec = {self.codec!r}: {exc}")
        if not 0 <= self.transient <= 1:
            out.append(f"transient = {self.transient}: must be in [0, 1]")
        if not self.transient_factor >= 1:
            out.append(f"transient_factor = {self.transient_factor}: must be >= 1")
        if self.local_steps < 1:
            out.append(f"local_steps = {self.local_steps}: must be >= 1")
        if not (self.overhead_s >= 0 and math.isfinite(self.overhead_s)):
            out.append(f"overhead_s = {self.overhead_s}: must be >= 0")
        if not (0 < self.goodput <= 10):
            out.append(f"goodput = {self.goodput}: must be in (0, 10]")
        if self.allreduce not in ("hierarchical", "ring"):
            out.append(f"allreduce = {self.allreduce!r}: valid are 'hierarchical', 'ring'")
        elif self.allreduce == "ring" and self.codec != "none":
            out.append(f"codec = {self.codec!r}: the flat ring (sync) sends raw float32; only 'none'")
        return out

    def check(self) -> RoundConfig:
        """Raise :class:`SimError` listing every problem; returns the config when there is none."""
        problems = self.problems()
        if problems:
            raise SimError("round config: " + "; ".join(problems))
        return self


class FleetArrays:
    """The topology as arrays, node index = topology order (region by region)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        nodes = list(topology.iter_nodes())
        self.names = [n.name for n in nodes]
        self.n = len(nodes)
        self.region_names = list(topology.regions)
        rindex = {r: i for i, r in enumerate(self.region_names)}
        self.region = np.array([rindex[n.region] for n in nodes], dtype=np.int64)
        self.port = np.array([port_mbps(topology, n.name) for n in nodes], dtype=np.float64)
        self.slowdown = np.array([n.slowdown for n in nodes], dtype=np.float64)
        self.availability = np.array([n.churn.availability for n in nodes], dtype=np.float64)
        self.mtbf = np.array([n.churn.mtbf_s or math.inf for n in nodes], dtype=np.float64)
        self.idle_w = np.array([n.power.idle_w for n in nodes], dtype=np.float64)
        self.busy_w = np.array([n.power.busy_w for n in nodes], dtype=np.float64)
        self.tier_names = sorted({n.tier.value for n in nodes})
        self.tier = np.array([self.tier_names.index(n.tier.value) for n in nodes], dtype=np.int64)
        intra = [topology.regions[r].intra_link for r in self.region_names]
        self.intra = np.array([[x.latency_ms, x.jitter_ms, x.loss] for x in intra], dtype=np.float64)
        # directed inter-region links, numbered after the ports: resource ids are out-port = node,
        # in-port = n + node, WAN hop = 2n + k (edgeray.fabric.links.LinkModel.resources, as arrays)
        self.wan: dict[tuple[str, str], int] = {}
        caps: list[float] = []
        for pair, link in topology.inter_links.items():
            a, b = sorted(pair)
            for hop in ((a, b), (b, a)):
                self.wan[hop] = len(caps)
                caps.append(link.bandwidth_mbps)
        self.capacity = np.concatenate([self.port, self.port, np.asarray(caps, dtype=np.float64)])
        self._routes: dict[tuple[int, int], tuple[float, float, float, list[int]]] = {}

    def route(self, a: int, b: int) -> tuple[float, float, float, list[int]]:
        """(latency ms, jitter ms, loss, WAN resource ids) between two different regions (cached)."""
        key = (a, b)
        if key not in self._routes:
            route = self.topology.route(self.region_names[a], self.region_names[b])
            hops = [2 * self.n + self.wan[h] for h in itertools.pairwise(route.regions)]
            link = route.link
            self._routes[key] = (link.latency_ms, link.jitter_ms, link.loss, hops)
        return self._routes[key]


@dataclass
class Messages:
    """One phase's transfers: sender, receiver, link parameters, bandwidth share, payload bytes."""

    src: np.ndarray
    dst: np.ndarray
    latency_ms: np.ndarray
    jitter_ms: np.ndarray
    loss: np.ndarray
    bandwidth_mbps: np.ndarray
    nbytes: np.ndarray

    @classmethod
    def empty(cls) -> Messages:
        z = np.zeros(0)
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), z, z, z, z, z)

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class Plan:
    """Who talks to whom in one round's hierarchical all-reduce, for the live nodes."""

    live: np.ndarray
    """Indices of the live nodes (topology order)."""
    leaders: np.ndarray
    """Each live region's leader, in region order: the ring's ranks."""
    reduce: Messages
    ring: list[Messages]
    """2(L-1) steps; in step s rank i sends to rank i + 1."""
    broadcast: Messages

    def messages(self) -> list[Messages]:
        return [self.reduce, *self.ring, self.broadcast]


def _intra(fleet: FleetArrays, src: np.ndarray, dst: np.ndarray, nbytes: int) -> Messages:
    """Concurrent transfers inside regions (a reduce to, or a broadcast from, each region's leader)."""
    n = fleet.n
    ids = np.stack([src, n + dst], axis=1)
    link = fleet.intra[fleet.region[src]]
    return Messages(
        src, dst, link[:, 0], link[:, 1], link[:, 2], fair_share(ids, fleet.capacity),
        np.full(len(src), float(nbytes)),
    )  # fmt: skip


def plan_round(fleet: FleetArrays, live: np.ndarray, params: int, codec: str) -> Plan:
    """The messages of one hierarchical all-reduce of ``params`` float32 values among ``live`` nodes."""
    regions = fleet.region[live]
    first = np.r_[True, regions[1:] != regions[:-1]]  # live is sorted: each region's nodes are contiguous
    leaders = live[first]
    leader_of = leaders[np.cumsum(first) - 1]
    members = live[~first]
    full = params * 4
    reduce = _intra(fleet, members, leader_of[~first], full) if len(members) else Messages.empty()
    broadcast = _intra(fleet, leader_of[~first], members, full) if len(members) else Messages.empty()
    ring: list[Messages] = []
    count = len(leaders)
    if count > 1:
        c = get_codec(codec)
        sizes = np.full(count, params // count) + (np.arange(count) < params % count)  # tensor_split
        chunk_bytes = np.array([c.nbytes(int(s)) for s in sizes], dtype=np.float64)
        nxt = np.roll(leaders, -1)
        lat, jit, loss, hops = zip(
            *(
                fleet.route(int(fleet.region[a]), int(fleet.region[b]))
                for a, b in zip(leaders, nxt, strict=True)
            ),
            strict=True,
        )
        width = 2 + max(len(h) for h in hops)
        ids = np.full((count, width), -1, dtype=np.int64)
        for i, (a, b, h) in enumerate(zip(leaders, nxt, hops, strict=True)):
            ids[i, : 2 + len(h)] = [a, *h, fleet.n + b]
        bandwidth = fair_share(ids, fleet.capacity)  # the ring's flows all run in every step
        rank = np.arange(count)
        for s in range(count - 1):  # reduce-scatter: rank r sends chunk (r - s) % L
            ring.append(
                Messages(leaders, nxt, np.array(lat), np.array(jit), np.array(loss), bandwidth,
                         chunk_bytes[(rank - s) % count])
            )  # fmt: skip
        for s in range(count - 1):  # all-gather: rank r sends chunk (r + 1 - s) % L
            ring.append(
                Messages(leaders, nxt, np.array(lat), np.array(jit), np.array(loss), bandwidth,
                         chunk_bytes[(rank + 1 - s) % count])
            )  # fmt: skip
    return Plan(live, leaders, reduce, ring, broadcast)


@dataclass
class FlatRing:
    """The ``sync`` strategy's all-reduce: one ring over the live nodes in rank order, 2(n-1) steps; in step
    s rank r sends to rank r + 1 over their link (the region's own, or the route between their regions)."""

    live: np.ndarray
    latency_ms: np.ndarray
    jitter_ms: np.ndarray
    loss: np.ndarray
    bandwidth_mbps: np.ndarray
    """Each rank's flow to the next: its fair share (every flow of the ring runs in every step)."""
    chunk_bytes: np.ndarray
    """tensor_split's chunks of the model, float32."""
    crosses: np.ndarray
    """Whether rank r's flow leaves its region."""

    def bytes_sent(self) -> np.ndarray:
        """Per rank over the whole all-reduce: every chunk but (r+1) % n in the reduce-scatter and every
        chunk but (r+2) % n in the all-gather."""
        n, c = len(self.live), self.chunk_bytes
        if n < 2:
            return np.zeros(n)
        r = np.arange(n)
        return 2 * c.sum() - c[(r + 1) % n] - c[(r + 2) % n]


def plan_flat(fleet: FleetArrays, live: np.ndarray, params: int) -> FlatRing:
    n = len(live)
    nxt = np.roll(live, -1)
    src_r, dst_r = fleet.region[live], fleet.region[nxt]
    crosses = src_r != dst_r
    lat, jit, loss = (fleet.intra[src_r, k].copy() for k in range(3))
    hops: list[list[int]] = [[] for _ in range(n)]
    for i in np.flatnonzero(crosses):
        lat[i], jit[i], loss[i], hops[i] = fleet.route(int(src_r[i]), int(dst_r[i]))
    width = 2 + max((len(h) for h in hops), default=0)
    ids = np.full((n, width), -1, dtype=np.int64)
    ids[:, 0], ids[:, 1] = live, fleet.n + nxt
    for i in np.flatnonzero(crosses):
        ids[i, 1 : 2 + len(hops[i])] = [*hops[i], fleet.n + nxt[i]]
    bandwidth = fair_share(ids, fleet.capacity) if n > 1 else np.zeros(n)
    sizes = np.full(n, params // n) + (np.arange(n) < params % n)
    return FlatRing(live, lat, jit, loss, bandwidth, sizes * 4.0, crosses)


def run_flat(clock: np.ndarray, ring: FlatRing, config: RoundConfig, rng: np.random.Generator) -> int:
    """Advance the live nodes' clocks (in place) through the ring's 2(n-1) steps, with the same clock rule
    as the leaders' ring in :func:`run_round`; transfers are drawn a block of steps at a time (bounded
    memory). Returns the retransmitted bytes."""
    n = len(ring.live)
    if n < 2:
        return 0
    c = clock[ring.live]
    rank = np.arange(n)
    steps = 2 * (n - 1)
    block = max(1, 4_000_000 // n)
    jitter = ring.jitter_ms if config.jitter else np.zeros(n)
    loss = ring.loss if config.jitter else np.zeros(n)
    retransmitted = 0
    for first in range(0, steps, block):
        s = np.arange(first, min(steps, first + block))[:, None]
        chunk = np.where(s < n - 1, (rank - s) % n, (rank + 1 - (s - (n - 1))) % n)
        seconds, retx = transfer_seconds(
            rng, ring.latency_ms, jitter, ring.bandwidth_mbps * config.goodput, loss, ring.chunk_bytes[chunk]
        )
        seconds += config.overhead_s
        retransmitted += int(retx.sum())
        notice = ring.latency_ms / 1e3
        for t in seconds:
            c = ring_step(c, t, notice)
    clock[ring.live] = c
    return retransmitted


def ring_step(c: np.ndarray, t: np.ndarray, notice_s: np.ndarray) -> np.ndarray:
    """Clocks after one ring step where every rank r sends to r + 1 (taking ``t[r]``) and receives from
    r - 1, all posting at their clock ``c``: rank r + 1's ready notice reaches r ``notice_s[r]`` later."""
    arrived = departure(c, np.roll(c, -1), notice_s) + t  # rank r's bytes at r + 1
    return np.maximum(c + t, np.roll(arrived, 1))  # my send done, my predecessor's arrived


@dataclass
class Costs:
    """One round's sampled costs: compute seconds per node and seconds per message of every phase."""

    compute_s: np.ndarray
    """Per node (index = node; 0 for nodes that sit the round out)."""
    seconds: list[np.ndarray]
    """Per phase of :meth:`Plan.messages`, one value per message."""
    retransmitted: int


def sample_compute(
    fleet: FleetArrays, live: np.ndarray, config: RoundConfig, rng: np.random.Generator
) -> np.ndarray:
    """Every node's compute seconds this round (0 for nodes that sit it out), transient stragglers drawn."""
    compute = np.zeros(fleet.n)
    factor = np.ones(len(live))
    if config.local_steps > 1:  # each inner step is a straggler on its own: H + (f - 1) x Binomial(H, p)
        factor = factor * config.local_steps
        if config.transient:
            slow = rng.binomial(config.local_steps, config.transient, len(live))
            factor += (config.transient_factor - 1) * slow
    elif config.transient:
        factor[rng.random(len(live)) < config.transient] = config.transient_factor
    compute[live] = config.compute_s * fleet.slowdown[live] * factor
    return compute


def sample_costs(fleet: FleetArrays, plan: Plan, config: RoundConfig, rng: np.random.Generator) -> Costs:
    """Draw the round's transient stragglers and every transfer's jitter and loss (one vectorised draw)."""
    compute = sample_compute(fleet, plan.live, config, rng)
    phases = plan.messages()
    cat = [
        np.concatenate([getattr(m, f) for m in phases])
        for f in ("latency_ms", "jitter_ms", "bandwidth_mbps", "loss", "nbytes")
    ]
    if not config.jitter:
        cat[1] = np.zeros_like(cat[1])
        cat[3] = np.zeros_like(cat[3])
    cat[2] = cat[2] * config.goodput
    seconds, retransmitted = transfer_seconds(rng, *cat)
    seconds += config.overhead_s
    cuts = np.cumsum([len(m) for m in phases])[:-1]
    return Costs(compute, list(np.split(seconds, cuts)), int(retransmitted.sum()))


def run_round(clock: np.ndarray, plan: Plan, costs: Costs) -> list[float]:
    """Advance every live node's ``clock`` (in place) through one round; returns the latest clock after
    compute, the reduce, the leaders' ring and the broadcast (the phase boundaries on the critical path)."""
    marks = []
    live = plan.live
    clock[live] += costs.compute_s[live]
    marks.append(float(clock[live].max()))
    red = plan.reduce
    if len(red):  # the leader posts every member's receive at once
        t = costs.seconds[0]
        arrival = departure(clock[red.src], clock[red.dst], red.latency_ms / 1e3) + t
        clock[red.src] += t  # a sender is done when its link has carried the bytes
        np.maximum.at(clock, red.dst, arrival)
    marks.append(float(clock[live].max()))
    for step, t in zip(plan.ring, costs.seconds[1:-1], strict=True):
        clock[step.src] = ring_step(clock[step.src], t, step.latency_ms / 1e3)
    marks.append(float(clock[live].max()))
    bc = plan.broadcast
    if len(bc):
        t = costs.seconds[-1]
        arrival = departure(clock[bc.src], clock[bc.dst], bc.latency_ms / 1e3) + t
        done = clock[bc.src] + t
        np.maximum.at(clock, bc.dst, arrival)
        np.maximum.at(clock, bc.src, done)
    marks.append(float(clock[live].max()))
    return marks


@dataclass
class SimResult:
    config: RoundConfig
    topology: str
    nodes: int
    regions: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    """One row per round: modelled end, time per phase, live nodes, leaders, bytes per class, energy."""
    trace: list[tuple[Plan, Costs]] | None = None
    """Every round's plan and sampled costs (``simulate(..., trace=True)``): what an oracle replays."""
    clocks: list[np.ndarray] | None = None
    """Every node's clock after each round (NaN: sat it out), with ``trace=True``."""

    def summary(self) -> dict[str, Any]:
        rows = self.rows
        total = rows[-1]["end_s"] if rows else 0.0
        phases = ("compute_s", "reduce_s", "ring_s", "broadcast_s")
        return {
            "topology": self.topology,
            "nodes": self.nodes,
            "regions": self.regions,
            "rounds": len(rows),
            "modelled_s": total,
            "round_s_median": float(np.median([r["round_s"] for r in rows])) if rows else 0.0,
            "phase_s_median": {p: float(np.median([r[p] for r in rows])) for p in phases} if rows else {},
            "intra_region_bytes": int(sum(r["intra_region_bytes"] for r in rows)),
            "inter_region_bytes": int(sum(r["inter_region_bytes"] for r in rows)),
            "retransmitted_bytes": int(sum(r["retransmitted_bytes"] for r in rows)),
            "energy_j": float(sum(r["energy_j"] for r in rows)),
            "live_min": min(r["live"] for r in rows) if rows else 0,
            "local_steps": self.config.local_steps,
            "steps": len(rows) * self.config.local_steps,
            "idle_fraction_by_tier": {
                k.removeprefix("idle_s_"): (
                    sum(r[k] for r in rows) / live
                    if (live := sum(r["live_s_" + k[7:]] for r in rows))
                    else 0.0
                )
                for k in (rows[0] if rows else {})
                if k.startswith("idle_s_")
            },
            "loss_simulated": False,
        }


def churn_probabilities(fleet: FleetArrays, round_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-round (fail, repair) probabilities of every node for a nominal round of ``round_s``."""
    a, mtbf = fleet.availability, fleet.mtbf
    churns = np.isfinite(mtbf) & (a < 1)  # the rest never fail
    mtbf = np.where(churns, mtbf, 1.0)
    mttr = np.where(churns, mtbf * (1 - a) / a, 1.0)
    fail = np.where(churns, -np.expm1(-round_s / mtbf), 0.0)
    repair = np.where(churns, -np.expm1(-round_s / mttr), 1.0)
    return fail, repair


def simulate(topology: Topology, config: RoundConfig, *, trace: bool = False) -> SimResult:
    """Run ``config.rounds`` rounds on ``topology``; see the module docstring."""
    config.check()
    fleet = FleetArrays(topology)
    rng = np.random.default_rng(config.seed)
    up = np.ones(fleet.n, dtype=bool)
    clock = np.zeros(fleet.n)
    result = SimResult(
        config, topology.name, fleet.n, len(fleet.region_names), trace=[] if trace else None,
        clocks=[] if trace else None,
    )  # fmt: skip
    if trace and config.allreduce != "hierarchical":
        raise SimError(f"trace=True replays the hierarchical all-reduce only, not {config.allreduce!r}")
    plan: Plan | None = None
    flat: FlatRing | None = None
    probs: tuple[np.ndarray, np.ndarray] | None = None
    for r in range(config.rounds):
        start = float(clock[up].max()) if up.any() else 0.0
        if config.churn and probs is not None:
            fail, repair = probs
            draw = rng.random(fleet.n)
            back = ~up & (draw < repair)
            up = np.where(up, draw >= fail, back)
            clock[back] = start  # a node coming back joins at the round's start
            if not up.any():
                raise SimError(f"round {r}: every node is down (availability too low for this fleet)")
        live = np.flatnonzero(up)
        before = clock.copy()
        if config.allreduce == "ring":
            if flat is None or not np.array_equal(flat.live, live):
                flat = plan_flat(fleet, live, config.params)
            busy = sample_compute(fleet, live, config, rng)
            clock[live] += busy[live]
            after_compute = float(clock[live].max())
            retransmitted = run_flat(clock, flat, config, rng)
            end = float(clock[live].max())
            marks = [after_compute, after_compute, end, end]
            sent = flat.bytes_sent()
            leaders, intra, inter = 0, int(sent[~flat.crosses].sum()), int(sent[flat.crosses].sum())
        else:
            if plan is None or not np.array_equal(plan.live, live):
                plan = plan_round(fleet, live, config.params, config.codec)
            costs = sample_costs(fleet, plan, config, rng)
            marks = run_round(clock, plan, costs)
            busy, retransmitted, leaders = costs.compute_s, costs.retransmitted, len(plan.leaders)
            intra = int(plan.reduce.nbytes.sum() + plan.broadcast.nbytes.sum())
            inter = int(sum(float(m.nbytes.sum()) for m in plan.ring))
            if result.trace is not None:
                result.trace.append((plan, costs))
        round_s = marks[-1] - start
        if probs is None:
            probs = churn_probabilities(fleet, round_s)  # the first round, churn-free, sets the nominal time
        span = np.where(up, clock - before, 0.0)
        idle = np.maximum(span - busy, 0.0)
        energy = float(np.sum(fleet.busy_w * busy + fleet.idle_w * idle))
        idle_tier = np.bincount(fleet.tier, weights=idle, minlength=len(fleet.tier_names))
        span_tier = np.bincount(fleet.tier, weights=span, minlength=len(fleet.tier_names))
        result.rows.append(
            {
                "round": r,
                "end_s": marks[-1],
                "round_s": round_s,
                "compute_s": marks[0] - start,
                "reduce_s": marks[1] - marks[0],
                "ring_s": marks[2] - marks[1],
                "broadcast_s": marks[3] - marks[2],
                "live": len(live),
                "leaders": leaders,
                "intra_region_bytes": intra,
                "inter_region_bytes": inter,
                "retransmitted_bytes": retransmitted,
                "energy_j": energy,
                **{f"idle_s_{t}": float(v) for t, v in zip(fleet.tier_names, idle_tier, strict=True)},
                **{f"live_s_{t}": float(v) for t, v in zip(fleet.tier_names, span_tier, strict=True)},
            }
        )
        if result.clocks is not None:
            result.clocks.append(np.where(up, clock, np.nan))
    return result
