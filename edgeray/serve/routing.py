"""Region choice for one request: own region first, then nearest by topology latency, then the cloud.

Pure apart from the clock (unit-tested). The router process feeds it what it learns: which replicas are
registered and answer their health probe, how many requests each has in flight, and the time to first
token it measured per region.

A region is skipped while
- unhealthy: no replica passes its health probe, or every one failed a request before its first token
  (connection refused or reset, silence past ``first_token_timeout_s``) within the last ``FAILED_S``;
- full: every healthy replica has ``capacity`` requests in flight;
- too slow: modelled network in + out (topology latency and bandwidth for the request / first-chunk bytes)
  + the median recent time to first token exceeds the request's budget.
A request's own errors (4xx, a bad parameter) never mark anything: only the engine or replica failing does.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edgeray.topology import Tier, Topology

FAILED_S = 10.0
"""How long a replica that failed a request before its first token is skipped (its probe may clear it)."""


@dataclass
class Replica:
    """One registered replica: where its engine's HTTP server listens and what the router knows of it."""

    id: str
    region: str
    node: str
    url: str
    engine: str
    capacity: int
    accepted: dict[str, list[str]]
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Request body JSON Schemas per endpoint (edgeray.serve.openapi), for the router's /openapi.json."""
    pid: int = 0
    """The engine server's supervisor process on ``node``."""
    healthy: bool = True
    failed_until: float = 0.0
    inflight: int = 0
    rtt_ms: float | None = None
    """The router-to-replica path's round trip as last measured (a ``--wan`` cluster); None: not measured."""

    def usable(self, now: float) -> bool:
        return self.healthy and self.failed_until <= now


@dataclass
class RegionLatency:
    """Recent time-to-first-token samples of one region, as (monotonic s, ms)."""

    samples: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))
    _cached: tuple[float, float, float, float, float] | None = field(default=None, repr=False)
    """(valid from, valid until, window_s, default_ms, estimate): the last estimate, until a sample arrives
    or one of the samples it used expires (every routing decision asks; samples change far less often)."""

    def estimate(self, now: float, window_s: float, default_ms: float) -> float:
        """Median over the last ``window_s`` seconds; with fewer than three samples, the optimistic
        ``default_ms``. Old samples expire, so a past overload (or a first call's one-off costs) cannot keep a
        region shut out: an idle region gets probed again."""
        c = self._cached
        if c is not None and c[0] <= now < c[1] and c[2] == window_s and c[3] == default_ms:
            return c[4]
        fresh = [(ts, ms) for ts, ms in self.samples if ts >= now - window_s]
        value = default_ms if len(fresh) < 3 else sorted(ms for _, ms in fresh)[len(fresh) // 2]
        until = min(ts for ts, _ in fresh) + window_s if fresh else math.inf
        self._cached = (now, until, window_s, default_ms, value)
        return value

    def p95(self, now: float, window_s: float) -> float | None:
        fresh = sorted(ms for ts, ms in self.samples if ts >= now - window_s)
        return fresh[min(len(fresh) - 1, int(0.95 * len(fresh)))] if fresh else None

    def observe(self, ms: float, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, ms))
        self._cached = None


@dataclass(frozen=True)
class Choice:
    region: str
    replica: Replica
    network_in_ms: float
    network_out_ms: float
    expected_ms: float


