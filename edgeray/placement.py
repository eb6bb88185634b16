"""Pin actors and placement groups to a region, tier or node through Ray label selectors, safely.

    from edgeray.placement import pin, region_placement_group
    stage = pin(Stage, region="metro").remote()              # lands on a node labelled edgeray.io/region=metro
    pg = region_placement_group("campus", [{"CPU": 1}] * 2, strategy="SPREAD", timeout_s=30)

Ray waits forever on a label selector no node satisfies (the actor or placement group just stays pending),
so every selector is checked against the live nodes' labels and resources first; the error lists what the
cluster does have. Every wait here is bounded and raises :class:`PlacementError` when it runs out.
Needs a connected driver (``ray.init``); nothing here starts processes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from edgeray.errors import EdgerayError
from edgeray.topology import NODE_LABEL, REGION_LABEL, TIER_LABEL

DEFAULT_TIMEOUT_S = 60.0
_IN_RE = re.compile(r"^(!?)in\((.*)\)$")


class PlacementError(EdgerayError):
    """A selector no live node satisfies, a demand no matching node can hold, or a wait that ran out."""


def selector(
    *, region: str | None = None, tier: str | None = None, node: str | None = None, **labels: str
) -> dict[str, str]:
    """A Ray label selector for a region, tier and/or node (plus raw ``labels``); values may use Ray's
    operators: ``"!v"``, ``"in(a,b)"``, ``"!in(a,b)"``."""
    sel = dict(labels)
    for key, value in ((REGION_LABEL, region), (TIER_LABEL, tier), (NODE_LABEL, node)):
        if value is not None:
            sel[key] = value
    if not sel:
        raise PlacementError("an empty selector pins nothing: give region=, tier=, node= or labels")
    return sel


def matches(sel: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether node ``labels`` satisfy selector ``sel`` (Ray's semantics: equality, ``!``, ``in()``)."""
    for key, expr in sel.items():
        have = labels.get(key)
        m = _IN_RE.match(expr)
        if m:
            options = {v.strip() for v in m.group(2).split(",")}
            ok = have in options
            if m.group(1):
                ok = not ok
        elif expr.startswith("!"):
            ok = have != expr[1:]
        else:
            ok = have == expr
        if not ok:
            return False
    return True


