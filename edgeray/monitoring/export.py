"""Recording edgeray's metrics (edgeray.monitoring.catalogue) through ``ray.util.metrics``.

    m = TrainMetrics(topology, app="pipeline", strategy="pipeline", run="pipe")
    m.progress(steps=3, tokens=6144, modelled_s=1.2, loss=5.1)
    m.transfers(ledger_rows_of_the_step)
    m.energy(joules_by_node, steps=3)

A process that is not connected to Ray (single-process references, unit tests of the maths) records
nothing: there is no metrics agent to send to.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from edgeray.monitoring.catalogue import METRICS
from edgeray.topology import Topology

REFRESH_S = 5.0
"""How often a run's gauges are set again (Ray reports every 10 s and drops a gauge unset for two reports)."""


def instrument(name: str) -> Any:
    """The ``ray.util.metrics`` object for catalogue metric ``name``."""
    from ray.util import metrics

    spec = METRICS[name]
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
    return metrics.Histogram(
        spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags
    )


def _connected() -> bool:
    import ray

    return ray.is_initialized()


class TrainMetrics:
    """The training and fabric metrics of one run, set by its driver."""

    def __init__(self, topology: Topology, *, app: str, strategy: str, run: str) -> None:
        self.topology = topology
        self.labels = {"app": app, "strategy": strategy, "run": run}
        self.enabled = _connected()
        self._g: dict[str, Any] = {}
        self._series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}  # every value set, per gauge
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None
        self._last: tuple[float, int, int, float] | None = (
            None  # (wall, steps, tokens, modelled) at last update
        )
        self._best = math.inf
        self._since_best = 0
        self._churn = {"leave": 0, "join": 0, "drain": 0}
        self._bytes: dict[str, float] = defaultdict(float)
        self._retx: dict[str, float] = defaultdict(float)
        self._secs: dict[tuple[str, str], float] = defaultdict(float)
        if self.enabled:
            for kind in self._churn:  # zero from the start: "no node left" is data, not a missing series
                self._set("edgeray_train_churn_events", 0.0, kind=kind)
            self._set("edgeray_train_staleness_steps", 0.0)

    def _set(self, name: str, value: float, **tags: str) -> None:
        """Set one series of gauge ``name``. Ray's metrics agent drops a gauge series that is not set again
        within two report intervals (~20 s), so every series this run has set is set again every
        :data:`REFRESH_S` until :meth:`close` (a churn kind still at 0, a validation loss between
        evaluations)."""
        if not self.enabled or not math.isfinite(value):
            return
        with self._lock:
            gauge = self._g.get(name)
            if gauge is None:
                gauge = self._g[name] = instrument(name)
            self._series.setdefault(name, {})[tuple(sorted(tags.items()))] = float(value)
            gauge.set(float(value), tags={**self.labels, **tags})
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh, name="edgeray-metrics", daemon=True)
                self._refresher.start()

    def _refresh(self) -> None:
        while not self._closed.wait(REFRESH_S):
            with self._lock:
                for name, series in self._series.items():
                    for key, v in series.items():
                        self._g[name].set(v, tags={**self.labels, **dict(key)})

    def close(self) -> None:
        """The run is over: its series are no longer refreshed (Ray's agent drops them ~20 s later;
        Prometheus keeps what it scraped)."""
        self._closed.set()

    def progress(
        self,
        *,
        steps: int,
        tokens: int,
        modelled_s: float,
        loss: float | None = None,
        staleness: float | None = None,
    ) -> None:
        """The run so far: steps, tokens and modelled seconds in total; step time and tokens/s are over the
        interval since the previous call that advanced ``steps``."""
        now = time.perf_counter()
        if loss is not None:
            self._set("edgeray_train_loss", loss)
        if staleness is not None:
            self._set("edgeray_train_staleness_steps", staleness)
        self._set("edgeray_train_steps", steps)
        if self._last is None:
            self._last = (now, steps, tokens, modelled_s)
            return
        wall0, steps0, tokens0, modelled0 = self._last
        if steps <= steps0:
            return
        done = steps - steps0
        self._set("edgeray_train_step_seconds", (now - wall0) / done, clock="measured")
        self._set("edgeray_train_step_seconds", (modelled_s - modelled0) / done, clock="modelled")
        if now > wall0:
            self._set("edgeray_train_tokens_per_second", (tokens - tokens0) / (now - wall0), clock="measured")
        if modelled_s > modelled0:
            self._set(
                "edgeray_train_tokens_per_second",
                (tokens - tokens0) / (modelled_s - modelled0),
                clock="modelled",
            )
        self._last = (now, steps, tokens, modelled_s)

    def evaluation(self, val_loss: float) -> int:
        """Record an evaluation; returns the evaluations since the loss last improved (the alert's input)."""
        if val_loss < self._best:
            self._best, self._since_best = val_loss, 0
        else:
            self._since_best += 1
        self._set("edgeray_train_val_loss", val_loss)
        self._set("edgeray_train_evals_since_best", self._since_best)
        return self._since_best

    def churn(self, kind: str) -> None:
        """A node left (``leave``), joined (``join``) or was drained over its energy budget (``drain``)."""
        self._churn[kind] = self._churn.get(kind, 0) + 1
        self._set("edgeray_train_churn_events", self._churn[kind], kind=kind)

    def transfers(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add ledger rows (edgeray.fabric.ledger) not seen before: bytes, retransmissions and modelled vs
        measured seconds per link class, and the round trip of each region pair that carried traffic."""
        pairs: set[tuple[str, str, str]] = set()
        for r in rows:
            cls = r["link_class"]
            self._bytes[cls] += r["bytes"]
            self._retx[cls] += r["retransmitted_bytes"]
            self._secs[(cls, "modelled")] += r["modelled_s"]
            self._secs[(cls, "measured")] += r["measured_s"]
            src, dst = self.topology.nodes.get(r["src"]), self.topology.nodes.get(r["dst"])
            if src is not None and dst is not None and cls != "intra-node":
                pairs.add((src.region, dst.region, cls))
        for cls, n in self._bytes.items():
            self._set("edgeray_fabric_bytes", n, link_class=cls)
            self._set("edgeray_fabric_retransmitted_bytes", self._retx[cls], link_class=cls)
        for (cls, clock), s in self._secs.items():
            self._set("edgeray_fabric_transfer_seconds", s, link_class=cls, clock=clock)
        for a, b, cls in pairs:
            rtt = 2.0 * self.topology.path_latency_ms(a, b) if a != b else self._intra_rtt_ms(a)
            self._set("edgeray_link_rtt_ms", rtt, src_region=a, dst_region=b, link_class=cls)

    def _intra_rtt_ms(self, region: str) -> float:
        """Round trip between two nodes of ``region``: twice the longest one-way path between its nodes."""
        nodes = [n for n in self.topology.nodes.values() if n.region == region]
        if len(nodes) < 2:
            return 0.0
        return 2.0 * max(
            self.topology.path_latency_ms(a.name, b.name) for a in nodes for b in nodes if a.name < b.name
        )

    def energy(self, joules_by_node: Mapping[str, float], *, steps: int, usd: float | None = None) -> None:
        """Joules (and dollars) the run has spent so far, turned into per-step figures."""
        if steps <= 0:
            return
        for name, joules in joules_by_node.items():
            node = self.topology.nodes[name]
            self._set(
                "edgeray_train_energy_j_per_step",
                joules / steps,
                region=node.region,
                tier=node.tier.value,
                node=name,
            )
        if usd is not None:
            self._set("edgeray_train_cost_usd_per_step", usd / steps)
