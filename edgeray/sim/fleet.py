"""Generated fleets: thousands of nodes in dozens of regions, as an ordinary :class:`Topology`.

    topo = generate(FleetSpec(nodes=10_000, regions=50, seed=0))
    Path("fleet.yaml").write_text(to_yaml(topo))      # `edgeray validate fleet.yaml` reads it back

Regions get a tier from ``tiers`` (fractions of the regions), a size from a lognormal draw (``size_sigma``;
every region has at least one node, sizes sum to ``nodes``) and a place on a ``span_km`` square (latitude, longitude). Hubs (the
regional and cloud regions; the largest region when there are none) form a full mesh; every other region
links to its ``uplinks`` nearest hubs. An inter-region link's latency is ``base_ms`` plus the great-circle
distance at ``km_per_ms`` (fibre and routing); bandwidth, jitter and loss are the topology's
tier defaults. Nodes get the tier's CPUs and power draw; a ``stragglers`` fraction of them the ``slowdown``;
churn is the tier's availability and MTBF unless ``availability`` / ``mtbf_s`` override it. Seeded: the same
spec gives the same fleet.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import yaml

from edgeray.errors import EdgerayError
from edgeray.topology import Tier, Topology

TIER_CPUS = {"device": 1, "micro": 2, "regional": 4, "cloud": 8}
TIER_POWER = {  # watts idle / busy
    "device": (2.0, 8.0),
    "micro": (15.0, 45.0),
    "regional": (60.0, 180.0),
    "cloud": (120.0, 400.0),
}
TIER_CHURN = {  # availability, MTBF seconds (phones come and go; data centres rarely do)
    "device": (0.9, 3_600.0),
    "micro": (0.99, 86_400.0),
    "regional": (0.999, 604_800.0),
    "cloud": (0.9999, 2_592_000.0),
}


class GeneratorError(EdgerayError):
    """A fleet spec that names an impossible fleet: the field, the value and what is valid."""


@dataclass(frozen=True)
class FleetSpec:
    nodes: int = 1_000
    regions: int = 10
    tiers: dict[str, float] = field(
        default_factory=lambda: {"device": 0.5, "micro": 0.3, "regional": 0.15, "cloud": 0.05}
    )
    """Fraction of the regions in each tier (device, micro, regional, cloud); they must sum to 1."""
    size_sigma: float = 0.8
    """Sigma of the lognormal region sizes (0: equal sizes)."""
    stragglers: float = 0.0
    """Fraction of nodes that compute ``slowdown`` times slower."""
    slowdown: float = 5.0
    availability: float | None = None
    """Every node's long-run availability (default: its tier's)."""
    mtbf_s: float | None = None
    """Every node's mean time between failures, seconds (default: its tier's)."""
    uplinks: int = 2
    span_km: float = 3_000.0
    base_ms: float = 2.0
    km_per_ms: float = 100.0
    seed: int = 0
    name: str = ""

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.nodes <= 1_000_000:
            out.append(f"nodes = {self.nodes}: must be in [1, 1000000]")
        if not 1 <= self.regions <= min(max(self.nodes, 1), 10_000):
            out.append(
                f"regions = {self.regions}: must be in [1, nodes = {self.nodes}] (every region has a node)"
            )
        unknown = sorted(set(self.tiers) - set(TIER_CPUS))
        if unknown:
            out.append(f"tiers: unknown tier(s) {unknown}; valid tiers are {list(TIER_CPUS)}")
        if any(not (0 <= v <= 1) or not math.isfinite(v) for v in self.tiers.values()):
            out.append(f"tiers = {self.tiers}: every fraction must be in [0, 1]")
        elif not math.isclose(sum(self.tiers.values()), 1.0, abs_tol=1e-6):
            out.append(f"tiers = {self.tiers}: fractions sum to {sum(self.tiers.values()):g}, must sum to 1")
        checks = [
            ("size_sigma", self.size_sigma, 0, 5),
            ("stragglers", self.stragglers, 0, 1),
            ("slowdown", self.slowdown, 1, 1000),
            ("span_km", self.span_km, 0, 40_000),
            ("base_ms", self.base_ms, 0, 10_000),
        ]
        for name, value, lo, hi in checks:
            if not (lo <= value <= hi) or not math.isfinite(value):
                out.append(f"{name} = {value}: must be in [{lo}, {hi}]")
        if not (self.km_per_ms > 0 and math.isfinite(self.km_per_ms)):
            out.append(f"km_per_ms = {self.km_per_ms}: must be > 0")
        if self.availability is not None and not 0 < self.availability <= 1:
            out.append(f"availability = {self.availability}: must be in (0, 1]")
        if self.mtbf_s is not None and not self.mtbf_s > 0:
            out.append(f"mtbf_s = {self.mtbf_s}: must be > 0 seconds")
        if self.uplinks < 1:
            out.append(f"uplinks = {self.uplinks}: must be >= 1")
        return out

    @classmethod
    def parse(cls, text: str) -> FleetSpec:
        """``nodes=10000,regions=50,stragglers=0.05,seed=1`` (the CLI's generator spec; ``tiers`` as
        ``tiers=device:0.5/micro:0.5``)."""
        kwargs: dict[str, Any] = {}
        fields = {f for f in cls.__dataclass_fields__}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in fields:
                raise GeneratorError(
                    f"fleet spec {text!r}: {item!r} is not NAME=VALUE with NAME one of {sorted(fields)}"
                )
            try:
                if key == "tiers":
                    kwargs[key] = {t: float(f) for t, f in (p.split(":") for p in value.split("/"))}
                elif key == "name":
                    kwargs[key] = value
                elif key in ("nodes", "regions", "uplinks", "seed"):
                    kwargs[key] = int(value)
                else:
                    kwargs[key] = float(value)
            except ValueError:
                raise GeneratorError(f"fleet spec {text!r}: {key} = {value!r} is not a number") from None
        return cls(**kwargs)


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray:
    """Great-circle distance, km (arrays broadcast)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def region_sizes(spec: FleetSpec, rng: np.random.Generator) -> np.ndarray:
    """Lognormal region sizes, each >= 1, summing to ``spec.nodes`` (largest remainders)."""
    weights = rng.lognormal(0.0, spec.size_sigma, spec.regions) if spec.size_sigma else np.ones(spec.regions)
    spare = spec.nodes - spec.regions  # one node per region first
    share = weights / weights.sum() * spare
    sizes = np.floor(share).astype(np.int64)
    left = spare - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:left]] += 1
    return sizes + 1


