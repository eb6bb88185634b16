"""The inference workload: a request stream per region through the region router's own policy, at fleet scale.

    result = simulate_serving(topology, ServingConfig(requests=1_000_000, rate_per_s=400))
    result.summary()["regions"]["metro"]      # TTFT p50/p95, in-region, spilled and rejected fractions
    write_serving(result, Path("runs/serving"))  # requests.parquet, summary.json, serving.png

What is the runtime's, not a copy: every request's region is chosen by ``edgeray.serve.routing.Router.choose``
(own region, then nearest by topology latency, then the cloud; skipping regions that are unhealthy, full at
``capacity`` requests in flight per replica, or whose modelled network in + out plus the median of the
recent first-token times exceeds the request's budget; no region left: rejected, the app's 429/503). The
router learns each region's time to first token when the first token arrives, as the live router does, and
its modelled network is the same topology latency + bandwidth formula.

What is modelled: each region runs ``replicas`` replicas (vLLM engines batching everything in flight). A
request admitted as the k-th in flight on its replica gets its first token after ``TTFT(k)`` and each further
token after ``ITL(k)``, both linear in k and fitted to ``jobs/bench_serve.py``'s measurements at
concurrency 1, 8 and 32 (:meth:`ServiceModel.from_bench`). k is frozen at admission: a request's service
time does not change when others join or leave its batch later (continuous batching would); stated with
the results. The caller's time to first token adds the modelled network in and out. Arrivals are Poisson per
region (rate split by the regions' node counts, or ``uniform``) or a trace of (time, caller region).

One event loop (heapq) over arrivals, first tokens and completions: 1M requests in a few tens of seconds here
(``jobs/bench_sim.py``).
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeray.serve.routing import Replica, Router
from edgeray.sim.engine import SimError
from edgeray.topology import Topology

SERVICE_NOTE = (
    "service times fitted to jobs/bench_serve.py (TTFT and ITL linear in the requests in flight on the "
    "replica at admission, held for the request's life); network modelled from the topology"
)


@dataclass(frozen=True)
class ServiceModel:
    """Engine time of a request admitted as the ``k``-th in flight on its replica (itself included)."""

    # The default: the edgeray side of the jobs/bench_serve.py run in the README (local preset, 2026-12-02:
    # TTFT p50 22.0 / 60.7 / 196.6 ms and ITL p50 6.0 / 8.4 / 15.8 ms at c = 1 / 8 / 32), fitted by fit().
    ttft_ms: float = 21.66
    ttft_slope_ms: float = 5.640
    itl_ms: float = 6.088
    itl_slope_ms: float = 0.3141
    source: str = "jobs/bench_serve.py, the README's run of 2026-12-02 (edgeray side)"
    """Where the figures came from (a bench_serve summary.json, or the default)."""

    def ttft(self, k: int) -> float:
        return self.ttft_ms + self.ttft_slope_ms * (k - 1)

    def itl(self, k: int) -> float:
        return self.itl_ms + self.itl_slope_ms * (k - 1)

    @classmethod
    def fit(cls, levels: dict[int, tuple[float, float]], source: str = "fit") -> ServiceModel:
        """Least-squares lines through ``{concurrency: (ttft_p50_ms, itl_p50_ms)}`` (at least two levels);
        slopes are clipped at 0 (more requests in flight never make one faster)."""
        if len(levels) < 2:
            raise SimError(f"a service model needs at least two concurrency levels, got {sorted(levels)}")
        k = np.array(sorted(levels), dtype=np.float64) - 1.0
        ttft = np.array([levels[int(c + 1)][0] for c in k])
        itl = np.array([levels[int(c + 1)][1] for c in k])
        (ts, t0), (isl, i0) = np.polyfit(k, ttft, 1), np.polyfit(k, itl, 1)
        if ts < 0:
            ts, t0 = 0.0, float(ttft.mean())
        if isl < 0:
            isl, i0 = 0.0, float(itl.mean())
        return cls(float(t0), float(ts), float(i0), float(isl), source)

    @classmethod
    def from_bench(cls, path: str | Path, side: str = "edgeray") -> ServiceModel:
        """Fit to a ``jobs/bench_serve.py`` summary.json (``side``: ``edgeray`` or ``bare``)."""
        path = Path(path)
        try:
            runs = json.loads(path.read_text())[side]
            levels = {int(c): (float(m["p50_ttft_ms"]), float(m["p50_itl_ms"])) for c, m in runs.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SimError(
                f"{path}: not a jobs/bench_serve.py summary.json with {side!r} levels "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return cls.fit(levels, source=f"{path} ({side})")


@dataclass
class ServingConfig:
    requests: int = 1_000_000
    rate_per_s: float = 200.0
    """Arrivals per second, all regions together (Poisson)."""
    weights: str = "nodes"
    """How the rate splits over caller regions: ``nodes`` (by node count) or ``uniform``."""
    replicas: int = 1
    """Replicas per region (``replicas_by_region`` overrides per region)."""
    nodes_per_replica: int = 0
    """When > 0: a region runs ceil(its nodes / this) replicas instead of ``replicas``."""
    replicas_by_region: dict[str, int] = field(default_factory=dict)
    capacity: int = 16
    """Requests in flight per replica before its region counts as full (the app's ``capacity``)."""
    budget_ms: float = 100.0
    """First-token budget of every request (the app's default for short bodies)."""
    request_bytes: int = 512
    tokens: int = 32
    """Output tokens per request."""
    ttft_guess_ms: float = 20.0
    window_s: float = 10.0
    seed: int = 0

    def problems(self, topology: Topology | None = None) -> list[str]:
        out = []
        for name, lo in (("requests", 1), ("capacity", 1), ("tokens", 1), ("request_bytes", 0),
                         ("replicas", 0), ("nodes_per_replica", 0)):  # fmt: skip
            if getattr(self, name) < lo:
                out.append(f"{name}={getattr(self, name)}: must be >= {lo}")
        for name in ("rate_per_s", "budget_ms", "window_s", "ttft_guess_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                out.append(f"{name}={value}: must be a positive number")
        if self.weights not in ("nodes", "uniform"):
            out.append(f"weights={self.weights!r}: valid are 'nodes', 'uniform'")
        for region, n in self.replicas_by_region.items():
            if topology is not None and region not in topology.regions:
                out.append(
                    f"replicas_by_region: unknown region {region!r} (regions: {sorted(topology.regions)})"
                )
            if n < 0:
                out.append(f"replicas_by_region[{region!r}]={n}: must be >= 0")
        return out

    def check(self, topology: Topology | None = None) -> ServingConfig:
        problems = self.problems(topology)
        if problems:
            raise SimError("serving config: " + "; ".join(problems))
        return self


class _FixedRouter(Router):
    """The runtime's router over a replica set that does not change during the run: the per-region replica
    list is indexed once instead of scanned per candidate region (the decision is Router.choose's)."""

    def __init__(self, topology: Topology, **kw: Any) -> None:
        super().__init__(topology, **kw)
        self._by_region: dict[str, list[Replica]] = {}

    def index(self) -> None:
        self._by_region = {r: [] for r in self.topology.regions}
        for replica in self.replicas.values():
            self._by_region[replica.region].append(replica)

    def in_region(self, region: str) -> list[Replica]:
        return self._by_region[region]


@dataclass
class ServingResult:
    config: ServingConfig
    service: ServiceModel
    regions: list[str]
    arrival_s: np.ndarray
    caller: np.ndarray
    """Index into ``regions`` of each request's caller."""
    served_by: np.ndarray
    """Index of the region that served it, -1 when rejected."""
    ttft_ms: np.ndarray
    """The caller's time to first token (network in + engine + network out); NaN when rejected."""
    e2e_ms: np.ndarray
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        served = self.served_by >= 0
        per: dict[str, Any] = {}
        for i, name in enumerate(self.regions):
            mine = self.caller == i
            n = int(mine.sum())
            ok = mine & served
            ttft = self.ttft_ms[ok]
            per[name] = {
                "requests": n,
                "in_region": float((mine & (self.served_by == i)).sum() / n) if n else None,
                "spilled": float((ok & (self.served_by != i)).sum() / n) if n else None,
                "rejected": float((mine & ~served).sum() / n) if n else None,
                "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft.size else None,
                "ttft_p95_ms": float(np.percentile(ttft, 95)) if ttft.size else None,
                "served_here": int((self.served_by == i).sum()),
            }
        n = len(self.caller)
        ttft = self.ttft_ms[served]
        return {
            "requests": n,
            "modelled_s": float(self.arrival_s[-1]) if n else 0.0,
            "in_region": float((self.served_by == self.caller).sum() / n),
            "spilled": float((served & (self.served_by != self.caller)).sum() / n),
            "rejected": float((~served).sum() / n),
            "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft.size else None,
            "ttft_p95_ms": float(np.percentile(ttft, 95)) if ttft.size else None,
            "regions": per,
            "service": asdict(self.service),
            "wall_s": self.wall_s,
        }


def poisson_arrivals(
    topology: Topology, config: ServingConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``config.requests`` arrival times (s, sorted) and caller region indices: one Poisson stream of the
    whole rate, each arrival's region drawn by weight (the same as one Poisson stream per region)."""
    regions = list(topology.regions)
    if config.weights == "nodes":
        w = np.array([len(topology.regions[r].nodes) for r in regions], dtype=np.float64)
    else:
        w = np.ones(len(regions))
    gaps = rng.exponential(1.0 / config.rate_per_s, config.requests)
    caller = rng.choice(len(regions), size=config.requests, p=w / w.sum())
    return np.cumsum(gaps), caller.astype(np.int32)


def read_trace(path: str | Path, topology: Topology) -> tuple[np.ndarray, np.ndarray]:
    """Arrivals from a CSV or Parquet file with columns ``t_s`` (seconds) and ``region`` (a region of
    ``topology``), sorted by time."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)
        t = np.asarray(table.column("t_s").to_numpy(zero_copy_only=False), dtype=np.float64)
        names = [str(r) for r in table.column("region").to_pylist()]
    except (OSError, KeyError, ValueError) as exc:
        raise SimError(f"trace {path}: needs columns t_s and region ({type(exc).__name__}: {exc})") from None
    index = {r: i for i, r in enumerate(topology.regions)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise SimError(f"trace {path}: unknown regions {unknown[:5]} (regions: {sorted(index)[:10]})")
    if not np.all(np.isfinite(t)) or (t.size and t.min() < 0):
        raise SimError(f"trace {path}: t_s must be finite seconds >= 0")
    order = np.argsort(t, kind="stable")
    return t[order], np.array([index[r] for r in names], dtype=np.int32)[order]


def simulate_serving(
    topology: Topology,
    config: ServingConfig,
    service: ServiceModel | None = None,
    *,
    arrivals: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Any = None,
) -> ServingResult:
    """Run the stream through the router and the replicas' queues. ``arrivals``: a trace (times in s,
    caller region indices into ``list(topology.regions)``) instead of Poisson arrivals."""
    import time

    config.check(topology)
    service = service or ServiceModel()
    regions = list(topology.regions)
    rng = np.random.default_rng(config.seed)
    if arrivals is None:
        times, caller = poisson_arrivals(topology, config, rng)
    else:
        times, caller = np.asarray(arrivals[0], dtype=np.float64), np.asarray(arrivals[1], dtype=np.int32)
        if times.shape != caller.shape or times.ndim != 1:
            raise SimError(f"a trace needs equal-length times and callers, got {times.shape}, {caller.shape}")
        if times.size and (np.any(np.diff(times) < 0) or caller.min() < 0 or caller.max() >= len(regions)):
            raise SimError(f"a trace's times must be sorted and its callers index {len(regions)} regions")
    t0 = time.perf_counter()
    router = _FixedRouter(topology, ttft_guess_ms=config.ttft_guess_ms, window_s=config.window_s)
    for region in regions:
        nodes = topology.regions[region].nodes
        count = config.replicas
        if config.nodes_per_replica:
            count = -(-len(nodes) // config.nodes_per_replica)
        for i in range(config.replicas_by_region.get(region, count)):
            node = nodes[i % len(nodes)].name
            rid = f"{region}-{i}"
            router.replicas[rid] = Replica(rid, region, node, "", "sim", config.capacity, {})
    router.index()
    region_index = {r: i for i, r in enumerate(regions)}
    n = len(times)
    served_by = np.full(n, -1, dtype=np.int32)
    ttft_out = np.full(n, np.nan)
    e2e_out = np.full(n, np.nan)
    events: list[tuple[float, int, int, Any]] = []  # (time, seq, kind 0 first token / 1 done, payload)
    seq = 0
    pop, push = heapq.heappop, heapq.heappush
    budget, nbytes, tokens = config.budget_ms, config.request_bytes, config.tokens
    latency = router.latency
    step = max(1, n // 10)
    for j in range(n):
        now = float(times[j])
        while events and events[0][0] <= now:
            at, _, kind, payload = pop(events)
            if kind == 0:
                latency[payload[0]].observe(payload[1], now=at)
            else:
                payload.inflight -= 1
        choice, _ = router.choose(regions[caller[j]], budget, nbytes, now=now)
        if choice is not None:
            replica = choice.replica
            replica.inflight += 1
            k = replica.inflight
            engine_ttft = service.ttft(k)
            engine_e2e = engine_ttft + (tokens - 1) * service.itl(k)
            push(events, (now + engine_ttft / 1e3, seq, 0, (choice.region, engine_ttft)))
            push(events, (now + engine_e2e / 1e3, seq + 1, 1, replica))
            seq += 2
            served_by[j] = region_index[choice.region]
            net = choice.network_in_ms + choice.network_out_ms
            ttft_out[j] = engine_ttft + net
            e2e_out[j] = engine_e2e + net
        if progress is not None and (j + 1) % step == 0:
            progress(j + 1, n)
    return ServingResult(
        config, service, regions, times, caller, served_by, ttft_out, e2e_out, time.perf_counter() - t0
    )


def write_serving(result: ServingResult, out: Path) -> dict[str, Any]:
    """``out``/requests.parquet (one row per request), summary.json and serving.png, atomically."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from edgeray.atomic import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    names = np.array([*result.regions, "(rejected)"], dtype=object)  # served_by -1: the last
    table = pa.table(
        {
            "arrival_s": result.arrival_s,
            "caller": pa.DictionaryArray.from_arrays(result.caller, result.regions),
            "served_by": pa.array(names[result.served_by]).dictionary_encode(),
            "ttft_ms": result.ttft_ms,
            "e2e_ms": result.e2e_ms,
        }
    )
    tmp = out / f".requests.parquet.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "requests.parquet")
    summary = {**result.summary(), "config": asdict(result.config), "note": SERVICE_NOTE}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    plot_serving(summary, out / "serving.png")
    return summary


def plot_serving(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = summary["regions"]
    names = [r for r in per if per[r]["requests"]][:60]
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(10, 0.25 * len(names) + 6), 4))
    p50 = [per[r]["ttft_p50_ms"] or 0 for r in names]
    p95 = [per[r]["ttft_p95_ms"] or 0 for r in names]
    a.bar(x - 0.2, p50, 0.4, label="p50")
    a.bar(x + 0.2, p95, 0.4, label="p95")
    a.set_ylabel("caller's time to first token, ms")
    a.set_title("TTFT by caller region (served requests)")
    bottom = np.zeros(len(names))
    for key, color in (("in_region", "tab:green"), ("spilled", "tab:orange"), ("rejected", "tab:red")):
        vals = np.array([per[r][key] or 0 for r in names])
        b.bar(x, vals, bottom=bottom, label=key.replace("_", " "), color=color)
        bottom += vals
    b.set_ylabel("fraction of the region's requests")
    b.set_title("where requests went")
    for ax in (a, b):
        ax.set_xticks(x, names, rotation=90 if len(names) > 8 else 0, fontsize=7 if len(names) > 8 else 9)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{summary['requests']:,} requests, {summary['config']['rate_per_s']:g}/s; "
        f"in region {summary['in_region']:.1%}, spilled {summary['spilled']:.1%}, "
        f"rejected {summary['rejected']:.1%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
