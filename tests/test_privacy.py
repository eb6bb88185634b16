"""Differential privacy (edgeray.federated.dp) against dp-accounting and the Gaussian mechanism's formulas, and
the audit log (edgeray.federated.audit) against edits, removals, reorderings and truncation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeray.federated.audit import AuditError, AuditLog, verify
from edgeray.federated.dp import (
    Accountant,
    DPConfig,
    DPError,
    client_noise_std,
    clip_update,
    noise_multiplier_for,
    noise_std,
)

from .conftest import run_cli


def _dp_accounting_epsilon(history, delta):
    """From scratch, one round at a time: the independent computation the run's reported epsilon must equal."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    for z, q, n in history:
        for _ in range(n):
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return acc.get_epsilon(delta)


def test_the_accountant_equals_an_independent_dp_accounting_computation_of_its_history():
    # the published reference point: sigma 1, q 0.01, 1000 steps, delta 1e-5 -> 2.1014 (Opacus RDP and
    # dp-accounting agree on it)
    acc = Accountant()
    for _ in range(1000):
        acc.step(1.0, 0.01)
    assert acc.history() == [(1.0, 0.01, 1000)]
    assert acc.epsilon(1e-5) == pytest.approx(2.1014, abs=1e-4)
    # a run whose noise and sampling change between rounds, maintained round by round
    acc = Accountant()
    for z, q, n in [(1.1, 0.05, 7), (0.8, 0.1, 3), (2.0, 0.02, 5), (1.1, 0.05, 2)]:
        for _ in range(n):
            acc.step(z, q)
        eps = acc.epsilon(1e-5)
        assert abs(eps - _dp_accounting_epsilon(acc.history(), 1e-5)) <= 1e-6
    assert [n for *_, n in acc.history()] == [7, 3, 5, 2] and eps > 0
    assert Accountant().epsilon(1e-5) == 0.0


def test_a_target_epsilon_becomes_the_smallest_noise_that_meets_it():
    z = noise_multiplier_for(8.0, 1e-3, 0.1, 50)
    eps = Accountant([(z, 0.1, 50)]).epsilon(1e-3)
    assert eps <= 8.0 and eps == pytest.approx(8.0, rel=1e-3)
    assert Accountant([(z * 0.99, 0.1, 50)]).epsilon(1e-3) > 8.0  # any less noise breaks the budget
    config = DPConfig(clip=0.5, target_epsilon=8.0).resolve(population=1000, sample_rate=0.1, rounds=50)
    assert config.delta == 1e-3 and config.noise_multiplier == pytest.approx(z, rel=1e-6)


def test_clipping_and_noise_follow_the_gaussian_mechanism():
    rng = np.random.default_rng(0)
    big = rng.normal(size=1000) * 10
    clipped, factor = clip_update(big, 2.0)
    assert np.linalg.norm(clipped) == pytest.approx(2.0) and factor == pytest.approx(
        2.0 / np.linalg.norm(big)
    )
    small = big / np.linalg.norm(big)  # norm 1 <= C: untouched
    assert np.array_equal(clip_update(small, 2.0)[0], small) and clip_update(small, 2.0)[1] == 1.0
    config = DPConfig(clip=2.0, noise_multiplier=1.5)
    assert noise_std(config) == 3.0
    # spread over 16 clients (secure aggregation), the sum's noise has the central mechanism's scale
    per_client = client_noise_std(config, 16)
    assert per_client == pytest.approx(3.0 / 4)
    sums = rng.normal(0, per_client, size=(16, 200_000)).sum(axis=0)
    assert sums.std() == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize(
    "config, population, match",
    [
        (
            DPConfig(clip=1.0, noise_multiplier=0.0),
            100,
            r"noise_multiplier = 0.0: must be > 0 \(0 is no privacy",
        ),
        (DPConfig(clip=1.0), 100, "DP on needs one of them"),
        (DPConfig(clip=0.0, noise_multiplier=1.0), 100, "clip = 0.0: must be > 0"),
        (
            DPConfig(clip=1.0, noise_multiplier=1.0, delta=0.05),
            100,
            r"delta = 0.05: must be <= 1/population = 0.01",
        ),
        (DPConfig(clip=1.0, noise_multiplier=1.0, target_epsilon=3.0), 100, "give one, not both"),
        (DPConfig(clip=1.0, target_epsilon=-1.0), 100, "target_epsilon = -1.0: must be > 0"),
    ],
)
def test_privacy_parameters_that_cannot_be_honoured_are_refused_by_name(config, population, match):
    with pytest.raises(DPError, match=match):
        config.resolve(population, 0.1, 10)


