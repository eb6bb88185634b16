"""Topology as code: the edge fleet (regions, tiers, nodes, links, churn) that every part of edgeray reads.

    edgeray validate clusters/local.yaml

A topology file is YAML::

    name: local
    regions:
      - name: metro
        tier: regional                 # device | micro | regional | cloud
        intra_link: {latency_ms: 0.5}  # optional; the rest comes from the tier's defaults
        nodes:
          - {name: mec-1, cpus: 2, memory_gb: 4, accelerator: none,
             power: {idle_w: 60, busy_w: 180}, churn: {availability: 0.999, mtbf_s: 86400}}
    links:                             # inter-region links; star, mesh and tree are all lists of pairs
      - {between: [metro, cloud], latency_ms: 12, jitter_ms: 1, bandwidth_mbps: 1000, loss: 0.0001}

Units: latency and jitter in milliseconds (one way), bandwidth in Mbit/s, loss as a probability per packet,
memory in GiB, power in watts, energy in watt-hours, MTBF in seconds.

Regions that share no direct link talk over the lowest-latency chain of links (a star's spokes through the
hub, a tree's leaves through their ancestors). A path's latency is the sum of its hops, its bandwidth the
narrowest hop, its loss ``1 - prod(1 - loss)`` and its jitter the root-sum-square of the hops' jitter.

Everything a user can get wrong is reported as a :class:`TopologyError` naming the file, the field path
(``regions[1].nodes[0].cpus``), the bad value and what is valid. Nothing here talks to Ray.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgeray.errors import EdgerayError

LABEL_PREFIX = "edgeray.io/"
REGION_LABEL = LABEL_PREFIX + "region"
TIER_LABEL = LABEL_PREFIX + "tier"
NODE_LABEL = LABEL_PREFIX + "node"
ACCELERATOR_LABEL = LABEL_PREFIX + "accelerator"

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NAME_RULE = "lowercase letters, digits and '-', 1-63 characters, starting and ending with a letter or digit"


class TopologyError(EdgerayError):
    """A topology document that cannot be used; the message names file, field path, value and what is valid."""


class Tier(str, Enum):
    """Edge tiers, from the data source outwards."""

    DEVICE = "device"
    MICRO = "micro"
    REGIONAL = "regional"
    CLOUD = "cloud"


class LinkClass(str, Enum):
    """Where two endpoints sit relative to each other; the fabric's ledger accounts per class."""

    INTRA_NODE = "intra-node"
    INTRA_REGION = "intra-region"
    INTER_REGION = "inter-region"


# --------------------------------------------------------------------------------------------- YAML models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"must be {_NAME_RULE}")
    return value


Name = Annotated[str, Field(min_length=1, max_length=63)]
NonNegMs = Annotated[float, Field(ge=0, le=60_000, allow_inf_nan=False)]


class LinkSpec(_Strict):
    """Partial link parameters as written in YAML; missing fields come from the tier defaults."""

    latency_ms: NonNegMs | None = None
    """One-way propagation + queueing latency, milliseconds."""
    jitter_ms: NonNegMs | None = None
    """Standard deviation of the one-way latency, milliseconds."""
    bandwidth_mbps: Annotated[float, Field(gt=0, le=1e7, allow_inf_nan=False)] | None = None
    """Link capacity, megabits per second."""
    loss: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None
    """Probability that a packet is lost (and retransmitted)."""


class InterRegionLinkSpec(LinkSpec):
    """An inter-region link: a pair of region names plus partial link parameters."""

    between: Annotated[list[Name], Field(min_length=2, max_length=2)]
    """The two regions the link joins (undirected)."""


class PowerSpec(_Strict):
    idle_w: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] = 0.0
    """Draw when idle, watts."""
    busy_w: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] = 0.0
    """Draw at full load, watts."""
    budget_wh: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Energy budget (e.g. a battery), watt-hours; None = mains powered."""


class CostSpec(_Strict):
    """What a region's nodes cost; unset fields come from ``defaults.cost`` for the tier, then
    :data:`TIER_COST`."""

    node_hour_usd: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)] | None = None
    """Price of one node for one hour (rented, or the hardware amortised), US dollars."""
    energy_usd_per_kwh: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    """Electricity the operator pays for, US dollars per kWh (0 where the hourly price includes it)."""
    egress_usd_per_gb: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    """Price of each GB (10^9 bytes) leaving the region for another region, US dollars."""


class ChurnSpec(_Strict):
    availability: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    """Long-run fraction of time the node is up."""
    mtbf_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Mean time between failures, seconds; None = never fails."""


