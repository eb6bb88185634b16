"""Where experts go: spread over regions, nearest to the trunk first, standbys in other regions."""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.topology import Topology
from edgeray.train.moe.config import MoEError


# ---------------------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class ExpertPlan:
    trunk: str
    nodes: tuple[str, ...]
    """Node of each expert index."""
    distance: tuple[float, ...]
    """Each expert's latency from the trunk, normalised to the farthest (0 = on the trunk's node)."""
    regions: tuple[str, ...]
    standbys: tuple[tuple[str, ...], ...] = ()
    """Each expert's standby replicas' nodes (empty: one actor per expert)."""

    def replica_nodes(self, expert: int) -> tuple[str, ...]:
        """Nodes of the expert's actors, the serving one first."""
        return (self.nodes[expert], *(self.standbys[expert] if self.standbys else ()))

    def table(self) -> str:
        lines = [f"trunk on {self.trunk}", "expert  node             region    distance  standbys"]
        for e, (n, d, r) in enumerate(zip(self.nodes, self.distance, self.regions, strict=True)):
            lines.append(f"{e:>6}  {n:<16} {r:<9} {d:8.2f}  {', '.join(self.replica_nodes(e)[1:])}")
        return "\n".join(lines)


def plan_experts(
    topology: Topology,
    experts: int,
    trunk: str,
    nodes: list[str] | None = None,
    replicas: int = 1,
    threads: int = 1,
) -> ExpertPlan:
    """Spread ``experts`` over the regions (nearest the trunk first), round-robin over each region's nodes
    (more experts than nodes put several on one node). With ``replicas`` > 1, each expert's standbys go to
    other nodes, other regions first (the next regions in the same order). Every actor (the trunk too)
    computes with ``threads`` CPUs: a node holds at most its topology ``cpus`` // ``threads`` of them, and a
    full node is passed over."""
    if trunk not in topology.nodes:
        raise MoEError(
            f"trunk node {trunk!r} is not in topology {topology.name!r}; nodes are {sorted(topology.nodes)}"
        )
    pool = list(nodes or topology.nodes)
    unknown = [n for n in pool if n not in topology.nodes]
    if unknown:
        raise MoEError(
            f"expert nodes {unknown} are not in topology {topology.name!r}; nodes are {sorted(topology.nodes)}"
        )
    by_region: dict[str, list[str]] = {}
    for n in topology.iter_nodes():
        if n.name in pool:
            by_region.setdefault(n.region, []).append(n.name)
    order = sorted(by_region, key=lambda r: min(topology.path_latency_ms(trunk, n) for n in by_region[r]))
    for r in order:  # the trunk's own node first inside its region
        by_region[r].sort(key=lambda n: (topology.path_latency_ms(trunk, n), n != trunk))
    free = {n: topology.nodes[n].cpus // threads for n in topology.nodes}  # actor slots left per node
    free[trunk] -= 1
    if free[trunk] < 0:
        raise MoEError(
            f"trunk node {trunk!r} has {topology.nodes[trunk].cpus} CPUs, fewer than threads = {threads}"
        )

    def full() -> MoEError:
        return MoEError(
            f"{experts} experts x {replicas} replicas with {threads} CPU(s) each do not fit the CPUs of "
            f"{sorted(pool)} (topology `cpus`, the trunk's node holding the trunk too); use fewer experts, "
            "replicas or threads, or more nodes"
        )

    # round-robin: one expert per region in turn, cycling through each region's nodes that have room
    cursor = dict.fromkeys(order, 0)
    placed: list[str] = []
    while len(placed) < experts:
        before = len(placed)
        for r in order:
            if len(placed) == experts:
                break
            ring = by_region[r]
            for k in range(len(ring)):
                host = ring[(cursor[r] + k) % len(ring)]
                if free[host] > 0:
                    placed.append(host)
                    free[host] -= 1
                    cursor[r] += k + 1
                    break
        if len(placed) == before:
            raise full()
    latency = [topology.path_latency_ms(trunk, n) if n != trunk else 0.0 for n in placed]
    far = max(latency) or 1.0
    standbys: list[tuple[str, ...]] = []
    if replicas > 1:
        everyone = [n for r in order for n in by_region[r]]
        if len(everyone) < replicas:
            raise MoEError(
                f"replicas = {replicas}: each expert needs that many distinct nodes, but only {len(everyone)} "
                f"may host experts ({everyone})"
            )
        for e, node in enumerate(placed):
            home = order.index(topology.nodes[node].region)
            rotated = order[home + 1 :] + order[: home + 1]
            candidates = []  # other regions first, each region's nodes rotated so experts spread out
            for r in rotated:
                k = e % len(by_region[r])
                candidates += by_region[r][k:] + by_region[r][:k]
            chosen: list[str] = []
            for cand in candidates:
                if cand != node and cand not in chosen and free[cand] > 0:
                    chosen.append(cand)
                    free[cand] -= 1
                if len(chosen) == replicas - 1:
                    break
            if len(chosen) < replicas - 1:
                raise full()
            standbys.append(tuple(chosen))
    return ExpertPlan(
        trunk,
        tuple(placed),
        tuple(lat / far for lat in latency),
        tuple(topology.nodes[n].region for n in placed),
        tuple(standbys),
    )
