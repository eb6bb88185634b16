"""edgeray's dashboards and alert rules: generated files in sync with their generator, every query over
metrics edgeray or Ray exports, the rules accepted and evaluated by Prometheus's own checker (promtool) on
series built to sit just above and below each threshold of the seed's table.

The live side (metrics scraped from a running cluster, every panel with data, Prometheus started and
stopped by `edgeray monitor`) is in test_pipeline.py (training) and test_serve.py (serving), on the shared
cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from edgeray.monitoring import dashboards, monitor
from edgeray.monitoring.catalogue import METRICS, PROMETHEUS_PREFIX, RAY_NODE
from edgeray.monitoring.export import TrainMetrics
from edgeray.topology import load_topology, resolve_topology_path

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=monitor.PROMETHEUS_HINT)


def test_the_generated_dashboards_and_rules_are_what_the_generator_makes():
    """Nobody edits them by hand: `python -m edgeray.monitoring.dashboards --write` regenerates them."""
    made = dashboards.files()
    on_disk = {
        str(p.relative_to(dashboards.GENERATED)): p.read_text()
        for p in dashboards.GENERATED.rglob("*")
        if p.is_file()
    }
    assert on_disk == made


def _series_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers followed by a selector, an operator or the end)."""
    words = set(re.findall(r"\b(ray_[a-z0-9_]+)\b", expr))
    return words


def test_every_query_reads_a_metric_edgeray_or_ray_exports():
    known = set(RAY_NODE)
    for m in METRICS.values():
        base = PROMETHEUS_PREFIX + m.name
        known |= {base, base + "_total", base + "_bucket", base + "_sum", base + "_count"}
    queries = [expr for _, p in dashboards.panels() for expr, _ in p.queries]
    queries += [a["expr"] for a in dashboards.ALERTS]
    used = set().union(*(_series_names(q) for q in queries))
    assert used and used <= known, used - known
    # and every metric in the catalogue is on some dashboard
    shown = {PROMETHEUS_PREFIX + m.name for m in METRICS.values()}
    assert {n for n in shown if not any(n in q for q in queries)} == set()
    # each grafana file is a dashboard whose panels carry those queries
    for uid in dashboards.DASHBOARDS:
        board = dashboards.dashboard(uid)
        exprs = [t["expr"] for p in board["panels"] if p["type"] == "timeseries" for t in p["targets"]]
        assert exprs and all(e in queries for e in exprs)


@needs_promtool
def test_promtool_accepts_the_alert_rules():
    rules = dashboards.GENERATED / "prometheus" / "alerts.yml"
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 4 rules found" in done.stdout


def _bucket_series(metric: str, region: str, per_bucket: dict[str, int]) -> list[dict[str, str]]:
    """Cumulative histogram buckets growing by ``per_bucket[le]`` requests every interval."""
    return [
        {"series": f'{metric}_bucket{{region="{region}",le="{le}"}}', "values": f"0+{n}x60"}
        for le, n in per_bucket.items()
    ]