class NodeSpec(_Strict):
    name: Name
    cpus: Annotated[int, Field(ge=1, le=1024)] = 1
    """Logical CPUs the node offers to Ray's scheduler."""
    memory_gb: Annotated[float, Field(gt=0, le=65536, allow_inf_nan=False)] = 1.0
    """Memory the node offers to Ray's scheduler, GiB."""
    accelerator: Annotated[str, Field(min_length=1, max_length=63)] = "none"
    """Accelerator kind, a label only (e.g. ``none``, ``jetson-orin``, ``nvidia-l4``)."""
    bandwidth_mbps: Annotated[float, Field(gt=0, le=1e7, allow_inf_nan=False)] | None = None
    """Access (uplink) bandwidth of the node, Mbit/s; caps every route that starts or ends here."""
    power: PowerSpec = PowerSpec()
    slowdown: Annotated[float, Field(ge=1, le=1000, allow_inf_nan=False)] = 1.0
    """Compute time of one training step here relative to a reference node (5 = a straggler, five times
    slower): what training strategies model each node's step time with."""
    churn: ChurnSpec | None = None
    """Defaults to the region's churn, then the document's ``defaults.churn``."""
    labels: dict[str, str] = {}
    """Extra Ray node labels (keys outside the ``edgeray.io/`` prefix)."""

    _name = field_validator("name")(_check_name)


class RegionSpec(_Strict):
    name: Name
    tier: Tier
    nodes: Annotated[list[NodeSpec], Field(min_length=1)]
    intra_link: LinkSpec = LinkSpec()
    """Node-to-node link inside the region; missing fields come from the tier defaults."""
    churn: ChurnSpec | None = None
    cost: CostSpec = CostSpec()
    """Prices for this region's nodes and its egress; missing fields come from the tier defaults."""
    location: tuple[float, float] | None = None
    """(latitude, longitude) in degrees, used only for drawing the fleet."""

    _name = field_validator("name")(_check_name)


class DefaultsSpec(_Strict):
    intra_link: dict[Tier, LinkSpec] = {}
    """Per-tier overrides of the built-in intra-region link defaults."""
    inter_link: LinkSpec = LinkSpec()
    """Overrides of the built-in inter-region link defaults (applied to every pair)."""
    churn: ChurnSpec = ChurnSpec()
    cost: dict[Tier, CostSpec] = {}
    """Per-tier overrides of the built-in prices (:data:`TIER_COST`)."""


class TopologySpec(_Strict):
    name: Name
    description: str = ""
    regions: Annotated[list[RegionSpec], Field(min_length=1)]
    links: list[InterRegionLinkSpec] = []
    defaults: DefaultsSpec = DefaultsSpec()
    source: str = ""
    """Where the link figures come from (a citation), shown by ``edgeray validate``."""

    _name = field_validator("name")(_check_name)


# --------------------------------------------------------------------------------------------- resolved objects
@dataclass(frozen=True)
class Link:
    """Resolved link parameters (all fields set). Units: ms, ms, Mbit/s, probability."""

    latency_ms: float
    jitter_ms: float
    bandwidth_mbps: float
    loss: float

    def merged(self, spec: LinkSpec) -> Link:
        """This link with every field that ``spec`` sets replaced."""
        return Link(
            latency_ms=self.latency_ms if spec.latency_ms is None else spec.latency_ms,
            jitter_ms=self.jitter_ms if spec.jitter_ms is None else spec.jitter_ms,
            bandwidth_mbps=self.bandwidth_mbps if spec.bandwidth_mbps is None else spec.bandwidth_mbps,
            loss=self.loss if spec.loss is None else spec.loss,
        )

    @staticmethod
    def chain(hops: list[Link]) -> Link:
        """The end-to-end link of consecutive hops (sum latency, narrowest bandwidth, compound loss)."""
        if not hops:
            return INTRA_NODE_LINK
        survive = math.prod(1.0 - h.loss for h in hops)
        return Link(
            latency_ms=sum(h.latency_ms for h in hops),
            jitter_ms=math.sqrt(sum(h.jitter_ms**2 for h in hops)),
            bandwidth_mbps=min(h.bandwidth_mbps for h in hops),
            loss=1.0 - survive,
        )


