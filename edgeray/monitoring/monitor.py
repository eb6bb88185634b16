"""Prometheus (and Grafana, where installed) for a local edgeray cluster.

    edgeray monitor --name N            # start both, provisioned with edgeray's dashboards and alert rules
    edgeray monitor --name N --check    # run every dashboard panel's query: which have data
    edgeray monitor --name N --stop     # stop them (``edgeray down`` stops them too)

Prometheus scrapes every node's metrics export port through the service-discovery file Ray keeps in the
cluster's temp dir, every 5 s, and loads the alert rules of edgeray.monitoring.dashboards. Its data lives in
``$EDGERAY_HOME/clusters/N/monitor/`` (or ``out=``), so it outlives the cluster. The processes run in
sessions of their own, recorded in the cluster's state like the raylets', so ``edgeray down`` stops them.

Neither is a Python package: Prometheus comes from the distribution (``apt-get install prometheus`` on
Debian and Ubuntu), Grafana from Grafana Labs' package repository (package ``grafana``). Without them
:func:`start` raises :class:`MonitorError` saying exactly that.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from edgeray import cluster as cl
from edgeray.atomic import write_atomic
from edgeray.errors import EdgerayError
from edgeray.monitoring.dashboards import DASHBOARDS, GENERATED, panels

SCRAPE_S = 5
PROMETHEUS_HINT = (
    "Prometheus is not installed (no `prometheus` on PATH): on Debian or Ubuntu `apt-get install prometheus` "
    "(it brings `promtool` too); elsewhere your distribution's prometheus package"
)
GRAFANA_HINT = (
    "Grafana is not installed (no `grafana` or `grafana-server` on PATH): install package `grafana` from "
    "Grafana Labs' APT or YUM repository, then run `edgeray monitor` again; meanwhile Prometheus's own page "
    "graphs every panel's query (`edgeray monitor --check` lists them)"
)


class MonitorError(EdgerayError):
    """Monitoring cannot start (a missing program, a port, a cluster without a temp dir)."""


@dataclass
class Monitor:
    cluster: str
    dir: str
    prometheus_url: str
    prometheus_pid: int
    grafana_url: str | None = None
    grafana_pid: int | None = None
    started_at: float = 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record(name: str) -> Path:
    return cl.state_dir(name) / "monitor.json"


def load(name: str) -> Monitor | None:
    path = _record(name)
    if not path.exists():
        return None
    return Monitor(**json.loads(path.read_text()))


def discovery_file(state: cl.ClusterState) -> Path:
    """The file Ray keeps listing every node's metrics endpoint."""
    if not state.temp_dir:
        raise MonitorError(
            f"cluster {state.name!r} was attached, not started by edgeray: no temp dir to read"
        )
    path = Path(state.temp_dir) / "prom_metrics_service_discovery.json"
    if not path.exists():
        raise MonitorError(f"{path} is missing: is cluster {state.name!r} up? (`edgeray status`)")
    return path


def prometheus_config(state: cl.ClusterState, rules: Path) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(discovery_file(state))], "refresh_interval": "5s"}],
            }
        ],
    }


