"""Notebooks run end to end, executed with nbclient. Their kernels inherit this session's environment, so
every notebook but 01 (which is about starting a cluster) runs on the shared cluster as it would after
`eval "$(edgeray env)"`, and must leave it clean.

Every cell runs, at the smoke size each notebook takes under ``EDGERAY_NOTEBOOK_QUICK=1`` (fewer steps and
sweep points; the same code paths). Their kernels work in a scratch directory beside a link to jobs/ (what
``sys.path.insert(0, Path.cwd().parent)`` finds), so the smoke-sized figures do not replace a user's in
notebooks/figures/."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import assert_clean

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.notebook
@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, local_cluster, tmp_path, monkeypatch):
    here = tmp_path / "notebooks"
    here.mkdir()
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    monkeypatch.setenv("EDGERAY_NOTEBOOK_QUICK", "1")  # the kernel inherits this process's environment
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(here)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    assert (here / "figures" / f"{path.stem}.png").stat().st_size > 10_000
    assert_clean()
