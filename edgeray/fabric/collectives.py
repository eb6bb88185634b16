"""Topology-aware collectives over EdgeGroups: groups from the topology, hierarchical all-reduce, gossip.

    plan = GroupPlan.from_nodes(topology, ["campus-gw", "campus-jetson", ...])   # one worker per node
    # in each worker (see FabricWorker): join plan.memberships(node) in plan order, then
    flat_allreduce(t, plan)            # one ring over every worker
    hierarchical_allreduce(t, plan)    # reduce in region -> all-reduce among leaders -> broadcast in region
    gossip_average(t, plan, rounds=3)  # seeded random pairs average their tensors

Groups: ``global`` (all workers, ordered by region then node), ``region/<name>`` (the workers of a region;
rank 0 is its leader) and ``leaders`` (rank 0 of every region). Every worker joins its groups in the same
global order, so rendezvous cannot deadlock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgeray.fabric.backend import EdgeGroup
from edgeray.fabric.codecs import Codec
from edgeray.fabric.groups import Membership
from edgeray.fabric.groups import join as join_memberships
from edgeray.topology import Topology

GLOBAL, LEADERS = "global", "leaders"


@dataclass(frozen=True)
class GroupPlan:
    """Which groups exist and each worker's rank in them; ``prefix`` keeps plans of different runs apart."""

    nodes: tuple[str, ...]
    """Worker nodes in global rank order (region by region, as in the topology)."""
    regions: dict[str, tuple[str, ...]]
    prefix: str = ""

    @classmethod
    def from_nodes(
        cls, topology: Topology, nodes: list[str], *, prefix: str = "", region_ordered: bool = True
    ) -> GroupPlan:
        """A plan for one worker on each of ``nodes`` (each must be a topology node, at most once).

        ``region_ordered`` ranks the global group region by region (a ring then crosses each region
        boundary once); ``False`` keeps the given order, as a topology-unaware launcher would.
        """
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"one worker per node: {nodes} repeats a node")
        order = (
            [n.name for n in topology.iter_nodes() if n.name in set(nodes)]
            if region_ordered
            else [n for n in nodes if n in topology.nodes]
        )
        missing = set(nodes) - set(order)
        if missing:
            raise ValueError(f"nodes {sorted(missing)} are not in topology {topology.name!r}")
        regions: dict[str, tuple[str, ...]] = {}
        for name in sorted(order, key=[n.name for n in topology.iter_nodes()].index):
            region = topology.nodes[name].region
            regions[region] = (*regions.get(region, ()), name)
        return cls(tuple(order), regions, prefix)

    def name(self, group: str) -> str:
        return f"{self.prefix}{group}"

    def region_of(self, node: str) -> str:
        return next(r for r, members in self.regions.items() if node in members)

    def leaders(self) -> tuple[str, ...]:
        return tuple(members[0] for members in self.regions.values())

    def memberships(self, node: str) -> list[Membership]:
        """The groups ``node`` joins, in the plan's global order (global, leaders, regions)."""
        out = [Membership(self.name(GLOBAL), len(self.nodes), self.nodes.index(node))]
        if len(self.regions) > 1 and node in self.leaders():
            out.append(Membership(self.name(LEADERS), len(self.regions), self.leaders().index(node)))
        region = self.region_of(node)
        members = self.regions[region]
        out.append(Membership(self.name(f"region/{region}"), len(members), members.index(node)))
        return out


def join(plan: GroupPlan, node: str) -> list[str]:
    """Join every group of ``plan`` that ``node`` belongs to (call inside the worker); returns their names."""
    return join_memberships(plan.memberships(node))


def flat_allreduce(
    tensor: torch.Tensor, plan: GroupPlan, codec: Codec | str = "none", key: str = ""
) -> torch.Tensor:
    """Ring all-reduce (sum) over every worker, ignoring regions."""
    return EdgeGroup.get(plan.name(GLOBAL)).ring_allreduce(tensor, codec, key)


def hierarchical_allreduce(
    tensor: torch.Tensor,
    plan: GroupPlan,
    node: str,
    codec: Codec | str = "none",
    key: str = "",
    after_phase: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """Sum over every worker: reduce to each region's leader, ring all-reduce among leaders (``codec``
    applies on these inter-region hops), broadcast from the leader inside each region. ``after_phase`` is
    called with "reduce", "ring" and "broadcast" as each ends here (the calibration reads the clock then)."""
    mark = after_phase or (lambda _: None)
    region = EdgeGroup.get(plan.name(f"region/{plan.region_of(node)}"))
    region.reduce_to(tensor, root=0)
    mark("reduce")
    if region.rank == 0 and len(plan.regions) > 1:
        EdgeGroup.get(plan.name(LEADERS)).ring_allreduce(tensor, codec, key)
    mark("ring")
    region.broadcast_from(tensor, root=0)
    mark("broadcast")
    return tensor


def gossip_matching(world_size: int, seed: int, round_: int) -> list[int]:
    """Peer of each rank in one gossip round (itself when left out); every rank computes the same matching."""
    ranks = list(range(world_size))
    random.Random(f"{seed}/{round_}").shuffle(ranks)
    peer = list(range(world_size))
    for a, b in zip(ranks[0::2], ranks[1::2], strict=False):
        peer[a], peer[b] = b, a
    return peer


def gossip_average(tensor: torch.Tensor, plan: GroupPlan, *, rounds: int = 1, seed: int = 0) -> torch.Tensor:
    """``rounds`` of pairwise averaging with seeded random peers over the global group (in place).

    Each round every paired worker swaps tensors with its peer and both keep the mean, so the global mean
    is preserved and the spread shrinks; an odd worker out keeps its tensor for that round.
    """
    group = EdgeGroup.get(plan.name(GLOBAL))
    for r in range(rounds):
        matching = gossip_matching(group.world_size, seed, r)
        peer = matching[group.rank]
        if peer != group.rank:
            flows = [(group.nodes[a], group.nodes[b]) for a, b in enumerate(matching) if a != b]
            other = group.pair_exchange(tensor, peer, flows=flows)
            tensor.add_(other).mul_(0.5)
    return tensor