def live_nodes() -> list[dict[str, Any]]:
    """Alive nodes of the connected cluster: ``{node_id, labels, resources}``."""
    return [
        {
            "node_id": n["NodeID"],
            "labels": dict(n.get("Labels", {})),
            "resources": dict(n.get("Resources", {})),
        }
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check_selector(
    sel: Mapping[str, str],
    *,
    demand: Mapping[str, float] | None = None,
    nodes: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The live nodes that satisfy ``sel`` and (if given) could hold ``demand`` (e.g. ``{"CPU": 2}``).

    Raises :class:`PlacementError` naming the selector and listing the label values and capacities that
    exist, so the user can fix the request instead of watching it pend forever.
    """
    pool = [dict(n) for n in (nodes if nodes is not None else live_nodes())]
    matching = [n for n in pool if matches(sel, n["labels"])]
    if not matching:
        existing = {key: sorted({n["labels"][key] for n in pool if key in n["labels"]}) for key in sel}
        raise PlacementError(
            f"no live node matches label selector {dict(sel)}; values present on this cluster: {existing}"
        )
    if demand:
        fitting = [n for n in matching if all(n["resources"].get(r, 0.0) >= q for r, q in demand.items())]
        if not fitting:
            offers = {
                n["labels"].get(NODE_LABEL, n["node_id"][:8]): {r: n["resources"].get(r, 0.0) for r in demand}
                for n in matching
            }
            raise PlacementError(
                f"no node matching {dict(sel)} can hold {dict(demand)}; matching nodes offer {offers}"
            )
        return fitting
    return matching


def pin(
    actor_class: Any,
    *,
    region: str | None = None,
    tier: str | None = None,
    node: str | None = None,
    labels: Mapping[str, str] | None = None,
    **options: Any,
) -> Any:
    """``actor_class.options(label_selector=..., **options)`` after checking the selector and demand.

    ``actor_class`` is a ``@ray.remote`` class (or function). The CPU/memory demand checked is the one in
    ``options`` (``num_cpus``, ``memory``); Ray's own default for actors is 0 CPUs once placed.
    """
    sel = selector(region=region, tier=tier, node=node, **dict(labels or {}))
    demand = {}
    if options.get("num_cpus"):
        demand["CPU"] = float(options["num_cpus"])
    if options.get("memory"):
        demand["memory"] = float(options["memory"])
    check_selector(sel, demand=demand)
    return actor_class.options(label_selector=sel, **options)


def region_placement_group(
    region: str,
    bundles: Sequence[Mapping[str, float]],
    *,
    strategy: str = "PACK",
    name: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> PlacementGroup:
    """A placement group whose every bundle lands on nodes of ``region``; see :func:`placement_group_on`."""
    return placement_group_on(
        [selector(region=region)] * len(bundles), bundles, strategy=strategy, name=name, timeout_s=timeout_s
    )


def placement_group_on(
    selectors: Sequence[Mapping[str, str]],
    bundles: Sequence[Mapping[str, float]],
    *,
    strategy: str = "PACK",
    name: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> PlacementGroup:
    """Create a placement group with one label selector per bundle and wait (bounded) until it is ready.

    Each bundle is checked against the live nodes first. If the group is still not placed after
    ``timeout_s`` (e.g. STRICT_SPREAD over too few nodes, or capacity taken by other work) it is removed
    and :class:`PlacementError` says so. Never waits unbounded.
    """
    if len(selectors) != len(bundles):
        raise PlacementError(f"{len(bundles)} bundles but {len(selectors)} selectors; give one per bundle")
    if not bundles:
        raise PlacementError("a placement group needs at least one bundle")
    valid = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    if strategy not in valid:
        raise PlacementError(f"strategy {strategy!r} is not one of {valid}")
    nodes = live_nodes()
    for sel, bundle in zip(selectors, bundles, strict=True):
        check_selector(sel, demand=bundle, nodes=nodes)
    if strategy == "STRICT_SPREAD":
        candidates = {n["node_id"] for sel in selectors for n in check_selector(sel, nodes=nodes)}
        if len(candidates) < len(bundles):
            raise PlacementError(
                f"STRICT_SPREAD needs {len(bundles)} distinct nodes but only {len(candidates)} match the selectors"
            )
    pg = placement_group(
        [dict(b) for b in bundles],
        strategy=strategy,
        name=name,
        bundle_label_selector=[dict(s) for s in selectors],
    )
    if not pg.wait(timeout_seconds=timeout_s):
        remove_placement_group(pg)
        raise PlacementError(
            f"placement group {name or pg.id.hex()[:8]} ({strategy}, bundles {list(bundles)}, selectors "
            f"{list(selectors)}) was not placed within {timeout_s:.0f} s; the matching nodes are busy or "
            "too small for this strategy"
        )
    return pg


def wait_ready(actors: Iterable[Any], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Block until every actor has started, at most ``timeout_s``; :class:`PlacementError` otherwise."""
    actors = list(actors)
    refs = [a.__ray_ready__.remote() for a in actors]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise PlacementError(
            f"{len(pending)} of {len(refs)} actors did not start within {timeout_s:.0f} s "
            "(pending resources, or a crash in __init__: see `ray list actors`)"
        )
    ray.get(ready, timeout=timeout_s)  # surfaces an __init__ exception


def where() -> dict[str, str]:
    """Inside an actor or task: the edgeray labels of the node it runs on."""
    labels = ray.get_runtime_context().get_node_labels()
    return {k: str(v) for k, v in labels.items() if k.startswith("edgeray.io/")}
