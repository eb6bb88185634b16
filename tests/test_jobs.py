"""Every training job in jobs/ can be submitted to one cluster twice at once and then again, as a user would
(`ray job submit` after `eval "$(edgeray env)"`): each run's groups are its own, and none leaves rendezvous
keys or actors behind."""

from __future__ import annotations

import json

import pytest

from edgeray.fabric.groups import live_keys
from edgeray.train.sync import prepare_data

from .conftest import assert_clean, run_bin, submit_job, submit_twice_at_once

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Few compute actors per run (two or three): what is tested is what runs leave behind on the cluster, that
# concurrent runs stay apart and that each job's outputs are right, and each actor process costs ~6 s of CPU
# to import torch and transformers.
JOBS = {
    "train_pipeline": [
        "--steps", "2", "--seq-len", "32", "--microbatches", "2", "--micro-batch-size", "2", "--stages", "2",
    ],
    # three workers in two regions (gossip pairs across them); the runs also check the job's outputs below
    "train_sync": [
        "--strategy", "gossip", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
        "--nodes", "campus-gw,campus-jetson,cloud-1", "--evals", "2",
    ],
    # three clients with secure aggregation, DP at a target epsilon
    "train_federated": [
        "--rounds", "2", "--local-steps", "1", "--secagg", "--clip", "1", "--target-epsilon", "8",
        "--batch-size", "2", "--seq-len", "32", "--nodes", "campus-gw,campus-jetson,cloud-1",
    ],
}  # fmt: skip
# jobs/train_moe.py: submitted twice at once, then again with --resume, in tests/test_moe.py's restart drill
# (its reference runs are those submissions)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_job_submitted_twice_at_once_and_again_runs_every_time(job, local_cluster, tmp_path):
    topo, _ = local_cluster
    args = list(JOBS[job])
    if job != "train_pipeline":
        args += ["--data", str(prepare_data(topo, tmp_path / "data", seq_len=32))]
    outs = [str(tmp_path / f"run{i}") for i in range(3)]
    runs = submit_twice_at_once(job, [[*args, "--out", outs[0]], [*args, "--out", outs[1]]])
    again = submit_job(job, [*args, "--out", outs[2]])
    log = again.communicate(timeout=600)[0]
    runs.append((again.returncode, log))
    for i, (code, log) in enumerate(runs):
        (tmp_path / f"run{i}.log").write_text(log)
        assert code == 0, f"run {i} of {job}:\n{log[-3000:]}"
    summaries = [json.loads((tmp_path / f"run{i}" / "summary.json").read_text()) for i in range(3)]
    # the same seed and data: the three runs, two of them side by side, trained the same model (federated:
    # its clients' DP noise comes from the OS's entropy, so only the privacy figures are the same)
    key = "epsilon" if job == "train_federated" else "final_val_loss"
    losses = [s.get(key, s.get("val_loss")) for s in summaries]
    assert losses[0] is not None and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert losses[0] == pytest.approx(losses[2], abs=1e-4)
    if job == "train_sync":  # `--nodes` picks the workers, `--evals` the evaluations
        _check_train_sync(tmp_path / "run0", summaries[0])
    if job == "train_federated":
        _check_train_federated(tmp_path / "run0", summaries[0])
    assert live_keys() == []
    assert_clean()


def _check_train_sync(out, summary):
    import numpy as np
    import pyarrow.parquet as pq

    nodes = ["campus-gw", "campus-jetson", "cloud-1"]
    assert summary["steps"] == 2 * len(nodes) and np.isfinite(summary["final_val_loss"])
    assert sorted(summary["nodes"]) == sorted(nodes) and len(summary["evals"]) == 3  # start, half, end
    assert summary["tokens"] == summary["steps"] * 2 * 32  # steps x batch size x sequence length
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    inter = sum(r["bytes"] for r in ledger if r["link_class"] == "inter-region")
    assert summary["inter_region_bytes"] == inter > 0  # gossip paired the regions
    assert summary["modelled_wall_s"] > 0 and (out / "checkpoint" / "config.json").exists()


def _check_train_federated(out, summary):
    import pyarrow.parquet as pq

    from edgeray.federated.audit import read_entries
    from edgeray.federated.dp import Accountant

    assert summary["strategy"] == "federated" and summary["secagg"] and summary["rounds"] == 2
    assert summary["clients_per_round"] == 3 and summary["dropped"] == 0 and summary["delta"] == 1 / 3
    assert summary["epsilon"] <= 8 and summary["secagg_client_ms"] > 0 and summary["secagg_server_ms"] > 0
    assert summary["epsilon"] == Accountant([(summary["noise_multiplier"], 1.0, 2)]).epsilon(1 / 3)
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert summary["inter_region_bytes"] == sum(
        r["bytes"] for r in ledger if r["link_class"] == "inter-region"
    )
    assert [e["round"] for e in read_entries(out / "audit.jsonl")] == [0, 1]
    log = run_bin("edgeray", "audit", "verify", str(out))
    assert log.returncode == 0, log.stdout + log.stderr
