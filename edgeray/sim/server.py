"""The parameter-server strategies at fleet scale: ``async`` (staleness-aware asynchronous SGD) and ``ssp``.

    result = simulate_server(topo, ServerConfig(params=1_000_000, rounds=100, bound=3))   # ssp
    result.summary()      # modelled time, updates per second, staleness, SSP waits, bytes, idle per tier

One heapq event loop with the runtime's own event rules (edgeray.train.strategies.server.ParameterServer):
a worker ``start``s a step (SSP: only while it is at most ``bound`` steps ahead of the slowest worker, else it
waits until the next update lands), computes (``compute_s`` x its slowdown x a transient factor), and at
``push`` time its gradient travels to the server, which applies it at max(server clock, arrival) (or drops
it when more than ``staleness`` versions old), and the parameters travel back; the worker starts again when
they arrive. The server sits where the runtime puts it (:func:`server_node`: the node with the least total
latency to the workers, as edgeray.train.sync.default_server_node chooses). Each transfer is one flow on
its route (the port and WAN bottleneck), with the fabric's transfer formula
(edgeray.fabric.links.transfer_seconds). One addition to the runtime's rules (``server_port``, on by
default): the server's port takes one gradient in and one parameter copy out at a time, so pushes from
thousands of workers queue there; the runtime's modelled clock leaves this out because its driver exchanges
one message at a time. Workers do not churn in this engine. A run is ``rounds`` x workers updates: the work of ``rounds`` synchronous steps. Loss is not
simulated.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeray.fabric.links import transfer_seconds
from edgeray.sim.engine import FleetArrays, SimError
from edgeray.topology import INTRA_NODE_LINK, Topology


@dataclass(frozen=True)
class ServerConfig:
    params: int = 1_000_000
    compute_s: float = 0.5
    rounds: int = 100
    """Applied updates in all: rounds x workers (dropped gradients do not count, as in the runtime)."""
    bound: int | None = None
    """SSP's bound (None: ``async``, no bound)."""
    staleness: int | None = None
    """``async``: drop gradients more than this many versions old (None: never)."""
    jitter: bool = True
    transient: float = 0.0
    transient_factor: float = 5.0
    server_port: bool = True
    """The server's network port carries one gradient (in) and one parameter copy (out) at a time. The
    runtime's modelled clock leaves this out (its driver exchanges one message at a time, so its ledger never
    sees two pushes overlap); at fleet scale it is what bounds a parameter server."""
    seed: int = 0

    def check(self) -> ServerConfig:
        out = []
        if self.params < 1:
            out.append(f"params = {self.params}: must be >= 1")
        if not (self.compute_s > 0 and math.isfinite(self.compute_s)):
            out.append(
                f"compute_s = {self.compute_s}: must be > 0 (a worker that never computes never waits)"
            )
        if self.rounds < 1:
            out.append(f"rounds = {self.rounds}: must be >= 1")
        if self.bound is not None and self.bound < 0:
            out.append(f"bound = {self.bound}: must be >= 0")
        if self.staleness is not None and self.staleness < 0:
            out.append(f"staleness = {self.staleness}: must be >= 0")
        if self.bound is not None and self.staleness is not None:
            out.append("bound and staleness: ssp takes a bound, async a staleness limit; not both")
        if not 0 <= self.transient <= 1:
            out.append(f"transient = {self.transient}: must be in [0, 1]")
        if out:
            raise SimError("server config: " + "; ".join(out))
        return self


def server_node(fleet: FleetArrays) -> int:
    """The node with the least total one-way latency to every node (ties: the smallest name), computed per
    region: the same choice as edgeray.train.sync.default_server_node with every node a worker."""
    r = len(fleet.region_names)
    lat = np.zeros((r, r))
    for a in range(r):
        for b in range(r):
            lat[a, b] = fleet.intra[a, 0] if a == b else fleet.route(a, b)[0]
    count = np.bincount(fleet.region, minlength=r).astype(np.float64)
    per_region = lat @ count - np.diag(lat) + INTRA_NODE_LINK.latency_ms  # itself: the intra-node link
    total = per_region[fleet.region]
    best = total.min()
    ties = np.flatnonzero(np.isclose(total, best, rtol=0, atol=1e-9))
    return int(min(ties, key=lambda i: fleet.names[i]))


