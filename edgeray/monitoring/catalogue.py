"""Every metric edgeray exports, in one table.

Names are as recorded through ``ray.util.metrics``; Prometheus sees them prefixed ``ray_`` (Ray's metrics
agent adds it), counters with ``_total`` and histograms as ``_bucket``/``_sum``/``_count``. Ray adds its
own labels (``NodeAddress``, ``SessionName``, ``WorkerId``); edgeray's are the ones listed here.

Training metrics are gauges a run's driver sets as it goes (``app``: pipeline | sync | moe; ``strategy``:
the sync strategy, or the app's name; ``run``: the run directory's name). Cumulative quantities (bytes
moved, transfer seconds, churn events) are gauges holding the run's total so far, so a run that has moved
nothing or lost no node shows 0 rather than no series.
"""

from __future__ import annotations

from dataclasses import dataclass

PROMETHEUS_PREFIX = "ray_"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # gauge | counter | histogram
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    @property
    def prometheus(self) -> str:
        """The series name Prometheus stores (histograms: the ``_bucket`` series)."""
        suffix = {"counter": "_total", "histogram": "_bucket"}.get(self.kind, "")
        return PROMETHEUS_PREFIX + self.name + suffix


RUN = ("app", "strategy", "run")
MS_BOUNDS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 80.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4)

_ALL = [
    # ------------------------------------------------------------------ training (driver-set gauges)
    Metric("edgeray_train_step_seconds", "gauge", "seconds per step over the last update (clock: measured here "
           "| modelled by the fabric's clock)", (*RUN, "clock")),
    Metric("edgeray_train_tokens_per_second", "gauge", "training tokens per second over the last update "
           "(clock: measured | modelled)", (*RUN, "clock")),
    Metric("edgeray_train_steps", "gauge", "steps trained so far in this run", RUN),
    Metric("edgeray_train_loss", "gauge", "training loss of the last step", RUN),
    Metric("edgeray_train_val_loss", "gauge", "validation loss of the last evaluation", RUN),
    Metric("edgeray_train_evals_since_best", "gauge", "evaluations since the validation loss last improved "
           "(0: the last one was the best so far)", RUN),
    Metric("edgeray_train_staleness_steps", "gauge", "staleness of the last applied update, steps (0 for "
           "synchronous strategies and the pipeline)", RUN),
    Metric("edgeray_train_churn_events", "gauge", "nodes that left or joined so far (kind: leave | join | "
           "drain)", (*RUN, "kind")),
    Metric("edgeray_train_energy_j_per_step", "gauge", "joules per step on each node (edgeray.energy: idle_w "
           "up, busy_w computing)", (*RUN, "region", "tier", "node")),
    Metric("edgeray_train_cost_usd_per_step", "gauge", "dollars per step (hardware hours, energy, egress; "
           "edgeray.energy.account)", RUN),
    # ------------------------------------------------------------------ fabric (driver-set, from the ledger)
    Metric("edgeray_fabric_bytes", "gauge", "wire bytes moved so far, per link class", (*RUN, "link_class")),
    Metric("edgeray_fabric_retransmitted_bytes", "gauge", "bytes sent again after modelled loss so far",
           (*RUN, "link_class")),
    Metric("edgeray_fabric_transfer_seconds", "gauge", "summed transfer time so far (clock: modelled by the "
           "link model | measured here)", (*RUN, "link_class", "clock")),
    Metric("edgeray_link_rtt_ms", "gauge", "round trip of the path between two regions that carried traffic, "
           "ms (twice the topology's one-way latency)", (*RUN, "src_region", "dst_region", "link_class")),
    # ------------------------------------------------------------------ serving (the router)
    *(
        Metric(f"edgeray_serve_{name}_ms", "histogram", f"{what} per request, ms", ("region", "tier", "node"),
               MS_BOUNDS)
        for name, what in (
            ("network", "modelled network time (client to region and back)"),
            ("ttft", "time to first token at the router"),
            ("itl", "inter-token latency (streamed: decode time over chunks after the first)"),
            ("decode", "decode time after the first token (streamed)"),
            ("e2e", "end-to-end time as the client sees it"),
        )
    ),
    Metric("edgeray_serve_requests", "counter", "served requests (outcome: served in the caller's region | "
           "spilled to another)", ("region", "tier", "outcome")),
    Metric("edgeray_serve_rejections", "counter", "requests answered with an error (status, code)",
           ("status", "code")),
    Metric("edgeray_serve_queue_depth", "gauge", "requests in flight at a region's replicas", ("region", "tier")),
    Metric("edgeray_serve_energy_j", "histogram", "energy per served request on its node, J "
           "(edgeray.energy.request_joules)", ("region", "tier"), (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300)),
]  # fmt: skip

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}

# Ray's own per-node metrics the dashboards and alerts use (exported by every node's metrics agent).
RAY_NODE = ("ray_node_mem_used", "ray_node_mem_total", "ray_node_cpu_utilization")