# --- audit log ---------------------------------------------------------------------------------------------


def _log(tmp_path, rounds=5):
    log = AuditLog(tmp_path / "audit.jsonl")
    for r in range(rounds):
        log.append(round=r, participants=[1, 2, 3 + r], dropouts=[], clip=1.0, noise_multiplier=1.1,
                   epsilon=0.5 * (r + 1), model_hash=f"{r:064x}", config_hash="c" * 64)  # fmt: skip
    return log


def _lines(tmp_path):
    return (tmp_path / "audit.jsonl").read_text().splitlines()


def _write(tmp_path, lines):
    (tmp_path / "audit.jsonl").write_text("\n".join(lines) + "\n")


def test_an_intact_log_verifies_and_every_kind_of_tampering_is_named(tmp_path):
    _log(tmp_path)
    assert verify(tmp_path) == []
    good = _lines(tmp_path)
    # edited: round 2's epsilon lowered
    e = json.loads(good[2])
    e["epsilon"] = 0.1
    _write(tmp_path, [*good[:2], json.dumps(e), *good[3:]])
    assert verify(tmp_path) == ["line 3 (seq 2): edited (its hash does not match its contents)"]
    # removed: round 1 gone
    _write(tmp_path, [good[0], *good[2:]])
    problems = verify(tmp_path)
    assert any(p.startswith("line 2 (seq 2): out of place") for p in problems)
    assert any(p.startswith("line 2 (seq 2): does not follow the entry before it") for p in problems)
    # reordered: rounds 3 and 4 swapped
    _write(tmp_path, [*good[:3], good[4], good[3]])
    problems = verify(tmp_path)
    assert any(p.startswith("line 4 (seq 4): out of place") for p in problems)
    assert any(p.startswith("line 5 (seq 3)") for p in problems)
    # cut off the end: the head still names seq 4
    _write(tmp_path, good[:3])
    assert verify(tmp_path) == [
        f"{tmp_path / 'audit.head'}: names seq 4 but the log ends at seq 2 (entries were cut off the end, or "
        "the head was edited)"
    ]
    # a resumed run refuses to append to a tampered log
    with pytest.raises(AuditError, match="fails verification, not appending to it"):
        AuditLog(tmp_path / "audit.jsonl")


def test_an_append_interrupted_before_its_head_is_reported_and_repaired_on_resume(tmp_path):
    log = _log(tmp_path, 3)
    head = (tmp_path / "audit.head").read_text()
    log.append(round=3, participants=[1], dropouts=[2])
    (tmp_path / "audit.head").write_text(head)  # the crash: the log has entry 3, the head still names 2
    [problem] = verify(tmp_path)
    assert "one entry behind the log (seq 3 is past it): an append was interrupted" in problem
    resumed = AuditLog(tmp_path / "audit.jsonl")
    assert verify(tmp_path) == [] and len(resumed.entries) == 4
    resumed.append(round=4, participants=[1, 2], dropouts=[])
    assert verify(tmp_path) == [] and [json.loads(x)["seq"] for x in _lines(tmp_path)] == [0, 1, 2, 3, 4]
    with pytest.raises(AuditError, match=r"fields \['hash'\] are set by the log itself"):
        resumed.append(hash="x")


def test_edgeray_audit_verify_names_the_tampered_entry(tmp_path):
    _log(tmp_path, 3)
    ok = run_cli("audit", "verify", str(tmp_path))
    assert ok.returncode == 0 and "intact: 3 entries, head seq 2" in ok.stdout
    lines = _lines(tmp_path)
    e = json.loads(lines[1])
    e["dropouts"] = [7]
    _write(tmp_path, [lines[0], json.dumps(e), lines[2]])
    bad = run_cli("audit", "verify", str(tmp_path))
    assert bad.returncode == 1 and "tampered: line 2 (seq 1): edited" in bad.stderr