# Shared memory on one host: effectively free next to any network hop.
INTRA_NODE_LINK = Link(latency_ms=0.005, jitter_ms=0.0, bandwidth_mbps=100_000.0, loss=0.0)

# Node-to-node inside a region, by tier: device = Wi-Fi/5G between handsets, micro = a site LAN,
# regional = a MEC/PoP data-centre fabric, cloud = a cloud availability zone.
TIER_INTRA_LINK: Mapping[Tier, Link] = {
    Tier.DEVICE: Link(latency_ms=5.0, jitter_ms=2.0, bandwidth_mbps=50.0, loss=0.01),
    Tier.MICRO: Link(latency_ms=1.0, jitter_ms=0.3, bandwidth_mbps=1_000.0, loss=0.001),
    Tier.REGIONAL: Link(latency_ms=0.3, jitter_ms=0.05, bandwidth_mbps=10_000.0, loss=0.0),
    Tier.CLOUD: Link(latency_ms=0.2, jitter_ms=0.03, bandwidth_mbps=25_000.0, loss=0.0),
}

# Between regions, by the slower tier of the two ends (the access network dominates).
TIER_INTER_LINK: Mapping[Tier, Link] = {
    Tier.DEVICE: Link(latency_ms=20.0, jitter_ms=5.0, bandwidth_mbps=20.0, loss=0.01),
    Tier.MICRO: Link(latency_ms=8.0, jitter_ms=1.5, bandwidth_mbps=200.0, loss=0.001),
    Tier.REGIONAL: Link(latency_ms=15.0, jitter_ms=1.0, bandwidth_mbps=1_000.0, loss=0.0001),
    Tier.CLOUD: Link(latency_ms=30.0, jitter_ms=2.0, bandwidth_mbps=10_000.0, loss=0.0001),
}
_TIER_ORDER = [Tier.DEVICE, Tier.MICRO, Tier.REGIONAL, Tier.CLOUD]


@dataclass(frozen=True)
class Node:
    """A topology node: one Ray raylet (locally) or one machine (in a real deployment)."""

    name: str
    region: str
    tier: Tier
    cpus: int
    memory_gb: float
    accelerator: str
    bandwidth_mbps: float | None
    power: PowerSpec
    churn: ChurnSpec
    extra_labels: Mapping[str, str]
    slowdown: float = 1.0

    @property
    def labels(self) -> dict[str, str]:
        """The Ray node labels this node carries."""
        return {
            **self.extra_labels,
            REGION_LABEL: self.region,
            TIER_LABEL: self.tier.value,
            NODE_LABEL: self.name,
            ACCELERATOR_LABEL: self.accelerator,
        }


@dataclass(frozen=True)
class Cost:
    """Resolved prices of one region (all fields set): US dollars per node-hour, per kWh, per GB egress."""

    node_hour_usd: float
    energy_usd_per_kwh: float
    egress_usd_per_gb: float

    def merged(self, spec: CostSpec) -> Cost:
        """These prices with every field that ``spec`` sets replaced."""
        return Cost(
            **{k: getattr(self, k) if getattr(spec, k) is None else getattr(spec, k) for k in _COST_FIELDS}
        )


_COST_FIELDS = ("node_hour_usd", "energy_usd_per_kwh", "egress_usd_per_gb")

