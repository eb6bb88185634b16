"""edgeray's Grafana dashboards and Prometheus alert rules, generated from the panel tables below.

    python -m edgeray.monitoring.dashboards --write     # regenerate edgeray/monitoring/generated/

Each panel is one or more PromQL queries over the metrics of edgeray.monitoring.catalogue (and Ray's own
per-node metrics). ``edgeray monitor --check`` (edgeray.monitoring.monitor.check) runs every panel's
queries against Prometheus, so "every panel has data" is a query, not a look.

Alert thresholds are the seed's operations table: p95 inference latency over 80 ms (the time to first
token, which a streamed answer's user waits for; an answer's whole time grows with its length), a regional
round trip over 30 ms (between two nodes of one region), memory over 90% of a node, and the validation loss
not improving over 3 evaluations.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

GENERATED = Path(__file__).parent / "generated"
RATE = "1m"  # the window of every rate(): a few scrapes at edgeray monitor's 5 s interval


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""
    fed_by: str = ""  # which runs put data in it (the check reports it beside a panel without data)


def _q(metric: str, p: float, by: str) -> str:
    return f"histogram_quantile({p}, sum by ({by}, le) (rate(ray_{metric}_bucket[{RATE}])))"


def _pq(metric: str, by: str = "region") -> tuple[tuple[str, str], ...]:
    return ((_q(metric, 0.5, by), f"p50 {{{{{by}}}}}"), (_q(metric, 0.95, by), f"p95 {{{{{by}}}}}"))


TRAINING = [
    Panel("Step time", (("ray_edgeray_train_step_seconds", "{{run}} {{clock}}"),), "s",
          "seconds per step: measured here, and on the fabric's modelled clock", "any training run"),
    Panel("Steps trained", (("ray_edgeray_train_steps", "{{run}}"),), "short", "", "any training run"),
    Panel("Tokens per second", (("ray_edgeray_train_tokens_per_second", "{{run}} {{clock}}"),), "short",
          "training throughput, measured and modelled", "any training run"),
    Panel("Loss", (("ray_edgeray_train_loss", "train {{run}}"), ("ray_edgeray_train_val_loss", "val {{run}}")),
          "short", "training loss per step; validation loss per evaluation", "any training run"),
    Panel("Evaluations since the best validation loss", (("ray_edgeray_train_evals_since_best", "{{run}}"),),
          "short", "the loss-stagnation alert fires at 3", "any training run"),
    Panel("Staleness", (("ray_edgeray_train_staleness_steps", "{{run}}"),), "short",
          "steps behind of the last applied update (0: synchronous)", "any training run"),
    Panel("Churn events", (("ray_edgeray_train_churn_events", "{{run}} {{kind}}"),), "short",
          "nodes that left, joined or were drained over their energy budget", "any training run"),
    Panel("Energy per step by tier", (("sum by (run, tier) (ray_edgeray_train_energy_j_per_step)",
                                       "{{run}} {{tier}}"),), "J", "edgeray.energy's power model",
          "any training run"),
    Panel("Cost per step", (("ray_edgeray_train_cost_usd_per_step", "{{run}}"),), "currencyUSD",
          "hardware hours, energy and egress (edgeray.energy.account)", "pipeline and sync runs"),
]  # fmt: skip

FABRIC = [
    Panel("Bytes moved per link class", (("sum by (run, link_class) (ray_edgeray_fabric_bytes)",
                                          "{{run}} {{link_class}}"),), "bytes", "", "any training run"),
    Panel("Transfer time: modelled vs measured", (
        ("sum by (run, link_class, clock) (ray_edgeray_fabric_transfer_seconds)", "{{run}} {{link_class}} {{clock}}"),
    ), "s", "the link model's time beside the wall time the transfers took here", "any training run"),
    Panel("Retransmitted bytes", (("sum by (run, link_class) (ray_edgeray_fabric_retransmitted_bytes)",
                                   "{{run}} {{link_class}}"),), "bytes", "sent again after modelled loss",
          "any training run"),
    Panel("Round trip between regions", (("max by (src_region, dst_region) (ray_edgeray_link_rtt_ms)",
                                          "{{src_region}} -> {{dst_region}}"),), "ms",
          "the regional-RTT alert fires over 30 ms inside a region", "any training run"),
]  # fmt: skip

SERVING = [
    Panel("Time to first token", _pq("edgeray_serve_ttft_ms"), "ms", "the p95-latency alert fires over 80 ms",
          "the serving app"),
    Panel("Inter-token latency", _pq("edgeray_serve_itl_ms"), "ms", "streamed answers", "the serving app"),
    Panel("End-to-end latency", _pq("edgeray_serve_e2e_ms"), "ms", "as the client sees it (network modelled)",
          "the serving app"),
    Panel("Decode time", _pq("edgeray_serve_decode_ms"), "ms", "after the first token (streamed)",
          "the serving app"),
    Panel("Network time", _pq("edgeray_serve_network_ms"), "ms", "client to region and back, modelled",
          "the serving app"),
    Panel("Requests by outcome", ((f"sum by (region, outcome) (rate(ray_edgeray_serve_requests_total[{RATE}]))",
                                   "{{region}} {{outcome}}"),), "reqps",
          "served in the caller's region, or spilled to another", "the serving app"),
    Panel("In-region fraction", ((
        f'sum(rate(ray_edgeray_serve_requests_total{{outcome="served"}}[{RATE}])) / '
        f"sum(rate(ray_edgeray_serve_requests_total[{RATE}]))", "in region"),), "percentunit", "",
          "the serving app"),
    Panel("Rejections so far", (("sum by (status, code) (ray_edgeray_serve_rejections_total)", "{{status}} {{code}}"),),
          "short", "requests answered with an error since the app started (rare events: a rate would show "
          "a lone refusal as 0)", "the serving app (a refused request)"),
    Panel("Queue depth", (("ray_edgeray_serve_queue_depth", "{{region}}"),), "short",
          "requests in flight at each region's replicas", "the serving app"),
    Panel("Energy per request by tier", _pq("edgeray_serve_energy_j", "tier"), "J",
          "edgeray.energy.request_joules", "the serving app"),
]  # fmt: skip

FLEET = [
    Panel("Memory used per node", (("ray_node_mem_used / ray_node_mem_total", "{{instance}}"),), "percentunit",
          "the memory alert fires over 90%", "any cluster"),
    Panel("CPU utilisation per node", (("ray_node_cpu_utilization", "{{instance}}"),), "percent", "",
          "any cluster"),
]  # fmt: skip

DASHBOARDS: dict[str, tuple[str, list[tuple[str, list[Panel]]]]] = {
    "edgeray-training": ("edgeray: training and fabric", [("Training", TRAINING), ("Fabric", FABRIC)]),
    "edgeray-serving": ("edgeray: regional serving", [("Serving", SERVING)]),
    "edgeray-fleet": ("edgeray: fleet", [("Nodes", FLEET)]),
}

ALERTS: list[dict[str, Any]] = [
    {
        "alert": "EdgerayInferenceLatencyP95High",
        "expr": f"{_q('edgeray_serve_ttft_ms', 0.95, 'region')} > 80",
        "for": "5m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "p95 time to first token in region {{ $labels.region }} is "
                        "{{ $value | printf \"%.0f\" }} ms (> 80 ms)"},
    },
    {
        "alert": "EdgerayRegionalRTTHigh",
        "expr": 'max by (src_region, dst_region) (ray_edgeray_link_rtt_ms{link_class="intra-region"}) > 30',
        "for": "5m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "round trip inside region {{ $labels.src_region }} is "
                        "{{ $value | printf \"%.0f\" }} ms (> 30 ms)"},
    },
    {
        "alert": "EdgerayNodeMemoryHigh",
        "expr": "ray_node_mem_used / ray_node_mem_total > 0.9",
        "for": "5m",
        "labels": {"severity": "critical"},
        "annotations": {"summary": "node {{ $labels.instance }} uses {{ $value | humanizePercentage }} of "
                        "its memory (> 90%)"},
    },
    {
        "alert": "EdgerayTrainingLossStagnant",
        "expr": "ray_edgeray_train_evals_since_best >= 3",
        "for": "0m",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "run {{ $labels.run }}: validation loss has not improved over "
                        "{{ $value }} evaluations"},
    },
]  # fmt: skip


def dashboard(uid: str) -> dict[str, Any]:
    """The Grafana dashboard ``uid`` as JSON (schema 39; a Prometheus data source named Prometheus)."""
    title, rows = DASHBOARDS[uid]
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row in rows:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        pid, y = pid + 1, y + 1
        for i, p in enumerate(row):
            panels.append(
                {
                    "id": pid,
                    "type": "timeseries",
                    "title": p.title,
                    "description": p.description,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                    "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
                    "targets": [
                        {"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend, "range": True}
                        for k, (expr, legend) in enumerate(p.queries)
                    ],
                }
            )
            pid += 1
        y += 8 * ((len(row) + 1) // 2)
    return {
        "uid": uid,
        "title": title,
        "tags": ["edgeray"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0}
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
        "description": "generated by edgeray.monitoring.dashboards; do not edit by hand",
    }


def panels() -> list[tuple[str, Panel]]:
    """Every panel as (dashboard uid, panel)."""
    return [(uid, p) for uid, (_, rows) in DASHBOARDS.items() for _, row in rows for p in row]


def rules() -> dict[str, Any]:
    """The alert rules file (Prometheus rule-file format)."""
    return {"groups": [{"name": "edgeray", "interval": "15s", "rules": ALERTS}]}


def files() -> dict[str, str]:
    """Every generated file, by path relative to GENERATED."""
    out = {f"grafana/{uid}.json": json.dumps(dashboard(uid), indent=2) + "\n" for uid in DASHBOARDS}
    out["prometheus/alerts.yml"] = (
        "# generated by edgeray.monitoring.dashboards; do not edit by hand\n"
        + yaml.safe_dump(rules(), sort_keys=False, width=120)
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write the files under {GENERATED}")
    args = parser.parse_args(argv)
    for rel, text in files().items():
        if args.write:
            path = GENERATED / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        else:
            print(f"--- {rel}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
