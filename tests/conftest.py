"""Shared fixtures. Cluster tests start real Ray clusters on loopback under a private EDGERAY_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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
