"""Every training job in jobs/ can be submitted to one cluster twice at once and then again, as a user would
(`ray job submit` after `eval "$(edgeray env)"`): each run's groups are its own, and none leaves rendezvous
keys or actors behind."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from edgeray.fabric.groups import live_keys
from edgeray.train.sync import prepare_data

from .conftest import BIN, ROOT, assert_clean

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Two compute actors per run: what is tested is what runs leave behind on the cluster and that concurrent runs
# stay apart, and each actor process costs ~6 s of CPU to import torch and transformers.
JOBS = {
    "train_pipeline": [
        "--steps", "2", "--seq-len", "32", "--microbatches", "2", "--micro-batch-size", "2", "--stages", "2",
    ],
    "train_sync": [
        "--strategy", "diloco", "--steps", "2", "--seq-len", "32", "--diloco-h", "1",
        "--nodes", "campus-gw,cloud-1", "--evals", "1",
    ],
    "train_moe": ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--experts", "2"],
}  # fmt: skip


def _submit(job: str, args: list[str], out: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT), "--",
         "python", f"jobs/{job}.py", *args, "--out", out],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=dict(os.environ),
    )  # fmt: skip


@pytest.mark.timeout(900)
@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_job_submitted_twice_at_once_and_again_runs_every_time(job, local_cluster, tmp_path):
    topo, _ = local_cluster
    args = list(JOBS[job])
    if job != "train_pipeline":
        args += ["--data", str(prepare_data(topo, tmp_path / "data", seq_len=32))]
    outs = [str(tmp_path / f"run{i}") for i in range(3)]
    first = _submit(job, args, outs[0])
    # Ray unpacks a job's working_dir per submission and removes a copy already there (packaging.py's
    # download_and_unpack_package with overwrite=True), so two submissions of one directory in the same
    # instant can pull the first one's cwd from under it: start the second once the first runs.
    head = []
    assert first.stdout is not None
    for line in first.stdout:
        head.append(line)
        if "Running entrypoint" in line:
            break
    together = [first, _submit(job, args, outs[1])]
    logs = [p.communicate(timeout=600)[0] for p in together]
    logs[0] = "".join(head) + logs[0]
    again = _submit(job, args, outs[2])
    logs.append(again.communicate(timeout=600)[0])
    for i, (p, log) in enumerate(zip([*together, again], logs, strict=True)):
        (tmp_path / f"run{i}.log").write_text(log)
        assert p.returncode == 0, f"run {i} of {job}:\n{log[-3000:]}"
    summaries = [json.loads((tmp_path / f"run{i}" / "summary.json").read_text()) for i in range(3)]
    # the same seed and data: the three runs, two of them side by side, trained the same model
    losses = [s.get("final_val_loss", s.get("val_loss")) for s in summaries]
    assert losses[0] is not None and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert losses[0] == pytest.approx(losses[2], abs=1e-4)
    assert live_keys() == []
    assert_clean()