def start(
    name: str,
    *,
    out: Path | None = None,
    grafana: bool = True,
    timeout_s: float = 60.0,
    progress: Any = print,
) -> Monitor:
    """Start Prometheus (and Grafana when installed and ``grafana``) for cluster ``name``."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise MonitorError(PROMETHEUS_HINT)
    state = cl.load_state(name)
    running = load(name)
    if running is not None and _alive(running.prometheus_pid):
        raise MonitorError(
            f"cluster {name!r} is already monitored: Prometheus at {running.prometheus_url} (stop it with "
            f"`edgeray monitor --name {name} --stop`)"
        )
    mdir = (out or cl.state_dir(name) / "monitor").resolve()
    mdir.mkdir(parents=True, exist_ok=True)
    rules = mdir / "alerts.yml"
    shutil.copyfile(GENERATED / "prometheus" / "alerts.yml", rules)
    config = mdir / "prometheus.yml"
    write_atomic(config, yaml.safe_dump(prometheus_config(state, rules), sort_keys=False))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _spawn(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={mdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=7d",
        ],
        mdir / "prometheus.log",
    )
    _adopt(name, "monitor-prometheus", proc.pid)
    monitor = Monitor(name, str(mdir), url, proc.pid, started_at=time.time())
    try:
        _wait_ready(url + "/-/ready", proc, mdir / "prometheus.log", timeout_s)
        progress(f"Prometheus at {url} (config {config}, data {mdir / 'data'})")
        if grafana:
            _start_grafana(monitor, mdir, timeout_s, progress)
    except BaseException:
        stop(name, monitor)
        raise
    write_atomic(_record(name), json.dumps(asdict(monitor), indent=2))
    return monitor


def _spawn(args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            args,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )


def _adopt(name: str, key: str, pid: int) -> None:
    """Record ``pid``'s session with the cluster's processes, so ``edgeray down`` stops it too."""
    state = cl.load_state(name)
    state.sessions[key] = pid
    cl.save_state(state)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    program = log.stem
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MonitorError(f"{program} exited with {proc.returncode}; its log {log}:\n"
                               + cl._tail(log))  # fmt: skip
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.5)
    raise MonitorError(f"{url} did not answer within {timeout_s:.0f} s; log {log}:\n" + cl._tail(log))


def _start_grafana(monitor: Monitor, mdir: Path, timeout_s: float, progress: Any) -> None:
    binary = shutil.which("grafana") or shutil.which("grafana-server")
    if binary is None:
        progress(GRAFANA_HINT)
        return
    home = next(
        (p for p in (Path("/usr/share/grafana"), Path("/usr/local/share/grafana")) if p.exists()), None
    )
    if home is None:
        progress(f"{binary} found but not its home (/usr/share/grafana): Grafana not started")
        return
    gdir = mdir / "grafana"
    prov = gdir / "provisioning"
    (prov / "datasources").mkdir(parents=True, exist_ok=True)
    (prov / "dashboards").mkdir(parents=True, exist_ok=True)
    datasource = {"apiVersion": 1, "datasources": [
        {"name": "Prometheus", "type": "prometheus", "access": "proxy", "url": monitor.prometheus_url,
         "isDefault": True}]}  # fmt: skip
    write_atomic(prov / "datasources" / "edgeray.yml", yaml.safe_dump(datasource))
    providers = [{"name": "edgeray", "folder": "edgeray", "type": "file",
                  "options": {"path": str(GENERATED / "grafana")}}]  # fmt: skip
    state = cl.load_state(monitor.cluster)
    ray_dash = Path(state.temp_dir or "") / "session_latest" / "metrics" / "grafana" / "dashboards"
    if ray_dash.exists():  # Ray's own dashboards, beside edgeray's
        providers.append({"name": "ray", "folder": "Ray", "type": "file", "options": {"path": str(ray_dash)}})
    write_atomic(
        prov / "dashboards" / "edgeray.yml", yaml.safe_dump({"apiVersion": 1, "providers": providers})
    )
    port = _free_port()
    ini = gdir / "grafana.ini"
    write_atomic(ini, "\n".join([
        "[paths]", f"data = {gdir / 'data'}", f"logs = {gdir / 'logs'}", f"plugins = {gdir / 'plugins'}",
        f"provisioning = {prov}", "[server]", "http_addr = 127.0.0.1", f"http_port = {port}",
        "[auth.anonymous]", "enabled = true", "org_role = Viewer", "[analytics]", "reporting_enabled = false",
        "check_for_updates = false", ""]))  # fmt: skip
    args = [binary, "server"] if Path(binary).name == "grafana" else [binary]
    proc = _spawn([*args, f"--homepath={home}", f"--config={ini}"], gdir / "grafana.log", cwd=home)
    _adopt(monitor.cluster, "monitor-grafana", proc.pid)
    monitor.grafana_pid, monitor.grafana_url = proc.pid, f"http://127.0.0.1:{port}"
    _wait_ready(monitor.grafana_url + "/api/health", proc, gdir / "grafana.log", timeout_s)
    progress(f"Grafana at {monitor.grafana_url}: dashboards in folder 'edgeray' ({', '.join(DASHBOARDS)})")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(name: str, monitor: Monitor | None = None) -> list[int]:
    """Stop cluster ``name``'s Prometheus and Grafana; their data stays. Returns the PIDs stopped."""
    import psutil

    monitor = monitor or load(name)
    if monitor is None:
        return []
    procs = []
    for pid in (monitor.prometheus_pid, monitor.grafana_pid):
        if pid and _alive(pid):
            procs.extend(cl.session_processes(pid))
    cl._terminate(procs)
    with contextlib.suppress(cl.ClusterError, psutil.Error):
        state = cl.load_state(name)
        for key in ("monitor-prometheus", "monitor-grafana"):
            state.sessions.pop(key, None)
        cl.save_state(state)
    with contextlib.suppress(FileNotFoundError):
        _record(name).unlink()
    return [p.pid for p in procs]


