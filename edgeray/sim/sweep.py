"""Sweeps of the fleet simulator: fleet sizes x strategies, each scenario an independent Ray task.

    python jobs/sweep_sim.py --sizes 100:5,1000:20,10000:50 --workloads hierarchical,diloco,ssp --out DIR
    eval "$(edgeray env)"; ray job submit --working-dir . -- python jobs/sweep_sim.py ... --out /tmp/sweep

:func:`run_scenario` is a plain function of a :class:`Scenario` (it generates the fleet and runs one
simulation); :func:`sweep` runs every scenario as a ``ray.remote`` task (one CPU each) on the cluster this
process is a driver of, or in this process one after another when it is none. Each row reports modelled
seconds per step (a step: one local step of every worker; DiLoCo's round is ``local_steps`` of them, a
parameter server's ``rounds`` x workers updates are ``rounds`` of them) and bytes per step by link class.
Loss is not simulated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from edgeray.sim.engine import SimError

WORKLOADS = ("hierarchical", "sync", "diloco", "streaming-diloco", "gossip", "async", "ssp")


@dataclass(frozen=True)
class Scenario:
    workload: str
    nodes: int
    regions: int
    rounds: int = 10
    params: int = 1_000_000
    compute_s: float = 0.5
    local_steps: int = 20
    """DiLoCo's and Streaming DiLoCo's h (other workloads: 1)."""
    fragments: int = 4
    """Streaming DiLoCo's fragments (its overlap: 1 inner step)."""
    bound: int = 3
    """SSP's bound."""
    stragglers: float = 0.05
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.workload not in WORKLOADS:
            out.append(f"workload {self.workload!r}: valid are {', '.join(WORKLOADS)}")
        if not 1 <= self.regions <= self.nodes:
            out.append(f"{self.nodes} nodes, {self.regions} regions: regions must be in [1, nodes]")
        return out


def run_scenario(s: Scenario) -> dict[str, Any]:
    """Generate the scenario's fleet and simulate it; one flat row of results."""
    from edgeray.sim.engine import RoundConfig, simulate
    from edgeray.sim.fleet import FleetSpec, generate
    from edgeray.sim.gossip import GossipConfig, simulate_gossip
    from edgeray.sim.server import ServerConfig, simulate_server
    from edgeray.sim.streaming import StreamingConfig, simulate_streaming

    t0 = time.perf_counter()
    topo = generate(FleetSpec(nodes=s.nodes, regions=s.regions, stragglers=s.stragglers, seed=s.seed))
    row: dict[str, Any] = asdict(s)
    if s.workload in ("async", "ssp"):
        bound = s.bound if s.workload == "ssp" else None
        cfg = ServerConfig(params=s.params, compute_s=s.compute_s, rounds=s.rounds, bound=bound, seed=s.seed)
        out = simulate_server(topo, cfg).summary()
        steps = s.rounds
        row["local_steps"] = 1
        row.update(staleness_mean=out["staleness_mean"], staleness_max=out["staleness_max"])
    elif s.workload == "gossip":
        out = simulate_gossip(
            topo, GossipConfig(params=s.params, compute_s=s.compute_s, rounds=s.rounds, seed=s.seed)
        ).summary()
        steps = s.rounds
        row["local_steps"] = 1
    elif s.workload == "streaming-diloco":
        cfg3 = StreamingConfig(
            params=s.params, compute_s=s.compute_s, rounds=s.rounds, h=s.local_steps, fragments=s.fragments,
            seed=s.seed,
        )  # fmt: skip
        out = simulate_streaming(topo, cfg3).summary()
        steps = s.rounds * s.local_steps
        row.update(
            peak_outer_inter_region_bytes=out["peak_outer_inter_region_bytes"], exposed_s=out["exposed_s"]
        )
    else:
        h = s.local_steps if s.workload == "diloco" else 1
        cfg2 = RoundConfig(
            params=s.params, compute_s=s.compute_s, rounds=s.rounds, local_steps=h, seed=s.seed,
            allreduce="ring" if s.workload == "sync" else "hierarchical",
        )  # fmt: skip
        out = simulate(topo, cfg2).summary()
        steps = s.rounds * h
        row["local_steps"] = h
    row.update(
        modelled_s=out["modelled_s"],
        s_per_step=out["modelled_s"] / steps,
        intra_bytes_per_step=out["intra_region_bytes"] / steps,
        inter_bytes_per_step=out["inter_region_bytes"] / steps,
        **{f"idle_{k}": v for k, v in out["idle_fraction_by_tier"].items()},
        wall_s=time.perf_counter() - t0,
    )
    return row


def sweep(
    scenarios: list[Scenario],
    *,
    use_ray: bool,
    timeout_s: float = 3600.0,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every scenario's row, in the order given. ``use_ray``: one task per scenario on the connected
    cluster (each waits at most ``timeout_s`` in all; a task's exception fails the sweep with its
    traceback); else in this process."""
    problems = [f"{s}: {p}" for s in scenarios for p in s.problems()]
    if problems:
        raise SimError("sweep: " + "; ".join(problems))
    if not use_ray:
        done_rows = []
        for i, s in enumerate(scenarios, 1):
            done_rows.append(run_scenario(s))
            progress(f"  {i}/{len(scenarios)} {s.workload} {s.nodes} nodes: {done_rows[-1]['wall_s']:.1f} s")
        return done_rows
    import ray

    task = ray.remote(num_cpus=1, max_retries=0)(run_scenario)
    refs = {task.remote(s): i for i, s in enumerate(scenarios)}
    rows: list[dict[str, Any] | None] = [None] * len(scenarios)
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise SimError(
                f"sweep: {len(pending)} of {len(scenarios)} scenarios not done within {timeout_s:.0f} s"
            )
        done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 30.0))
        for ref in done:
            i = refs[ref]
            row = rows[i] = ray.get(ref)
            s = scenarios[i]
            progress(
                f"  {sum(r is not None for r in rows)}/{len(scenarios)} {s.workload} {s.nodes} nodes: "
                f"{row['wall_s']:.1f} s"
            )
    return [r for r in rows if r is not None]
