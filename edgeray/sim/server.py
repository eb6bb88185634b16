"""The parameter-server strategies at fleet scale: ``async`` (staleness-aware asynchronous SGD) and ``ssp``.

    result = simulate_server(topo, ServerConfig(params=1_000_000, rounds=100, bound=3))   # ssp
    result.summary()      # modelled time, updates per second, staleness, SSP waits, bytes, idle per tier

One heapq event loop with the runtime's own event rules (edgeray.train.strategies.server.ParameterServer):
a worker ``start``s a step (SSP: only while it is at most ``bound`` steps ahead of the slowest live worker,
else it waits for the update that brings the slowest within reach), computes (``compute_s`` x its slowdown x a transient factor), and at
``push`` time its gradient travels to the server, which applies it at max(server clock, arrival) (or drops
it when more than ``staleness`` versions old), and the parameters travel back; the worker starts again when
they arrive. The server sits where the runtime puts it (:func:`server_node`: the node with the least total
latency to the workers, as edgeray.train.sync.default_server_node chooses). Each transfer is one flow on
its route (the port and WAN bottleneck), with the fabric's transfer formula
(edgeray.fabric.links.transfer_seconds). One addition to the runtime's rules (``server_port``, on by
default): the server's port takes one gradient in and one parameter copy out at a time, so pushes from
thousands of workers queue there; the runtime's modelled clock leaves this out because its driver exchanges
one message at a time. Churn (``churn``): a worker is up for Exp(MTBF) and down for Exp(MTTR), MTTR = MTBF
(1 - a) / a; its step in flight is lost; SSP's slowest is the slowest live worker (one that fails releases
the workers it alone held back at once; the runtime re-checks at the next update); back, it fetches the
parameters from the server (one transfer) and starts with the slowest live worker's step count (the
runtime's join rule), so it holds nobody back. The server's node stays up. A run is ``rounds`` x workers
updates: the work of ``rounds`` synchronous steps. Loss is not simulated.
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
    churn: bool = True
    """Workers fail and come back (up Exp(MTBF), down Exp(MTTR), as :class:`edgeray.sim.gossip.Renewal`):
    the step in flight is lost; back, a worker fetches the parameters from the server and starts. The
    server's own node stays up."""
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
    """SSP: times a worker was held back, each hold counted once (the runtime's log records a ``wait`` at each
    re-check, after every update, so it counts more)."""
    lost_steps: int = 0
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Gradients each worker pushed (applied or dropped)."""
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
            "lost_steps": self.lost_steps,
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

    # per-node state as Python lists: the loop below touches one element at a time, which numpy scalars slow
    times = draw(per_worker).tolist()
    used = [0] * n
    steps = [0] * n  # the SSP clock: steps done (a returning worker's restarts)
    pushed = [0] * n  # gradients pushed
    fetched = [0] * n  # parameter fetches on coming back
    version_of = [0] * n
    busy = [0.0] * n
    slowdown = fleet.slowdown.tolist()
    version = 0
    server_clock = 0.0
    staleness: list[int] = []
    dropped = waits = updates = pushes = lost = 0
    # SSP: workers held back, as (the slowest live worker's steps that lets it start, node, its epoch). Every
    # update has the held workers re-check at its server clock (a "recheck" event: kind 0, node -1), as in the
    # runtime; only the ones that pass are taken out, so an update costs O(log n), not O(workers held), and a
    # held worker's wait is counted once, not at each re-check. (The runtime's serial driver re-checks only
    # the workers held before it processed the update; here every worker held by then re-checks.)
    held: list[tuple[int, int, int]] = []
    # (t, kind, node, seq, epoch): kind 0 start, 1 push, 2 the node fails, 3 it is back; a node's epoch
    # moves on when it fails, which voids the start / push it had queued
    events: list[tuple[float, int, int, int, int]] = [(0.0, 0, i, i, 0) for i in range(n)]
    seq = n
    epoch = [0] * n
    churns = np.zeros(n, dtype=bool)
    mttr = np.full(n, np.inf)
    if config.churn:
        a, mtbf = fleet.availability, fleet.mtbf
        churns = np.isfinite(mtbf) & (a < 1) & (np.arange(n) != server)  # the server's node stays up
        mttr = np.where(churns, np.where(churns, mtbf, 1.0) * (1 - a) / np.where(a > 0, a, 1.0), np.inf)
        for i in np.flatnonzero(churns):
            events.append((float(rng.exponential(mtbf[i])), 2, int(i), seq, 0))
            seq += 1
    heapq.heapify(events)
    count = {0: n}  # live workers by steps done; slowest: the least steps among live workers
    slowest = 0
    bound, limit, compute_s = config.bound, config.staleness, config.compute_s
    pop, push = heapq.heappop, heapq.heappush

    def refill() -> None:
        for row, more in zip(times, draw(per_worker).tolist(), strict=True):
            row.extend(more)

    def transfer(i: int) -> float:
        k = used[i]
        if k >= len(times[i]):
            refill()
        used[i] = k + 1
        return times[i][k]

    def leave_count(i: int) -> None:
        nonlocal slowest
        s = steps[i]
        count[s] -= 1
        if count[s] == 0:
            del count[s]
            if s == slowest:
                slowest = min(count)  # the server's node never fails: some worker is always live

    def release(at: float) -> None:
        """Start, at ``at``, every held worker the slowest live worker lets go."""
        nonlocal seq
        while held and held[0][0] <= slowest:
            _, b, ep = pop(held)
            if ep == epoch[b]:  # else it failed while held: it starts again when it is back
                push(events, (at, 0, b, seq, ep))
                seq += 1

    while updates < total and events:
        t, kind, i, _, ep = pop(events)
        if kind == 2:  # the node fails: its step in flight is lost; back after Exp(MTTR)
            epoch[i] += 1
            lost += 1
            before = slowest
            leave_count(i)
            push(events, (t + float(rng.exponential(mttr[i])), 3, i, seq, 0))
            seq += 1
            if held and slowest != before:
                release(t)  # whoever it alone held back starts now
            continue
        if kind == 3:  # back: it fetches the parameters from the server, then starts
            steps[i] = slowest  # its SSP clock starts at the slowest live worker's, as the runtime's join
            count[slowest] += 1  # the server's node never fails: some worker is always live
            fetched[i] += 1
            version_of[i] = version
            push(events, (t + transfer(i), 0, i, seq, epoch[i]))
            push(events, (t + float(rng.exponential(fleet.mtbf[i])), 2, i, seq + 1, 0))
            seq += 2
            continue
        if i < 0:  # an update's re-check of the held workers
            release(t)
            continue
        if ep != epoch[i]:
            continue  # queued before the node failed
        if kind == 0:  # start
            if bound is not None and steps[i] - slowest >= bound + 1:
                push(held, (steps[i] - bound, i, ep))
                waits += 1
                continue
            factor = 1.0
            if config.transient and rng.random() < config.transient:
                factor = config.transient_factor
            c = compute_s * slowdown[i] * factor
            busy[i] += c
            push(events, (t + c, 1, i, seq, ep))
            seq += 1
        else:  # push: up to the server, applied (or dropped), parameters back
            k = used[i]
            if k + 2 > len(times[i]):
                refill()
            used[i] = k + 2
            up, down = times[i][k], times[i][k + 1]  # transfer(i), inlined: the loop's hot path
            arrive = t + up
            if occupy and i != server:
                in_free += occupy
                if arrive > in_free:
                    in_free = arrive
                arrive = in_free
            stale = version - version_of[i]
            drop = limit is not None and stale > limit
            if arrive > server_clock:
                server_clock = arrive
            pushes += 1
            if drop:
                dropped += 1  # the runtime's token budget counts applied gradients only
                if dropped > 10 * total:
                    raise SimError(
                        f"server config: staleness = {limit} drops {dropped:,} of the first {pushes:,} gradients "
                        f"(with {n:,} workers a gradient is ~{n - 1:,} versions old): the {total:,} updates "
                        f"would take ~{pushes / max(updates, 1):,.0f} pushes each; raise staleness (or leave it "
                        "unset)"
                    )
            else:
                version += 1
                updates += 1
            staleness.append(stale)
            ready = server_clock + down
            if occupy and i != server:
                out_free = (out_free if out_free > server_clock else server_clock) + occupy
                if ready > out_free:
                    out_free = ready
                ready = out_free
            version_of[i] = version
            s = steps[i]
            count[s] -= 1
            if not count[s]:
                del count[s]
            steps[i] = s + 1
            pushed[i] += 1
            count[s + 1] = count.get(s + 1, 0) + 1
            if s == slowest and s not in count:
                slowest = s + 1  # it was the last one at the minimum: the new minimum is one step on
            push(events, (ready, 0, i, seq, ep))
            seq += 1
            if held:
                push(events, (server_clock, 0, -1, seq, 0))  # the held workers re-check then
                seq += 1
    end = server_clock
    result = ServerResult(config, topology.name, n, fleet.names[server], modelled_s=end)
    result.updates, result.dropped, result.waits, result.lost_steps = updates, dropped, waits, lost
    result.steps = np.asarray(pushed, dtype=np.int64)
    result.staleness = np.asarray(staleness, dtype=np.int64)
    sent = (result.steps * 2 + np.asarray(fetched)).astype(np.float64) * nbytes
    sent[server] = 0.0  # the server's own worker talks to it on the same node
    result.inter_region_bytes = int(sent[crosses].sum())
    result.intra_region_bytes = int(sent[~crosses].sum())
    idle = np.maximum(end - np.asarray(busy), 0.0)
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