# Prices by tier, stated assumptions to override per region (``cost:``) or per tier (``defaults.cost``):
# devices are owned (no hourly price, no egress fee) and pay household electricity; a micro site pays a
# small amortised hardware share and commercial electricity; a regional MEC/PoP node rents by the hour
# and pays metro transit; a cloud GPU instance's hourly price includes its power, and internet egress is
# charged per GB (the order of public cloud list prices).
TIER_COST: Mapping[Tier, Cost] = {
    Tier.DEVICE: Cost(node_hour_usd=0.0, energy_usd_per_kwh=0.30, egress_usd_per_gb=0.0),
    Tier.MICRO: Cost(node_hour_usd=0.02, energy_usd_per_kwh=0.20, egress_usd_per_gb=0.0),
    Tier.REGIONAL: Cost(node_hour_usd=0.30, energy_usd_per_kwh=0.15, egress_usd_per_gb=0.02),
    Tier.CLOUD: Cost(node_hour_usd=1.20, energy_usd_per_kwh=0.0, egress_usd_per_gb=0.09),
}


@dataclass(frozen=True)
class Region:
    name: str
    tier: Tier
    nodes: tuple[Node, ...]
    intra_link: Link
    location: tuple[float, float] | None
    cost: Cost


@dataclass(frozen=True)
class Route:
    """How one endpoint reaches another: the link class, the regions crossed and the end-to-end link."""

    link_class: LinkClass
    regions: tuple[str, ...]
    link: Link

    @property
    def latency_ms(self) -> float:
        return self.link.latency_ms


