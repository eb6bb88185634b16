"""The training loop: steps, checkpoints, restarts after expert deaths, metrics and the summary."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from edgeray.atomic import write_atomic
from edgeray.energy import account, egress_by_region
from edgeray.model.presets import latest_checkpoint
from edgeray.monitoring.export import TrainMetrics
from edgeray.topology import Topology
from edgeray.train.moe.config import ExpertsLost, MoEConfig, MoEError
from edgeray.train.moe.fleet import MoEFleet
from edgeray.train.moe.placement import plan_experts


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = sorted({k for r in rows for k in r})
    table = pa.table(
        {
            k: [json.dumps(r[k]) if isinstance(r.get(k), (list, dict)) else r.get(k) for r in rows]
            for k in keys
        }
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _resume_point(
    out: Path, record: dict[str, Any], steps: int
) -> tuple[Path, int, list[dict[str, Any]], list[dict[str, Any]]]:
    """The checkpoint to resume from, its step, metrics and ledger rows, after checking that it is this
    run's (MoEError naming what differs)."""
    found = latest_checkpoint(out / "checkpoint")
    if found is None or not (found / "trainer_state.json").exists():
        raise MoEError(f"resume: no checkpoint at {out / 'checkpoint'} (trainer_state.json missing)")
    try:
        before = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise MoEError(f"resume: {out / 'config.json'} of the interrupted run is unreadable: {exc}") from None
    now = json.loads(json.dumps(record))  # as it reads back (tuples become lists)
    changed = sorted(
        [f"moe.{k}" for k, v in now["moe"].items() if before.get("moe", {}).get(k) != v]
        + [k for k in ("plan", "topology_digest") if before.get(k) != now[k]]
    )
    if changed:
        raise MoEError(
            f"resume: {out / 'config.json'} was written by a run with other settings ({', '.join(changed)} "
            "differ); resume with the same arguments (only --steps may grow), or use another directory"
        )
    state = json.loads((found / "trainer_state.json").read_text())
    if state["step"] >= steps:
        raise MoEError(f"resume: the checkpoint is at step {state['step']} already; steps = {steps}")
    ledger = (
        pq.read_table(found / "ledger.parquet").to_pylist() if (found / "ledger.parquet").exists() else []
    )
    return found, int(state["step"]), list(state.get("metrics", [])), ledger