def query_range(
    url: str, expr: str, start: float, end: float, step_s: float = SCRAPE_S
) -> list[dict[str, Any]]:
    """Prometheus's ``/api/v1/query_range`` result for ``expr`` (raises MonitorError on a failed query)."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise MonitorError(f"Prometheus refused {expr!r}: {exc.read().decode(errors='replace')}") from None
    if body.get("status") != "success":
        raise MonitorError(f"Prometheus failed {expr!r}: {body}")
    return list(body["data"]["result"])


def check(url: str, start: float, end: float) -> list[dict[str, Any]]:
    """Every dashboard panel's queries over ``[start, end]``: how many series have a number (not NaN)."""
    # Prometheus evaluates a range at start, start + step, ...: align it so that ``end`` itself is one of
    # them (a series first scraped in the last step would otherwise be missed).
    start = end - math.ceil((end - start) / SCRAPE_S) * SCRAPE_S
    rows = []
    for uid, panel in panels():
        series = 0
        for expr, _ in panel.queries:
            for s in query_range(url, expr, start, end):
                if any(math.isfinite(float(v)) for _, v in s["values"]):
                    series += 1
        rows.append({"dashboard": uid, "panel": panel.title, "series": series, "has_data": series > 0,
                     "fed_by": panel.fed_by})  # fmt: skip
    return rows


def _legend(template: str, labels: dict[str, str]) -> str:
    """A Grafana legend format (``{{region}} {{clock}}``) filled from a series' labels."""
    import re

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def render(url: str, start: float, end: float, out: Path) -> list[Path]:
    """Every dashboard as a PNG of its panels (the series Prometheus holds over ``[start, end]``, legends
    from the panel's legend formats): what Grafana would show, for a machine without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    start = end - math.ceil((end - start) / SCRAPE_S) * SCRAPE_S
    written = []
    for uid, (title, rows) in DASHBOARDS.items():
        shown = [p for _, row in rows for p in row]
        cols = 2
        fig, axes = plt.subplots(
            (len(shown) + cols - 1) // cols, cols, figsize=(13, 3.2 * ((len(shown) + 1) // 2)), squeeze=False
        )
        for ax, panel in zip(axes.flat, shown, strict=False):
            for expr, legend in panel.queries:
                for series in query_range(url, expr, start, end):
                    points = [
                        (float(t) - start, float(v)) for t, v in series["values"] if math.isfinite(float(v))
                    ]
                    if not points:
                        continue
                    label = _legend(legend, series["metric"])
                    ax.plot(*zip(*points, strict=True), marker=".", ms=3, lw=1, label=label)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel("s since start", fontsize=8)
            ax.set_ylabel(panel.unit, fontsize=8)
            if ax.has_data():
                ax.legend(fontsize=6, loc="best")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        for ax in list(axes.flat)[len(shown) :]:
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1, 0.985))  # room for the title
        path = out / f"{uid}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def rules_loaded(url: str) -> list[dict[str, Any]]:
    """The alert rules Prometheus has loaded: name, health, state."""
    with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=10) as resp:
        body = json.loads(resp.read())
    return [
        {"name": r["name"], "health": r.get("health"), "state": r.get("state")}
        for g in body["data"]["groups"]
        for r in g["rules"]
    ]
