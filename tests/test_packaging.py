"""`pip install .` (not editable) gives a working `edgeray`: the wheel carries the topology presets.

The venv is fresh and edgeray is installed into it from the repository as a user would; its third-party
dependencies (ray, torch, ...) come from this environment through a .pth file rather than a multi-GB
download. The editable install of this environment is not visible there: .pth files are only read from
site directories, and the one naming this environment's site-packages is read as a plain path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_wheel_carries_every_preset_and_the_monitoring_files(tmp_path):
    out = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        tmp_path,
        dict(os.environ),
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("edgeray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("edgeray/presets/") for n in names if n.startswith("edgeray/presets/")}
    assert shipped == {p.name for p in (ROOT / "clusters").glob("*.yaml")}
    generated = ROOT / "edgeray" / "monitoring" / "generated"  # what `edgeray monitor` provisions
    assert {
        f"edgeray/monitoring/generated/{p.relative_to(generated)}"
        for p in generated.rglob("*")
        if p.is_file()
    } <= names


@pytest.mark.cluster
def test_pip_install_then_validate_up_and_down_from_another_directory(tmp_path, edgeray_home):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "zz_edgeray_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        **os.environ,
        "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}",
        "PYTHONPATH": "",
        "COLUMNS": "200",
    }
    env.pop("VIRTUAL_ENV", None)
    out = _run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(ROOT)], tmp_path, env
    )
    assert out.returncode == 0, out.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(py), "-c", "import edgeray; print(edgeray.__file__)"], elsewhere, env)
    assert str(site) in where.stdout, where.stdout + where.stderr  # the installed copy, not the repository
    cli = str(env_dir / "bin" / "edgeray")
    out = _run([cli, "validate", "local"], elsewhere, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "local" in out.stdout
    out = _run([cli, "up", "local", "--name", "pkgtest"], elsewhere, env)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        status = _run([cli, "status", "--name", "pkgtest"], elsewhere, env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "campus-jetson" in status.stdout
    finally:
        down = _run([cli, "down", "--name", "pkgtest"], elsewhere, env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _run([cli, "status", "--name", "pkgtest"], elsewhere, env).returncode != 0