def train_moe(
    config: MoEConfig,
    topology: Topology,
    *,
    data_dir: str | Path,
    out: str | Path,
    steps: int,
    trunk: str | None = None,
    expert_nodes: list[str] | None = None,
    checkpoint_every: int = 10,
    eval_every: int = 0,
    kill_expert_at: tuple[int, int] | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train on a connected cluster; writes OUT/{config.json, plan.txt, metrics.parquet, ledger.parquet,
    summary.json, checkpoint/}. ``kill_expert_at=(step, expert)`` kills that expert's actor before that
    step (a failure drill): training restarts every actor from the last checkpoint and goes on.

    ``resume=True`` continues the run in ``out`` from its last complete checkpoint (weights, every
    optimizer, the metrics and ledger up to it; the data order is a function of the step) on the
    trajectory of a run never interrupted; ``steps`` may be larger than before, the rest must match."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out).resolve()  # actors resolve paths in their own working directory
    data_dir = Path(data_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_experts(
        topology,
        config.experts,
        trunk or next(iter(topology.nodes)),
        expert_nodes,
        config.replicas,
        config.torch_threads,
    )
    record = {
        "moe": asdict(config),
        "steps": steps,
        "plan": asdict(plan),
        "topology": str(topology.path),
        "topology_digest": topology.digest(),
    }
    ckpt = out / "checkpoint"
    init, start, metrics, ledger = _resume_point(out, record, steps) if resume else (None, 0, [], [])
    write_atomic(out / "plan.txt", plan.table() + "\n")
    write_atomic(out / "config.json", json.dumps(record, indent=2))
    progress(plan.table())
    if init is not None:
        progress(f"resuming from step {start} ({init})")
    fleet = MoEFleet(config, topology, plan, data_dir, init_dir=init, progress=progress)
    fleet.ledger.extend(ledger)
    load = np.zeros(config.experts)
    dropped = fallback = tokens = 0
    restarts: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    exported = TrainMetrics(topology, app="moe", strategy="moe", run=out.name)
    # energy of the steps this run trains: every node holding the trunk or an expert is up for the modelled
    # step time and busy for the work its fabric charged (edgeray.energy)
    busy: dict[str, float] = dict.fromkeys([plan.trunk, *plan.nodes], 0.0)
    up_s = 0.0
    egress: dict[str, float] = {}  # bytes each region sent to others in the steps trained here
    seen = len(fleet.ledger.rows())  # ledger rows already given to the exporter
    exported.transfers(fleet.ledger.rows())
    try:
        if init is None:
            fleet.checkpoint(ckpt, 0)
        step = start
        while step < steps:
            if kill_expert_at and kill_expert_at[0] == step and not restarts:
                ray.kill(fleet.experts[kill_expert_at[1]], no_restart=True)
                progress(f"  step {step}: expert {kill_expert_at[1]} killed (failure drill)")
            began = metrics[-1]["modelled_s"] if metrics else 0.0
            try:
                r = fleet.train_step(step, clock=began)
            except ExpertsLost as exc:  # only death restarts; a bug fails the run (WorkerFailed, MoEError)
                exported.churn("leave")
                last = latest_checkpoint(ckpt)
                assert last is not None, "a checkpoint is saved before the first step"
                resume = json.loads((last / "trainer_state.json").read_text())["step"]
                restarts.append({"at_step": step, "resumed_from": resume, "error": str(exc)[:200]})
                progress(
                    f"  step {step}: training failed ({str(exc)[:80]}); restarting from the checkpoint of step {resume}"
                )
                fleet.start(last)
                step = resume
                metrics = [m for m in metrics if m["step"] <= resume]  # those steps run again
                continue
            step += 1
            up_s += r["clock_s"] - began
            for node, seconds in r["busy"].items():
                busy[node] = busy.get(node, 0.0) + seconds
            inter = fleet.ledger.bytes_by_class().get("inter-region", 0)
            row = {
                "step": step,
                "tokens": r["tokens"],
                "loss": r["loss"],
                "aux_loss": r["aux_loss"],
                "dropped": r["dropped"],
                "fallback": r["fallback"],
                "inter_region_bytes": inter,
                "expert_load": r["expert_load"],
                "modelled_s": r["clock_s"],
            }
            if eval_every and step % eval_every == 0:
                row["val_loss"] = fleet.evaluate()["val_loss"]
                exported.evaluation(row["val_loss"])
            metrics.append(row)
            tokens = sum(m["tokens"] for m in metrics)
            exported.progress(steps=step, tokens=tokens, modelled_s=r["clock_s"], loss=r["loss"], staleness=0)
            rows = fleet.ledger.rows()[seen:]  # this step's transfers
            exported.transfers(rows)
            seen += len(rows)
            for region, sent in egress_by_region(topology, rows).items():
                egress[region] = egress.get(region, 0.0) + sent
            bill = account(topology, busy_s=busy, wall_s=up_s, egress_bytes=egress)
            exported.energy(
                {n: b["joules"] for n, b in bill["by_node"].items()},
                steps=step - start,
                usd=bill["usd"]["total"],
            )
            if step % max(1, steps // 10) == 0 or step == steps:
                progress(
                    f"  step {step:4d}/{steps}  loss {r['loss']:.4f}  aux {r['aux_loss']:.3f}  dropped {r['dropped']:4d}  inter-region {inter / 2**20:8.1f} MiB"
                )
            if checkpoint_every and step % checkpoint_every == 0:
                fleet.checkpoint(ckpt, step, metrics)
                _write_parquet(out / "metrics.parquet", metrics)  # what is measured so far survives a crash
        train_bytes = fleet.ledger.bytes_by_class()
        energy = account(
            topology,
            busy_s=busy,
            wall_s=up_s,
            egress_bytes=egress_by_region(topology, fleet.ledger.rows()),
            units={"step": steps - start},
        )
        load = np.sum([m["expert_load"] for m in metrics], axis=0)
        dropped = sum(m["dropped"] for m in metrics)
        fallback = sum(m["fallback"] for m in metrics)
        fleet.checkpoint(ckpt, steps, metrics)  # before the evaluation: its traffic is not training's
        val = fleet.evaluate()
    finally:
        exported.close()
        fleet.close()
        fleet.ledger.save(out / "ledger.parquet")  # also when the run failed: what it measured stays
        _write_parquet(out / "metrics.parquet", metrics)
    assignments = load.sum() or 1.0
    summary = {
        "final_val_loss": val["val_loss"],
        "inter_region_bytes": train_bytes.get("inter-region", 0),
        "bytes_by_class": train_bytes,
        "expert_load": (load / assignments).tolist(),
        "expert_nodes": list(plan.nodes),
        "dropped_tokens": dropped,
        "fallback_tokens": fallback,
        "steps": steps,
        "tokens": tokens,
        "restarts": restarts,
        "locality_bias": config.locality_bias,
        "checkpoint": str(ckpt),
        "modelled_s": metrics[-1]["modelled_s"] if metrics else 0.0,
        "measured_s": time.perf_counter() - t0,
        "energy": energy,  # the training steps' joules and dollars (redone steps after a restart included)
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    progress(
        f"val loss {summary['final_val_loss']:.4f}, inter-region {summary['inter_region_bytes'] / 2**20:.1f} MiB, "
        f"dropped {dropped}, fallback {fallback}, load {np.round(load / assignments, 3).tolist()}"
    )
    return summary