class Router:
    """Chooses a replica for a caller region and first-token budget."""

    def __init__(
        self,
        topology: Topology,
        *,
        ttft_guess_ms: float = 20.0,
        window_s: float = 10.0,
        prefer: str = "latency",
        energy_slack_ms: float | None = 5.0,
    ) -> None:
        if prefer not in ("latency", "energy"):
            raise ValueError(f"prefer {prefer!r}: valid choices are ['latency', 'energy']")
        self.topology = topology
        self.prefer = prefer
        self.energy_slack_ms = energy_slack_ms
        self.replicas: dict[str, Replica] = {}
        self.latency = {r: RegionLatency() for r in topology.regions}
        self.ttft_guess_ms = ttft_guess_ms
        self.window_s = window_s
        # what depends on the topology alone, computed once per caller / region pair
        self._candidates: dict[str, list[str]] = {}
        self._links: dict[tuple[str, str], tuple[float, float]] = {}

    def candidates(self, caller: str) -> list[str]:
        got = self._candidates.get(caller)
        if got is None:
            near = [r for r, _ in self.topology.nearest_regions(caller)]
            cloud = [r for r in near if self.topology.regions[r].tier is Tier.CLOUD and r != caller]
            got = self._candidates[caller] = [r for r in near if r not in cloud] + cloud
        return got

    def network_ms(self, caller: str, region: str, nbytes: int) -> float:
        """Modelled one-way time for ``nbytes`` between the caller's region and ``region``."""
        link = self._links.get((caller, region))
        if link is None:
            route = self.topology.route(caller, region).link  # a region to itself: its intra-region link
            link = self._links[(caller, region)] = (route.latency_ms, route.bandwidth_mbps)
        return link[0] + nbytes * 8 / (link[1] * 1e3)

    def in_region(self, region: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.region == region]

    def choose(
        self,
        caller: str,
        budget_ms: float,
        request_bytes: int,
        *,
        exclude: frozenset[str] = frozenset(),
        tiers: frozenset[Tier] | None = None,
        now: float | None = None,
    ) -> tuple[Choice | None, list[tuple[str, str]]]:
        """The least-loaded usable replica of the first candidate region that is healthy, has room and meets
        the budget; and why each region it passed over was skipped. ``prefer="energy"``: among the regions
        that qualify and are expected within ``energy_slack_ms`` of the fastest of them, the one whose
        replica's node is expected to spend the fewest joules (``busy_w`` x the region's expected time to the
        first token; ties keep the latency order). ``exclude``: replica ids already tried; ``tiers``: only
        regions of these tiers (a cascade's stages)."""
        now = time.monotonic() if now is None else now
        skipped: list[tuple[str, str]] = []
        qualified: list[tuple[float, int, Choice]] = []
        for region in self.candidates(caller):
            if tiers is not None and self.topology.regions[region].tier not in tiers:
                continue
            usable = [r for r in self.in_region(region) if r.usable(now) and r.id not in exclude]
            if not usable:
                skipped.append((region, "unhealthy"))
                continue
            free = [r for r in usable if r.inflight < r.capacity]
            if not free:
                skipped.append((region, "overloaded"))
                continue
            net_in = self.network_ms(caller, region, request_bytes)
            net_out = self.network_ms(caller, region, 256)  # the first chunk
            expected = (
                net_in + net_out + self.latency[region].estimate(now, self.window_s, self.ttft_guess_ms)
            )
            if expected > budget_ms:
                skipped.append((region, f"expected {expected:.0f} ms > budget {budget_ms:.0f} ms"))
                continue
            replica = min(free, key=lambda r: r.inflight / r.capacity)
            choice = Choice(region, replica, net_in, net_out, expected)
            if self.prefer == "latency":
                return choice, skipped
            qualified.append((self.expected_joules(choice), len(qualified), choice))
        if qualified:
            fastest = min(c.expected_ms for _, _, c in qualified)
            slack = math.inf if self.energy_slack_ms is None else self.energy_slack_ms
            return min(q for q in qualified if q[2].expected_ms <= fastest + slack)[2], skipped
        return None, skipped

    def expected_joules(self, choice: Choice) -> float:
        """What answering on ``choice`` is expected to cost its node: busy power x the region's expected
        engine time (its recent median time to first token; edgeray.energy.request_joules measures it after)."""
        node = self.topology.nodes.get(choice.replica.node)
        engine_ms = choice.expected_ms - choice.network_in_ms - choice.network_out_ms
        return (node.power.busy_w if node is not None else math.inf) * engine_ms / 1e3
