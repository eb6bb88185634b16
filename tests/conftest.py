"""Shared fixtures. Cluster tests start real Ray clusters on loopback under a private EDGERAY_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED = "t-local"
_EXIT = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own exit status once everything is reported. One full run crashed
    (SIGSEGV) in the interpreter's teardown of native extensions after its summary was printed and every
    cluster was down, which turned a passing suite into a failing `make test`; nothing is left to run at
    this point, so the teardown is skipped."""
    code = config.stash.get(_EXIT, None)
    if code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the shared cluster is a ``cluster`` test; every other test without that mark is a ``unit``
    test (no Ray cluster): ``pytest -m unit``."""
    for item in items:
        if "local_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
        if item.get_closest_marker("cluster") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def edgeray_home() -> Iterator[Path]:
    """A private EDGERAY_HOME for the whole run, so tests never see or stop a user's clusters."""
    home = Path(tempfile.mkdtemp(prefix="edgeray-test-home-"))
    old = os.environ.get("EDGERAY_HOME")
    os.environ["EDGERAY_HOME"] = str(home)
    yield home
    from edgeray import cluster

    for name in cluster.list_clusters():  # a failed test must not leave raylets behind
        cluster.down(name)
    if old is None:
        os.environ.pop("EDGERAY_HOME", None)
    else:
        os.environ["EDGERAY_HOME"] = old
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def local_cluster(edgeray_home) -> Iterator[tuple[Any, Any]]:
    """The `local` preset as one 6-node labelled cluster shared by every cluster test and notebook of the
    session (starting it per module cost a third of the suite). This process is its driver, and the
    environment carries its address and token, so subprocesses (`ray job submit`, notebook kernels) reach
    it too. Each module leaves it clean: :func:`assert_clean` after the module's last test.

    ``EDGERAY_TEST_TLS=1`` starts it with ``--tls`` (mutual TLS on Ray's gRPC; this process and every
    subprocess get the drivers' certificate through the environment): the cluster suite on a TLS cluster.
    ``EDGERAY_TEST_WAN=1`` starts it with ``--wan`` (every raylet in its own network namespace behind the
    packet-level router, edgeray.wan): the cluster suite over emulated links."""
    import ray

    from edgeray import cluster
    from edgeray.topology import load_topology, resolve_topology_path

    topo = load_topology(resolve_topology_path("local"))
    state = cluster.up(
        topo,
        name=SHARED,
        tls=os.environ.get("EDGERAY_TEST_TLS") == "1",
        wan=os.environ.get("EDGERAY_TEST_WAN") == "1",
    )
    saved = dict(os.environ)
    cluster.use_cluster(state)
    ray.init(logging_level="ERROR", log_to_driver=False)
    try:
        yield topo, state
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        cluster.down(SHARED)


def assert_clean(timeout_s: float = 30) -> None:
    """No rendezvous keys, no live actors and no CPU reservations (placement groups) left behind on the
    shared cluster (actors just killed may take a moment to be reported dead)."""
    import time

    import ray
    from ray.util.state import list_actors

    from edgeray.fabric.groups import live_keys

    deadline = time.monotonic() + timeout_s
    while True:
        keys = live_keys()
        alive = [
            f"{a.class_name} ({a.actor_id[:8]})"
            for a in list_actors(filters=[("state", "=", "ALIVE")], timeout=30)
            if not a.class_name.startswith(("ServeController", "ProxyActor"))
        ]
        groups = [
            g["name"] or g["placement_group_id"][:8]
            for g in ray.util.placement_group_table().values()
            if g["state"] != "REMOVED"
        ]
        if not keys and not alive and not groups:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left on the shared cluster: keys {keys}, actors {alive}, groups {groups}")
        time.sleep(1)


def run_bin(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run a console script of this environment (edgeray, ray, serve) from the repo root."""
    return subprocess.run(
        [str(BIN / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run the real `edgeray` console script."""
    return run_bin("edgeray", *args, env=env, timeout=timeout)


def submit_job(script: str, args: list[str]) -> subprocess.Popen:
    """`ray job submit --working-dir <repo> -- python jobs/<script>.py ARGS` on the cluster this session's
    environment names, as a user does after `eval "$(edgeray env)"`; stdout and stderr together."""
    return subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT), "--", "python", f"jobs/{script}.py", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=dict(os.environ),
    )  # fmt: skip


def submit_twice_at_once(
    script: str, args_each: list[list[str]], timeout: float = 600
) -> list[tuple[int, str]]:
    """Two submissions of one job running side by side on one cluster: (return code, log) of each. Ray unpacks
    a job's working_dir per submission and removes a copy already there (packaging.py's
    download_and_unpack_package with overwrite=True), so two submissions of one directory in the same instant
    can pull the first one's cwd from under it: the second starts once the first runs."""
    first = submit_job(script, args_each[0])
    head = []
    assert first.stdout is not None
    for line in first.stdout:
        head.append(line)
        if "Running entrypoint" in line:
            break
    together = [first, submit_job(script, args_each[1])]
    logs = [p.communicate(timeout=timeout)[0] for p in together]
    logs[0] = "".join(head) + logs[0]
    return [(p.returncode, log) for p, log in zip(together, logs, strict=True)]


def collect_streams(engine: Any, requests: list[Any]) -> list[list[Any]]:
    """Start an edgeray engine, stream every request at once, and return each one's deltas."""
    import asyncio

    async def run() -> list[list[Any]]:
        await engine.start()
        try:

            async def one(r: Any) -> list[Any]:
                return [d async for d in engine.stream(r)]

            return list(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def scrape(name: str, **labels: str) -> list[Any]:
    """Samples of metric ``name`` whose labels include ``labels``, read from every live node's Prometheus
    endpoint of the connected cluster (Ray's metrics export port) with prometheus_client's parser."""
    import ray
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        try:
            text = requests.get(
                f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=5
            ).text
        except requests.RequestException:
            continue
        found += [
            s
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
    return found


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` once a second until it returns something true; fail naming ``what`` after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(1)
    return result