def generate(spec: FleetSpec) -> Topology:
    """The fleet ``spec`` describes, as a validated :class:`Topology` (no file behind it)."""
    problems = spec.problems()
    if problems:
        raise GeneratorError("fleet spec: " + "; ".join(problems))
    rng = np.random.default_rng(spec.seed)
    tiers = [t for t in TIER_CPUS if spec.tiers.get(t, 0) > 0]
    counts = np.floor(np.array([spec.tiers[t] for t in tiers]) * spec.regions).astype(int)
    order = np.argsort(-(np.array([spec.tiers[t] for t in tiers]) * spec.regions - counts), kind="stable")
    counts[order[: spec.regions - counts.sum()]] += 1
    region_tier = [t for t, c in zip(tiers, counts, strict=True) for _ in range(c)]
    rng.shuffle(region_tier)
    sizes = region_sizes(spec, rng)
    # (latitude, longitude) on a span_km square centred on 48N 10E; distances along the sphere
    half = spec.span_km / 2 / 111.2
    lat = 48.0 + rng.uniform(-half, half, spec.regions)
    lon = 10.0 + rng.uniform(-half, half, spec.regions) / math.cos(math.radians(48.0))
    lat, lon = np.clip(lat, -89.9, 89.9), (lon + 180.0) % 360.0 - 180.0
    straggler = rng.random(spec.nodes) < spec.stragglers
    names = [f"r{i:0{len(str(spec.regions - 1))}d}" for i in range(spec.regions)]
    width = len(str(int(sizes.max()) - 1))
    regions = []
    k = 0
    for i, (name, tier, size) in enumerate(zip(names, region_tier, sizes, strict=True)):
        availability, mtbf = TIER_CHURN[tier]
        churn = {
            "availability": spec.availability if spec.availability is not None else availability,
            "mtbf_s": spec.mtbf_s if spec.mtbf_s is not None else mtbf,
        }
        nodes = []
        for j in range(int(size)):
            node: dict[str, Any] = {
                "name": f"{name}-{j:0{width}d}",
                "cpus": TIER_CPUS[tier],
                "power": {"idle_w": TIER_POWER[tier][0], "busy_w": TIER_POWER[tier][1]},
            }
            if straggler[k]:
                node["slowdown"] = spec.slowdown
            nodes.append(node)
            k += 1
        regions.append(
            {
                "name": name,
                "tier": tier,
                "nodes": nodes,
                "churn": churn,
                "location": (round(float(lat[i]), 5), round(float(lon[i]), 5)),
            }
        )
    hub_tiers = {Tier.REGIONAL.value, Tier.CLOUD.value}
    hubs = [i for i, t in enumerate(region_tier) if t in hub_tiers] or [int(np.argmax(sizes))]
    dist = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])

    def latency(a: int, b: int) -> float:
        return round(spec.base_ms + float(dist[a, b]) / spec.km_per_ms, 3)

    pairs: set[tuple[int, int]] = set()
    for a in hubs:
        for b in hubs:
            if a < b:
                pairs.add((a, b))
    for i in range(spec.regions):
        if i in hubs:
            continue
        for h in sorted(hubs, key=lambda h: (dist[i, h], h))[: spec.uplinks]:
            pairs.add((min(i, h), max(i, h)))
    links = [{"between": [names[a], names[b]], "latency_ms": latency(a, b)} for a, b in sorted(pairs)]
    doc = {
        "name": spec.name or f"gen-{spec.nodes}n-{spec.regions}r-s{spec.seed}",
        "description": f"generated by edgeray.sim.fleet from {asdict(spec)}",
        "regions": regions,
        "links": links,
    }
    return Topology.from_dict(doc)


def to_yaml(topology: Topology) -> str:
    """The topology's document as YAML (what :func:`edgeray.topology.load_topology` reads)."""
    return yaml.safe_dump(topology.spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