class Topology:
    """A validated edge fleet. Build with :func:`load_topology` or :meth:`from_dict`; immutable."""

    def __init__(self, spec: TopologySpec, *, path: str | None = None) -> None:
        self.spec = spec
        self.path = path
        self.name = spec.name
        self.description = spec.description
        self.source = spec.source
        default_churn = spec.defaults.churn
        regions: dict[str, Region] = {}
        for r in spec.regions:
            base = TIER_INTRA_LINK[r.tier].merged(spec.defaults.intra_link.get(r.tier, LinkSpec()))
            nodes = tuple(
                Node(
                    name=n.name,
                    region=r.name,
                    tier=r.tier,
                    cpus=n.cpus,
                    memory_gb=n.memory_gb,
                    accelerator=n.accelerator,
                    bandwidth_mbps=n.bandwidth_mbps,
                    power=n.power,
                    churn=n.churn or r.churn or default_churn,
                    extra_labels=dict(n.labels),
                    slowdown=n.slowdown,
                )
                for n in r.nodes
            )
            cost = TIER_COST[r.tier].merged(spec.defaults.cost.get(r.tier, CostSpec())).merged(r.cost)
            regions[r.name] = Region(r.name, r.tier, nodes, base.merged(r.intra_link), r.location, cost)
        self.regions: dict[str, Region] = regions
        self.nodes: dict[str, Node] = {n.name: n for r in regions.values() for n in r.nodes}
        self.inter_links: dict[frozenset[str], Link] = {}
        for spec_link in spec.links:
            a, b = spec_link.between
            slower = min(regions[a].tier, regions[b].tier, key=_TIER_ORDER.index)
            base = TIER_INTER_LINK[slower].merged(spec.defaults.inter_link)
            self.inter_links[frozenset((a, b))] = base.merged(spec_link)
        self._routes = {r: self._shortest_paths(r) for r in regions}

    def digest(self) -> str:
        """SHA-256 of the validated document: equal for the same fleet wherever its file lies (a resumed
        run checks it)."""
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, doc: Any, *, path: str | None = None, text: str | None = None) -> Topology:
        """Validate a parsed document; raises :class:`TopologyError` naming ``path`` and the field."""
        return _build(doc, path=path or "<topology>", text=text)

    # ------------------------------------------------------------------ queries
    def node(self, name: str) -> Node:
        """The node called ``name``; :class:`TopologyError` lists the valid names otherwise."""
        try:
            return self.nodes[name]
        except KeyError:
            raise TopologyError(
                f"{self._where()}: no node {name!r}; nodes are {sorted(self.nodes)}"
            ) from None

    def region(self, name: str) -> Region:
        """The region called ``name``; :class:`TopologyError` lists the valid names otherwise."""
        try:
            return self.regions[name]
        except KeyError:
            raise TopologyError(
                f"{self._where()}: no region {name!r}; regions are {sorted(self.regions)}"
            ) from None

    def iter_nodes(self) -> Iterator[Node]:
        for region in self.regions.values():
            yield from region.nodes

    def route(self, src: str, dst: str) -> Route:
        """The route between two nodes (or two regions, or a node and a region).

        Node to itself: intra-node. Two nodes of one region (or a region to itself): the region's intra
        link. Otherwise the lowest-latency chain of inter-region links. A node's ``bandwidth_mbps`` caps
        every route that starts or ends at it.
        """
        src_region, src_node = self._resolve(src)
        dst_region, dst_node = self._resolve(dst)
        if src_node is not None and src_node == dst_node:
            return Route(LinkClass.INTRA_NODE, (src_region,), INTRA_NODE_LINK)
        if src_region == dst_region:  # two nodes of a region, or a region to itself / one of its nodes
            route = Route(LinkClass.INTRA_REGION, (src_region,), self.regions[src_region].intra_link)
        else:
            hops = self._routes[src_region][dst_region]
            links = [self.inter_links[frozenset(pair)] for pair in itertools.pairwise(hops)]
            route = Route(LinkClass.INTER_REGION, tuple(hops), Link.chain(links))
        caps = [self.nodes[n].bandwidth_mbps for n in (src_node, dst_node) if n is not None]
        cap = min((c for c in caps if c is not None), default=None)
        if cap is not None and cap < route.link.bandwidth_mbps:
            route = Route(route.link_class, route.regions, replace(route.link, bandwidth_mbps=cap))
        return route

    def link(self, src: str, dst: str) -> Link:
        """End-to-end link parameters between two nodes or regions."""
        return self.route(src, dst).link

    def path_latency_ms(self, src: str, dst: str) -> float:
        """One-way latency from ``src`` to ``dst`` (nodes or regions), milliseconds."""
        return self.route(src, dst).latency_ms

    def nearest_regions(self, origin: str) -> list[tuple[str, float]]:
        """Every region as ``(name, one-way latency ms)`` from a node or region, nearest first."""
        origin_region, _ = self._resolve(origin)
        order = [(r, self.path_latency_ms(origin_region, r)) for r in self.regions]
        return sorted(order, key=lambda item: (item[1], item[0]))

    def labels(self) -> dict[str, dict[str, str]]:
        """Node name -> the Ray labels it must carry."""
        return {n.name: n.labels for n in self.iter_nodes()}

    def shape(self) -> str:
        """``single``, ``mesh`` (every pair linked), ``star`` (one hub), ``tree`` (connected, acyclic) or ``graph``."""
        n, edges = len(self.regions), len(self.inter_links)
        if n == 1:
            return "single"
        if edges == n * (n - 1) // 2 and n > 2:
            return "mesh"
        if edges == n - 1:
            degree = {r: 0 for r in self.regions}
            for pair in self.inter_links:
                for r in pair:
                    degree[r] += 1
            return "star" if max(degree.values()) == n - 1 and n > 2 else "tree"
        return "graph"

    # ------------------------------------------------------------------ internals
    def _where(self) -> str:
        return self.path or f"topology {self.name!r}"

    def _resolve(self, name: str) -> tuple[str, str | None]:
        if name in self.nodes:
            return self.nodes[name].region, name
        if name in self.regions:
            return name, None
        raise TopologyError(
            f"{self._where()}: {name!r} is neither a node nor a region; "
            f"nodes are {sorted(self.nodes)}, regions are {sorted(self.regions)}"
        )

    def _shortest_paths(self, src: str) -> dict[str, list[str]]:
        """Dijkstra over inter-region links weighted by latency; ties broken by name for determinism."""
        adjacency: dict[str, list[tuple[str, float]]] = {r: [] for r in self.regions}
        for pair, link in self.inter_links.items():
            a, b = sorted(pair)
            adjacency[a].append((b, link.latency_ms))
            adjacency[b].append((a, link.latency_ms))
        best: dict[str, tuple[float, list[str]]] = {}
        heap: list[tuple[float, list[str]]] = [(0.0, [src])]
        while heap:
            dist, path = heapq.heappop(heap)
            here = path[-1]
            if here in best:
                continue
            best[here] = (dist, path)
            for nxt, cost in sorted(adjacency[here]):
                if nxt not in best:
                    heapq.heappush(heap, (dist + cost, [*path, nxt]))
        return {r: p for r, (_, p) in best.items()}

    def __repr__(self) -> str:
        return (
            f"Topology({self.name!r}, regions={len(self.regions)}, nodes={len(self.nodes)}, {self.shape()})"
        )