@dataclass
class ServerResult:
    config: ServerConfig
    topology: str
    nodes: int
    server: str
    modelled_s: float = 0.0
    updates: int = 0
    dropped: int = 0
    waits: int = 0
    staleness: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    intra_region_bytes: int = 0
    inter_region_bytes: int = 0
    idle_fraction_by_tier: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        st = self.staleness
        return {
            "strategy": "ssp" if self.config.bound is not None else "async",
            "topology": self.topology,
            "nodes": self.nodes,
            "server": self.server,
            "modelled_s": self.modelled_s,
            "updates": self.updates,
            "updates_per_s": self.updates / self.modelled_s if self.modelled_s else 0.0,
            "dropped": self.dropped,
            "ssp_waits": self.waits,
            "staleness_mean": float(st.mean()) if st.size else 0.0,
            "staleness_p95": float(np.percentile(st, 95)) if st.size else 0.0,
            "staleness_max": int(st.max()) if st.size else 0,
            "intra_region_bytes": self.intra_region_bytes,
            "inter_region_bytes": self.inter_region_bytes,
            "idle_fraction_by_tier": self.idle_fraction_by_tier,
            "loss_simulated": False,
        }


def _links(fleet: FleetArrays, server: int) -> tuple[np.ndarray, ...]:
    """Per node: latency, jitter, loss and one-flow bandwidth of its route to the server (and back), and
    whether that route leaves its region."""
    n = fleet.n
    lat, jit, loss = (fleet.intra[fleet.region, k].copy() for k in range(3))
    sr = int(fleet.region[server])
    up_bw = np.minimum(fleet.port, fleet.port[server])
    crosses = fleet.region != sr
    for r in np.unique(fleet.region[crosses]):
        rl, rj, rloss, hops = fleet.route(int(r), sr)
        back = fleet.route(sr, int(r))[3]
        mine = fleet.region == r
        lat[mine], jit[mine], loss[mine] = rl, rj, rloss
        wan = min((fleet.capacity[h] for h in [*hops, *back]), default=math.inf)
        up_bw[mine] = np.minimum(up_bw[mine], wan)
    same = np.arange(n) == server
    lat[same], jit[same], loss[same] = INTRA_NODE_LINK.latency_ms, 0.0, 0.0
    up_bw[same] = INTRA_NODE_LINK.bandwidth_mbps
    return lat, jit, loss, up_bw, crosses & ~same


