"""Energy and cost of a run, from the topology's power and price fields.

    from edgeray.energy import account
    bill = account(topology, busy_s={"campus-gw": 3.0, ...}, wall_s={"campus-gw": 10.0, ...},
                   egress_bytes={"campus": 2e6, ...}, units={"step": 40})

The power model is the one the topology states per node: ``idle_w`` whenever the node is up and
``busy_w`` while it computes, linear in between, so a node up ``wall`` seconds of which ``busy`` computing
draws ``idle_w * (wall - busy) + busy_w * busy`` joules. Waiting on the network counts as idle. Busy time
is what the caller measured or modelled (a training step's modelled compute time; a request's engine
time), never more than the wall time.

Cost, per region's prices (edgeray.topology.TIER_COST, overridable per region and tier): each node's
hours times ``node_hour_usd``, its kWh times ``energy_usd_per_kwh``, and each GB (10^9 bytes) leaving a
region for another times that region's ``egress_usd_per_gb``. ``units`` turns totals into figures per
unit (per training step, per 1,000 requests, ...).

A served request costs its node's ``busy_w`` over its time on the engine, divided among the requests that
node's replica ran at once (``request_joules``).

A node with ``power.budget_wh`` (a battery) is over budget once its joules pass ``budget_wh * 3600``:
``over_budget`` names them, and ``budget_exhausted_at`` gives the busy seconds at which a node running
flat out from now would cross it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeray.topology import Node, Topology

J_PER_WH = 3600.0
J_PER_KWH = 3.6e6
BYTES_PER_GB = 1e9


def node_joules(node: Node, busy_s: float, wall_s: float) -> float:
    """Energy of ``node`` over ``wall_s`` seconds up, ``busy_s`` of them computing (clipped to the wall)."""
    wall = max(0.0, float(wall_s))
    busy = min(max(0.0, float(busy_s)), wall)
    return node.power.idle_w * (wall - busy) + node.power.busy_w * busy


def request_joules(node: Node, engine_s: float, sharing: int) -> float:
    """Energy of one served request: its node's ``busy_w`` for the seconds the request spent on the engine,
    shared equally among the ``sharing`` requests the replica ran at that moment (itself included). The
    node's idle draw is the fleet's standing cost, not any one request's."""
    return node.power.busy_w * max(0.0, float(engine_s)) / max(1, int(sharing))


def over_budget(topology: Topology, joules: Mapping[str, float]) -> list[str]:
    """The nodes whose energy so far exceeds their ``budget_wh``."""
    return sorted(
        name
        for name, j in joules.items()
        if (budget := topology.nodes[name].power.budget_wh) is not None and j > budget * J_PER_WH
    )


def budget_left_j(node: Node, joules: float) -> float | None:
    """Joules ``node`` may still draw (None: no budget)."""
    if node.power.budget_wh is None:
        return None
    return node.power.budget_wh * J_PER_WH - joules


def account(
    topology: Topology,
    *,
    busy_s: Mapping[str, float],
    wall_s: Mapping[str, float] | float,
    egress_bytes: Mapping[str, float] | None = None,
    units: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Joules and dollars of the nodes in ``busy_s``: totals, by tier and by node, and per unit.

    ``wall_s`` is each node's time up (one number: the same for all); ``egress_bytes`` maps a region to the
    bytes that left it for other regions; ``units`` maps a unit name to how many of it the run made
    (``{"step": 40}`` gives ``per_step``; ``{"1k_requests": n / 1000}`` gives ``per_1k_requests``)."""
    by_node: dict[str, dict[str, float]] = {}
    for name, busy in busy_s.items():
        node = topology.nodes[name]
        wall = float(wall_s if isinstance(wall_s, int | float) else wall_s[name])
        joules = node_joules(node, busy, wall)
        price = topology.regions[node.region].cost
        by_node[name] = {
            "busy_s": min(max(0.0, float(busy)), wall),
            "wall_s": wall,
            "joules": joules,
            "hardware_usd": price.node_hour_usd * wall / 3600.0,
            "energy_usd": price.energy_usd_per_kwh * joules / J_PER_KWH,
        }
    egress = {r: float(b) for r, b in (egress_bytes or {}).items() if b}
    egress_usd = {r: topology.regions[r].cost.egress_usd_per_gb * b / BYTES_PER_GB for r, b in egress.items()}
    by_tier: dict[str, dict[str, float]] = {}
    for name, row in by_node.items():
        tier = topology.nodes[name].tier.value
        t = by_tier.setdefault(
            tier, {"joules": 0.0, "hardware_usd": 0.0, "energy_usd": 0.0, "egress_usd": 0.0}
        )
        for k in ("joules", "hardware_usd", "energy_usd"):
            t[k] += row[k]
    for region, paid in egress_usd.items():
        tier = topology.regions[region].tier.value
        by_tier.setdefault(tier, {"joules": 0.0, "hardware_usd": 0.0, "energy_usd": 0.0, "egress_usd": 0.0})
        by_tier[tier]["egress_usd"] += paid
    for t in by_tier.values():
        t["usd"] = t["hardware_usd"] + t["energy_usd"] + t["egress_usd"]
    joules = sum(r["joules"] for r in by_node.values())
    usd: dict[str, float] = {
        "hardware": sum(r["hardware_usd"] for r in by_node.values()),
        "energy": sum(r["energy_usd"] for r in by_node.values()),
        "egress": sum(egress_usd.values()),
    }
    usd["total"] = usd["hardware"] + usd["energy"] + usd["egress"]
    moved = sum(egress.values())
    out: dict[str, Any] = {
        "joules": joules,
        "wh": joules / J_PER_WH,
        "usd": usd,
        "by_tier": by_tier,
        "by_node": by_node,
        "egress_bytes": egress,
        "usd_per_gb_inter_region": usd["egress"] / (moved / BYTES_PER_GB) if moved else 0.0,
        "over_budget": over_budget(topology, {n: r["joules"] for n, r in by_node.items()}),
        "model": "idle_w when up, busy_w while computing; prices per region (edgeray.energy)",
    }
    for unit, count in (units or {}).items():
        if count > 0:
            out[f"per_{unit}"] = {"joules": joules / count, "usd": usd["total"] / count}
    return out


def egress_by_region(topology: Topology, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Bytes each region sent to other regions, from fabric ledger rows (``src``, ``dst`` nodes, ``bytes``)."""
    out: dict[str, float] = {}
    for row in rows:
        src, dst = topology.nodes.get(row.get("src", "")), topology.nodes.get(row.get("dst", ""))
        if src is not None and dst is not None and src.region != dst.region:
            out[src.region] = out.get(src.region, 0.0) + float(row["bytes"])
    return out