# --------------------------------------------------------------------------------------------- loading
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
DEFAULT_PRESET = "local"


def preset_names() -> list[str]:
    """Names of the topology presets shipped with edgeray (edgeray/presets/*.yaml; clusters/ links to them)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_topology_path(name_or_path: str | Path | None) -> Path:
    """A topology file path from a path, or a preset name (``local``, ``metro-5g``, ``continental``).

    ``None`` gives the embedded default (``local``). Raises :class:`TopologyError` listing the presets
    when neither a file nor a preset of that name exists.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_PRESET
    p = Path(name_or_path)
    if p.exists():
        return p
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if "/" not in str(name_or_path) and preset.exists():
        return preset.resolve()
    raise TopologyError(
        f"{name_or_path}: no such topology file, and no preset of that name; presets are {preset_names()}"
    )


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology YAML file; raises :class:`TopologyError` (never a bare traceback)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(f"{p}: no such topology file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{p}: cannot read: {exc}") from None
    return loads_topology(text, path=str(p))


def loads_topology(text: str, *, path: str = "<string>") -> Topology:
    """Parse and validate topology YAML text; ``path`` names it in errors."""
    doc = _parse_yaml(text, path)
    return _build(doc, path=path, text=text)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of silently keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable mapping key {key!r}", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, path: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = exc.problem or exc.context or "invalid YAML"
        raise TopologyError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: YAML error: {exc}") from None
    except RecursionError:
        raise TopologyError(f"{path}: YAML nested too deeply") from None


def _build(doc: Any, *, path: str, text: str | None) -> Topology:
    if doc is None:
        raise TopologyError(f"{path}: the document is empty; expected a mapping with 'name' and 'regions'")
    if not isinstance(doc, dict):
        raise TopologyError(
            f"{path}: the document is a {type(doc).__name__}, expected a mapping with 'name' and 'regions'"
        )
    try:
        spec = TopologySpec.model_validate(doc)
    except ValidationError as exc:
        raise TopologyError(_format_validation(exc, path, text)) from None
    except RecursionError:
        raise TopologyError(f"{path}: the document is nested too deeply") from None
    problems = list(_semantic_problems(spec))
    if problems:
        raise TopologyError(_format_problems(problems, path, text))
    return Topology(spec, path=path)


