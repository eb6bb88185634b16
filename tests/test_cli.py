"""The `edgeray` command as a user runs it: exit codes, messages, never a traceback."""

from __future__ import annotations

import yaml

from .conftest import ROOT, run_cli


def test_validate_prints_a_summary_and_exits_0():
    out = run_cli("validate", "clusters/local.yaml")
    assert out.returncode == 0, out.stderr
    for word in ("campus", "metro", "cloud", "campus <-> metro", "nearest from campus", "valid"):
        assert word in out.stdout
    assert len(out.stdout.splitlines()) <= 40  # one screen


def test_validate_accepts_preset_names():
    assert run_cli("validate", "continental").returncode == 0


def test_validate_bad_file_exits_2_with_field_path_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nregions:\n  - name: a\n    tier: micro\n    nodes: [{name: a-1, bandwidth_mbps: -5}]\n"
    )
    out = run_cli("validate", str(bad))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    assert str(bad) in out.stderr
    assert "line 5: regions[0].nodes[0].bandwidth_mbps = -5: must be greater than 0" in out.stderr


def test_validate_missing_file_and_yaml_error(tmp_path):
    out = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "no such topology file" in out.stderr and "presets are" in out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nregions: [\n")
    out = run_cli("validate", str(broken))
    assert out.returncode == 2 and "YAML syntax error" in out.stderr and "Traceback" not in out.stderr


def test_cluster_commands_without_a_cluster_explain(edgeray_home):
    for args in (["status", "--name", "ghost"], ["env", "--name", "ghost"]):
        out = run_cli(*args)
        assert out.returncode == 2 and "no edgeray cluster named 'ghost'" in out.stderr
        assert "Traceback" not in out.stderr
    out = run_cli("down", "--name", "ghost")
    assert out.returncode == 0  # idempotent


def test_export_writes_the_committed_manifests():
    for kind in ("launcher", "kuberay"):
        out = run_cli("export", kind, "clusters/continental.yaml")
        assert out.returncode == 0, out.stderr
        committed = (ROOT / "clusters" / "deploy" / f"continental-{kind}.yaml").read_text()
        assert yaml.safe_load(out.stdout) == yaml.safe_load(committed), (
            f"regenerate clusters/deploy for {kind}"
        )