@needs_promtool
def test_each_alert_fires_just_over_the_seeds_threshold_and_not_under(tmp_path: Path):
    """promtool evaluates the rules over series built by hand: p95 TTFT 99 ms in metro (a bucket 80..100 ms,
    linear inside it: 80 + 20 * 0.95) fires, 47.5 ms in campus does not; a 40 ms round trip inside a region
    fires, 2 ms and a 60 ms inter-region path do not; memory 95% fires, 80% does not; three evaluations
    without a better loss fire, two do not."""
    shutil.copyfile(dashboards.GENERATED / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    ttft = "ray_edgeray_serve_ttft_ms"
    run = 'app="pipeline",strategy="pipeline",run="r"'
    series = [
        *_bucket_series(ttft, "metro", {"50": 0, "80": 0, "100": 10, "+Inf": 10}),
        *_bucket_series(ttft, "campus", {"50": 10, "80": 10, "100": 10, "+Inf": 10}),
        {"series": f'ray_edgeray_link_rtt_ms{{{run},src_region="metro",dst_region="metro",link_class="intra-region"}}',
         "values": "40x60"},
        {"series": f'ray_edgeray_link_rtt_ms{{{run},src_region="campus",dst_region="campus",link_class="intra-region"}}',
         "values": "2x60"},
        {"series": f'ray_edgeray_link_rtt_ms{{{run},src_region="campus",dst_region="cloud",link_class="inter-region"}}',
         "values": "60x60"},
        {"series": 'ray_node_mem_used{instance="a"}', "values": "95x60"},
        {"series": 'ray_node_mem_total{instance="a"}', "values": "100x60"},
        {"series": 'ray_node_mem_used{instance="b"}', "values": "80x60"},
        {"series": 'ray_node_mem_total{instance="b"}', "values": "100x60"},
        {"series": f"ray_edgeray_train_evals_since_best{{{run}}}", "values": "0 1 2 2 3 3"},
    ]  # fmt: skip
    labels = {"app": "pipeline", "strategy": "pipeline", "run": "r"}
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "EdgerayInferenceLatencyP95High", "exp_alerts": []},
                    {"eval_time": "7m", "alertname": "EdgerayInferenceLatencyP95High", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "region": "metro"},
                         "exp_annotations": {"summary": "p95 time to first token in region metro is 99 ms (> 80 ms)"}}]},
                    {"eval_time": "7m", "alertname": "EdgerayRegionalRTTHigh", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "src_region": "metro", "dst_region": "metro"},
                         "exp_annotations": {"summary": "round trip inside region metro is 40 ms (> 30 ms)"}}]},
                    {"eval_time": "7m", "alertname": "EdgerayNodeMemoryHigh", "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "instance": "a"},
                         "exp_annotations": {"summary": "node a uses 95% of its memory (> 90%)"}}]},
                    {"eval_time": "45s", "alertname": "EdgerayTrainingLossStagnant", "exp_alerts": []},
                    {"eval_time": "60s", "alertname": "EdgerayTrainingLossStagnant", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", **labels},
                         "exp_annotations": {"summary": "run r: validation loss has not improved over 3 evaluations"}}]},
                ],
            }
        ],
    }  # fmt: skip
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_evaluations_since_the_best_loss_count_as_the_stagnation_alert_reads_them():
    m = TrainMetrics(load_topology(resolve_topology_path("local")), app="sync", strategy="diloco", run="r")
    try:  # with or without a Ray connection in this process (it sends nothing without one)
        assert [m.evaluation(v) for v in (5.0, 4.0, 4.5, 4.2, 4.0, 3.9, 3.9)] == [0, 0, 1, 2, 3, 0, 1]
    finally:
        m.close()


def test_monitor_says_what_to_install_when_prometheus_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(monitor.MonitorError, match=r"apt-get install prometheus"):
        monitor.start("any")


def test_the_prometheus_config_scrapes_ray_s_discovery_file_and_loads_the_rules(tmp_path):
    from edgeray.cluster import ClusterState

    (tmp_path / "prom_metrics_service_discovery.json").write_text('[{"labels": {}, "targets": []}]')
    state = ClusterState(name="c", topology_path="", topology_name="local", address="127.0.0.2:1",
                         dashboard_url="", serve_port=0, auth_mode="token", token_path=None,
                         temp_dir=str(tmp_path))  # fmt: skip
    config = monitor.prometheus_config(state, tmp_path / "alerts.yml")
    assert config["rule_files"] == [str(tmp_path / "alerts.yml")]
    sd = config["scrape_configs"][0]["file_sd_configs"][0]["files"]
    assert sd == [str(tmp_path / "prom_metrics_service_discovery.json")]
    if PROMTOOL:  # Prometheus's own checker accepts the file
        shutil.copyfile(dashboards.GENERATED / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
        (tmp_path / "p.yml").write_text(yaml.safe_dump(config))
        done = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "p.yml")], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(monitor.MonitorError, match="attached"):
        monitor.discovery_file(ClusterState(**{**state.__dict__, "temp_dir": None}))