def _semantic_problems(spec: TopologySpec) -> Iterator[tuple[tuple[Any, ...], Any, str]]:
    """Cross-reference checks pydantic cannot express: (field path, value, what is valid)."""
    region_seen: dict[str, int] = {}
    node_seen: dict[str, tuple[int, int]] = {}
    for i, region in enumerate(spec.regions):
        if region.name in region_seen:
            yield (
                ("regions", i, "name"),
                region.name,
                f"duplicate region name (also regions[{region_seen[region.name]}]); names must be unique",
            )
        region_seen.setdefault(region.name, i)
        if region.location is not None:
            lat, lon = region.location
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                yield (
                    ("regions", i, "location"),
                    list(region.location),
                    "must be [latitude in -90..90, longitude in -180..180]",
                )
        for j, node in enumerate(region.nodes):
            if node.name in node_seen:
                first_region, first_node = node_seen[node.name]
                yield (
                    ("regions", i, "nodes", j, "name"),
                    node.name,
                    f"duplicate node name (also regions[{first_region}].nodes[{first_node}]); "
                    "node names must be unique fleet-wide",
                )
            node_seen.setdefault(node.name, (i, j))
            if node.power.busy_w < node.power.idle_w:
                yield (
                    ("regions", i, "nodes", j, "power", "busy_w"),
                    node.power.busy_w,
                    f"must be >= idle_w ({node.power.idle_w})",
                )
            for key in node.labels:
                if key.startswith(LABEL_PREFIX) or key.startswith("ray.io/"):
                    yield (
                        ("regions", i, "nodes", j, "labels", key),
                        key,
                        f"label keys starting with {LABEL_PREFIX!r} or 'ray.io/' are reserved",
                    )
                elif not re.match(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$", key):
                    yield (
                        ("regions", i, "nodes", j, "labels", key),
                        key,
                        "must be a Kubernetes-style label key: [prefix/]name, name of letters, digits, '-', '_', '.'",
                    )
    pairs: dict[frozenset[str], int] = {}
    for k, link in enumerate(spec.links):
        a, b = link.between
        for end, ref in enumerate((a, b)):
            if ref not in region_seen:
                yield (
                    ("links", k, "between", end),
                    ref,
                    f"unknown region; regions are {sorted(region_seen)}",
                )
        if a == b:
            yield (("links", k, "between"), [a, b], "a link joins two different regions")
        pair = frozenset((a, b))
        if pair in pairs and a != b:
            yield (("links", k, "between"), [a, b], f"duplicate link (also links[{pairs[pair]}])")
        pairs.setdefault(pair, k)
    if len(region_seen) > 1 and all(r in region_seen for p in pairs for r in p):
        unreachable = _unreachable(list(region_seen), list(pairs))
        if unreachable:
            yield (
                ("links",),
                sorted(unreachable),
                f"regions {sorted(unreachable)} cannot reach {spec.regions[0].name!r}; "
                "add links so that every region is connected (star, mesh or tree)",
            )


def _unreachable(regions: list[str], pairs: list[frozenset[str]]) -> set[str]:
    reached, frontier = {regions[0]}, [regions[0]]
    while frontier:
        here = frontier.pop()
        for pair in pairs:
            if here in pair:
                for other in pair - {here}:
                    if other not in reached:
                        reached.add(other)
                        frontier.append(other)
    return set(regions) - reached


# --------------------------------------------------------------------------------------------- error text
def field_path(loc: tuple[Any, ...]) -> str:
    """``('regions', 1, 'nodes', 0, 'cpus')`` -> ``regions[1].nodes[0].cpus``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<document>"


def _format_problems(problems: list[tuple[tuple[Any, ...], Any, str]], path: str, text: str | None) -> str:
    lines = [f"{path}: {len(problems)} problem(s) in the topology:"]
    for loc, value, rule in problems:
        lines.append(f"  {_line_ref(text, loc)}{field_path(loc)} = {_show(value)}: {rule}")
    return "\n".join(lines)


def _format_validation(exc: ValidationError, path: str, text: str | None) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p and p.endswith("]")))
        kind = err["type"]
        if kind == "extra_forbidden":
            valid = _valid_keys(loc[:-1])
            problems.append((loc, err["input"], f"unknown key; valid keys here are {valid}"))
        elif kind == "missing":
            problems.append((loc, "<missing>", "required field is missing"))
        elif kind == "enum":
            problems.append((loc, err["input"], f"must be one of {[t.value for t in Tier]}"))
        else:
            problems.append((loc, err["input"], _rule_text(err)))
    # Unions report each branch; keep the first message per field.
    unique: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any, str]] = {}
    for p in problems:
        unique.setdefault(p[0], p)
    return _format_problems(list(unique.values()), path, text)


def _rule_text(err: Any) -> str:
    msg = str(err["msg"])
    msg = msg.replace("Input should be", "must be").replace("Value error, ", "")
    if err["type"] in ("too_short", "too_long"):
        msg = msg.replace("List should have", "must have")
    return msg


def _valid_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that sits at ``loc`` (walking the spec classes)."""
    model: Any = TopologySpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) or value != "<missing>" else value
    return text if len(text) <= 80 else text[:77] + "..."


def _line_ref(text: str | None, loc: tuple[Any, ...]) -> str:
    """``line 14: `` for the YAML node at ``loc``, or '' when it cannot be found."""
    if not text:
        return ""
    try:
        node: Any = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # the text parsed once already; this is a best-effort lookup
        return ""
    line = node.start_mark.line if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if getattr(k, "value", None) == str(part)]
            key = [k for k, v in node.value if getattr(k, "value", None) == str(part)]
            if not match:
                break
            line, node = key[0].start_mark.line, match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return "" if line is None else f"line {line + 1}: "