def simulate_server(topology: Topology, config: ServerConfig) -> ServerResult:
    """Run ``config.rounds`` x workers updates through the parameter server; see the module docstring."""
    config.check()
    fleet = FleetArrays(topology)
    rng = np.random.default_rng(config.seed)
    n = fleet.n
    server = server_node(fleet)
    lat, jit, loss, bw, crosses = _links(fleet, server)
    # seconds the server's port is busy with one model's bytes (its own node's worker does not use it)
    occupy = config.params * 4 * 8 / (fleet.port[server] * 1e6) if config.server_port else 0.0
    in_free = out_free = 0.0
    if not config.jitter:
        jit, loss = np.zeros(n), np.zeros(n)
    nbytes = float(config.params * 4)
    total = config.rounds * n
    per_worker = config.rounds * 2 + 8  # transfers drawn ahead per worker (refilled if one needs more)

    def draw(k: int) -> np.ndarray:
        secs, _ = transfer_seconds(
            rng, lat[:, None], jit[:, None], bw[:, None], loss[:, None], np.full((n, k), nbytes)
        )
        return secs

    times = draw(per_worker)
    used = np.zeros(n, dtype=np.int64)
    steps = np.zeros(n, dtype=np.int64)
    version_of = np.zeros(n, dtype=np.int64)
    busy = np.zeros(n)
    version = 0
    server_clock = 0.0
    now = 0.0
    staleness: list[int] = []
    dropped = waits = updates = pushes = 0
    blocked: set[int] = set()
    events: list[tuple[float, int, int, int]] = [(0.0, 0, i, 0) for i in range(n)]  # (t, kind 0/1, node, seq)
    heapq.heapify(events)
    seq = n
    slowest = 0  # min(steps): maintained with a count of workers at the minimum
    at_min = n
    bound = config.bound
    pop, push = heapq.heappop, heapq.heappush

    def transfer(i: int) -> float:
        nonlocal times
        if used[i] >= times.shape[1]:
            times = np.concatenate([times, draw(per_worker)], axis=1)
        t = float(times[i, used[i]])
        used[i] += 1
        return t

    while updates < total and events:
        t, kind, i, _ = pop(events)
        if kind == 0:  # start
            if bound is not None and steps[i] - slowest >= bound + 1:
                blocked.add(i)
                waits += 1
                continue
            factor = 1.0
            if config.transient and rng.random() < config.transient:
                factor = config.transient_factor
            c = config.compute_s * fleet.slowdown[i] * factor
            busy[i] += c
            push(events, (t + c, 1, i, seq))
            seq += 1
        else:  # push: up to the server, applied (or dropped), parameters back
            arrive = t + transfer(i)
            if occupy and i != server:
                arrive = in_free = max(arrive, in_free + occupy)
            stale = version - int(version_of[i])
            drop = config.staleness is not None and stale > config.staleness
            server_clock = max(server_clock, arrive)
            pushes += 1
            if drop:
                dropped += 1  # the runtime's token budget counts applied gradients only
            else:
                version += 1
                updates += 1
            staleness.append(stale)
            ready = server_clock + transfer(i)
            if occupy and i != server:
                ready = out_free = max(ready, max(out_free, server_clock) + occupy)
            version_of[i] = version
            if steps[i] == slowest:
                at_min -= 1
            steps[i] += 1
            if at_min == 0:
                slowest += 1
                at_min = int(np.count_nonzero(steps == slowest))
            now = max(now, server_clock)
            push(events, (ready, 0, i, seq))
            seq += 1
            for b in sorted(blocked):
                push(events, (server_clock, 0, b, seq))
                seq += 1
            blocked.clear()
    end = max(now, server_clock)
    result = ServerResult(config, topology.name, n, fleet.names[server], modelled_s=end)
    result.updates, result.dropped, result.waits = updates, dropped, waits
    result.staleness = np.asarray(staleness, dtype=np.int64)
    sent = steps.astype(np.float64) * 2 * nbytes
    sent[server] = 0.0  # the server's own worker talks to it on the same node
    result.inter_region_bytes = int(sent[crosses].sum())
    result.intra_region_bytes = int(sent[~crosses].sum())
    idle = np.maximum(end - busy, 0.0)
    for k, name in enumerate(fleet.tier_names):
        mine = fleet.tier == k
        result.idle_fraction_by_tier[name] = float(idle[mine].sum() / (end * mine.sum())) if end else 0.0
    return result


def write_server_run(result: ServerResult, out: Any) -> dict[str, Any]:
    """``out``/summary.json and staleness.png (how stale the applied and dropped gradients were)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    import matplotlib

    from edgeray.atomic import write_atomic
    from edgeray.sim.report import LOSS_NOTE

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**result.summary(), "config": asdict(result.config), "note": LOSS_NOTE}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    st = result.staleness
    bins: Any = np.arange(st.max() + 2) - 0.5 if st.size and st.max() < 200 else 50
    ax.hist(st, bins=bins)
    ax.set_xlabel("staleness (server versions since the worker's pull)")
    ax.set_ylabel("gradients")
    ax.set_title(f"{summary['strategy']} on {result.nodes} nodes: {result.updates:,} updates")
    fig.tight_layout()
    fig.savefig(out / "staleness.png", dpi=110)
    plt.close(fig)
    return summary
