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

import contextlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from edgeray.errors import EdgerayError
from edgeray.topology import NODE_LABEL, REGION_LABEL, TIER_LABEL

DEFAULT_TIMEOUT_S = 60.0
RESERVE_TIMEOUT_S = 900.0
"""How long a run waits for the CPUs it declares while other work on the cluster holds them (with progress)."""
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


class Reservation:
    """CPUs held for one run's compute actors, all or nothing: a placement group with one bundle per actor
    slot, each bundle pinned by label to its node. Ray places a group atomically, so two runs that both need
    a node's last CPUs never each hold half of them (two `ray job submit` at once: the second waits for the
    first instead of both waiting forever). A slot whose actor died is free for its replacement. Closing it
    (or the driver's exit) ends every actor in it.

        with reserve([("campus-gw", 1), ("cloud-1", 1)], what="sync workers") as r:
            a = r.pin(Worker, 0).remote(...)        # 1 CPU on campus-gw
    """

    def __init__(self, pg: PlacementGroup, nodes: list[str], cpus: list[float]) -> None:
        self.pg, self.nodes, self.cpus = pg, nodes, cpus

    def slot(self, node: str, taken: Iterable[int] = ()) -> int:
        """The first slot on ``node`` not in ``taken``."""
        skip = set(taken)
        for i, n in enumerate(self.nodes):
            if n == node and i not in skip:
                return i
        raise PlacementError(f"no free slot on {node!r} in this reservation (slots: {self.nodes})")

    def pin(self, actor_class: Any, slot: int, **options: Any) -> Any:
        """``actor_class.options(...)`` for an actor in ``slot``: it declares the slot's CPUs."""
        return actor_class.options(
            num_cpus=self.cpus[slot],
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pg, placement_group_bundle_index=slot, placement_group_capture_child_tasks=False
            ),
            **options,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reserve(
    slots: Sequence[tuple[str, float]],
    *,
    what: str,
    timeout_s: float = RESERVE_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
) -> Reservation:
    """Reserve ``slots`` (node name, CPUs) for ``what`` (a run's actors), all or nothing; see
    :class:`Reservation`. A node that could never hold its slots is refused at once by name; while other
    work holds the CPUs this waits, saying so every 15 s, at most ``timeout_s``."""
    if not slots:
        raise PlacementError(f"{what}: nothing to reserve")
    need: dict[str, float] = {}
    for node, cpus in slots:
        if cpus <= 0:
            raise PlacementError(f"{what}: {node} slot asks for {cpus} CPUs; a compute actor needs > 0")
        need[node] = need.get(node, 0.0) + cpus
    nodes = live_nodes()
    for node, cpus in need.items():
        have = check_selector(selector(node=node), nodes=nodes)[0]["resources"].get("CPU", 0.0)
        if cpus > have:
            count = sum(1 for n, _ in slots if n == node)
            raise PlacementError(
                f"{what}: {count} actors need {cpus:g} CPUs on {node}, which offers {have:g} in all "
                "(its topology `cpus`); use fewer threads per actor (torch_threads) or fewer actors there"
            )
    pg = placement_group(
        [{"CPU": float(c)} for _, c in slots],
        strategy="PACK",
        name=f"edgeray:{what}",
        bundle_label_selector=[{NODE_LABEL: n} for n, _ in slots],
    )
    t0 = time.monotonic()
    chunk = min(1.0, timeout_s)  # a first short look, then a word every 15 s while queued
    while not pg.wait(timeout_seconds=chunk):
        waited = time.monotonic() - t0
        if waited >= timeout_s:
            remove_placement_group(pg)
            raise PlacementError(
                f"{what}: the CPUs it declares ({need}) were not free within {timeout_s:.0f} s; other "
                "work on the cluster holds them (`ray status`, `ray list placement-groups`)"
            )
        if progress is not None:
            progress(
                f"{what}: waiting for CPUs {need} held by other work on the cluster "
                f"({waited:.0f} of at most {timeout_s:.0f} s)"
            )
        chunk = min(15.0, max(0.1, timeout_s - waited))
    return Reservation(pg, [n for n, _ in slots], [float(c) for _, c in slots])
