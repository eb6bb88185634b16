"""Drive a pipeline-parallel training run and write its run directory.

    python jobs/train_pipeline.py --topology clusters/local.yaml --steps 40 --out runs/pipe [--resume]

Run directory: ``config.json``, ``plan.txt``, ``data/`` (tokenizer-built shards, one per node),
``metrics.parquet`` (step, loss, tokens/s, wall and modelled communication seconds, the modelled clock,
bytes per link class),
``ledger.parquet`` (every transfer), ``checkpoint/`` (a Hugging Face directory plus each stage's optimizer
state and ``trainer_state.json``; written atomically) and ``summary.json``. ``resume=True`` restarts from the
checkpoint: weights, optimizer moments and the step counter, and the data order is a function of the step,
so the loss trajectory continues exactly as an uninterrupted run would.

Time: ``summary.json`` has ``modelled_s`` (the fabric's modelled clock, edgeray.fabric.backend.Fabric.clock:
each stage's work as measured times its node's slowdown, each transfer by the link model) beside
``measured_s`` (wall-clock seconds here); with ``time_scale`` 1 the links are also emulated in real time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from edgeray.atomic import write_atomic
from edgeray.energy import account, egress_by_region
from edgeray.fabric.groups import RunGroups
from edgeray.fabric.ledger import Ledger
from edgeray.model import PRESETS, build_model, save_pretrained, train_tokenizer
from edgeray.model.presets import latest_checkpoint
from edgeray.model.shards import build_shards, read_validation
from edgeray.monitoring.export import TrainMetrics
from edgeray.placement import Reservation, reserve
from edgeray.topology import Topology
from edgeray.train.partition import Partitioner
from edgeray.train.pipeline import OPTIMIZER_KEYS, PipelineConfig, StageWorker
from edgeray.train.planner import LinkConditions, PipelinePlan, replan
from edgeray.train.tensor_parallel import gather_state

WAIT_S = 600.0
REPLAN_GAIN = 1.25


def _append_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``path`` with ``rows`` appended (small files), atomically."""
    old = pq.read_table(path).to_pylist() if path.exists() else []
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(old + rows), tmp)
    tmp.replace(path)


def _energy(
    topology: Topology, busy_s: dict[str, float], up_s: float, egress: dict[str, float], steps: int
) -> dict[str, Any]:
    return account(topology, busy_s=busy_s, wall_s=up_s, egress_bytes=egress, units={"step": steps})


def _truncate(path: Path, *, before_step: int) -> None:
    if not path.exists():
        return
    if before_step == 0:
        path.unlink()
        return
    rows = [r for r in pq.read_table(path).to_pylist() if r["step"] < before_step]
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def train(
    topology: Topology,
    plan: PipelinePlan | list[PipelinePlan],
    config: PipelineConfig,
    *,
    out: str | Path,
    steps: int,
    seq_len: int = 128,
    resume: bool = False,
    checkpoint_every: int = 0,
    replan_every: int = 0,
    progress: Callable[[str], None] = print,
    explain: str = "",
    partitioner: Partitioner | None = None,
) -> dict[str, Any]:
    """Train for ``steps`` steps in total (counting resumed ones) on a connected Ray cluster.

    ``plan``: one pipeline, or one per data-parallel replica (``config.replicas`` of them, disjoint nodes).
    ``replan_every``: every that many steps, compare the measured transfers with the declared links
    (:class:`~edgeray.train.planner.LinkConditions`) and, if the planner now chains the stages through
    other nodes, checkpoint and continue on the new plan (same data nodes, layer split and int8 stages).
    ``explain``: text put before the plan in ``plan.txt`` (the partition planner's alternatives).
    ``partitioner``: with ``replan_every``, re-partition instead: every that many steps the partition
    planner models each layout (unsplit, layer split, tensor split) under the links measured so far, and if
    another is at least ``REPARTITION_GAIN`` x faster than the running one, the run checkpoints and
    continues in that layout (weights and AdamW state are stored by the whole model's names, so the loss
    trajectory does not change).
    """
    plans = plan if isinstance(plan, list) else [plan]
    if partitioner is not None and config.replicas > 1:
        raise ValueError("a partitioner re-partitions one pipeline: replicas must be 1")
    if config.tp and max(config.tp) > 1 and replan_every and partitioner is None:
        raise ValueError(
            f"PipelineConfig.tp = {config.tp} with replan_every = {replan_every}: re-planning moves single "
            "stages, not tensor-parallel groups; use one or the other"
        )
    if len(plans) != config.replicas:
        raise ValueError(f"config.replicas is {config.replicas} but {len(plans)} plans were given")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out).resolve()  # actors resolve paths in their own working directory
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    start = 0
    resume_from: Path | None = None
    if resume:
        found = latest_checkpoint(ckpt)
        if found is None or not (found / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt} (trainer_state.json missing)")
        start = json.loads((found / "trainer_state.json").read_text())["step"]
        resume_from = found
        progress(f"resuming from step {start} ({resume_from})")
    for name in ("metrics.parquet", "ledger.parquet"):
        _truncate(
            out / name, before_step=start
        )  # a fresh run starts empty; a resumed one drops steps >= start
    data = out / "data"
    tokenizer = train_tokenizer(PRESETS[config.preset].vocab_size)
    manifest = json.loads((data / "manifest.json").read_text()) if (data / "manifest.json").exists() else {}
    data_nodes = [p.nodes[0] for p in plans]
    if manifest.get("seq_len") != seq_len or set(data_nodes) - set(manifest.get("nodes", {})):
        build_shards(topology, tokenizer, data, seq_len=seq_len, nodes=data_nodes)
    write_atomic(
        out / "config.json",
        json.dumps(
            {
                "pipeline": asdict(config),
                "steps": steps,
                "seq_len": seq_len,
                "topology": str(topology.path),
                "nodes": [p.nodes for p in plans],
                "tp_nodes": tp_nodes(topology, plans, config),
            },
            indent=2,
        ),
    )
    write_atomic(
        out / "plan.txt",
        (explain + "\n\n" if explain else "")
        + "\n\n".join(f"replica {r}\n{p.table()}" for r, p in enumerate(plans))
        + "\n",
    )
    # Group names unique to this run: a second job on the cluster, or one running beside it, never meets
    # this run's groups, and the run's rendezvous keys are removed however it ends.
    groups = RunGroups("pipe")
    config = replace(config, group_prefix=groups.prefix + config.group_prefix)
    workers: list[Any] = []
    held: list[Reservation] = []
    try:
        return _train_loop(
            topology, plans, config, out=out, data=data, ckpt=ckpt, tokenizer=tokenizer, start=start,
            steps=steps, seq_len=seq_len, resume_from=resume_from, checkpoint_every=checkpoint_every,
            replan_every=replan_every, progress=progress, workers=workers, held=held, partitioner=partitioner,
        )  # fmt: skip
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                ray.kill(w, no_restart=True)
        for reservation in held:
            reservation.close()
        groups.close()


def _train_loop(
    topology: Topology,
    plans: list[PipelinePlan],
    config: PipelineConfig,
    *,
    out: Path,
    data: Path,
    ckpt: Path,
    tokenizer: Any,
    start: int,
    steps: int,
    seq_len: int,
    resume_from: Path | None,
    checkpoint_every: int,
    replan_every: int,
    progress: Callable[[str], None],
    workers: list[Any],
    held: list[Reservation],
    partitioner: Partitioner | None = None,
) -> dict[str, Any]:
    """The steps of :func:`train`; ``workers`` is filled with every stage actor started and ``held`` with
    their CPU reservations (the caller stops and closes them)."""
    replicas = _start(topology, plans, config, data, resume_from, held, progress)
    workers[:] = [w for ws in replicas for ranks in ws for w in ranks]
    replans: list[dict[str, Any]] = []
    recent: list[dict[str, Any]] = []  # receivers' timings since the last re-plan check
    measured = LinkConditions()  # what every window so far measured, latest per node pair
    tokens_per_step = config.microbatches * config.micro_batch_size * seq_len * config.replicas
    busy_total = wall_total = 0.0
    parts = ("busy_s", "recv_wait_s", "send_wait_s", "update_s")
    per_stage: dict[int, dict[str, float]] = {}  # stage -> summed seconds (replicas and steps together)
    modelled = 0.0  # the run's modelled clock: every step starts on every stage at once
    exported = TrainMetrics(topology, app="pipeline", strategy="pipeline", run=out.name)
    busy_by_node: dict[str, float] = {}  # modelled compute seconds per node (measured x the node's slowdown)
    up_s = 0.0  # modelled seconds every stage's node was up for this run
    egress: dict[str, float] = {}  # bytes each region sent to others in this run (billed per GB)
    if resume_from is not None:
        modelled = json.loads((resume_from / "trainer_state.json").read_text()).get("modelled_s", 0.0)
    t0 = time.perf_counter()
    for step in range(start, steps):
        begun = modelled
        results = ray.get([w.train_step.remote(step, clock=modelled) for w in workers], timeout=WAIT_S)
        modelled = max(r["clock_s"] for r in results)
        ledger = Ledger.merge(ray.get([w.ledger_rows.remote() for w in workers], timeout=WAIT_S))
        wall = max(r["wall_s"] for r in results)
        if step > start or steps - start == 1:  # the first step of a run also warms up: not in the bubble
            busy_total += sum(r["busy_s"] for r in results)
            wall_total += wall * len(results)
            for r in results:
                acc = per_stage.setdefault(r["stage"], dict.fromkeys(("wall_s", "own_wall_s", *parts), 0.0))
                acc["wall_s"] += wall
                acc["own_wall_s"] += r["wall_s"]
                for k in parts:
                    acc[k] += r[k]
        by_class = ledger.bytes_by_class()
        up_s += modelled - begun
        for r in results:
            node = r["node"]
            busy_by_node[node] = busy_by_node.get(node, 0.0) + r["busy_s"] * topology.nodes[node].slowdown
        for region, sent in egress_by_region(topology, ledger.rows()).items():
            egress[region] = egress.get(region, 0.0) + sent
        if replan_every:
            recent += [
                r for rows in ray.get([w.arrivals.remote() for w in workers], timeout=WAIT_S) for r in rows
            ]
        row = {
            "step": step,
            "loss": sum(r["loss"] for r in results if "loss" in r) / config.replicas,
            "tokens_per_s": tokens_per_step / wall,
            "wall_s": wall,
            "modelled_comm_s": sum(r["modelled_s"] for r in ledger.rows()),
            "modelled_step_s": modelled - begun,
            "modelled_s": modelled,
            "intra_region_bytes": by_class.get("intra-region", 0),
            "inter_region_bytes": by_class.get("inter-region", 0),
            "nodes": " | ".join(">".join(p.nodes) for p in plans),
        }
        _append_parquet(out / "metrics.parquet", [row])
        _append_parquet(out / "ledger.parquet", [{**r, "step": step} for r in ledger.rows()])
        done = step + 1 - start
        bill = _energy(topology, busy_by_node, up_s, egress, done)
        exported.progress(
            steps=step + 1,
            tokens=(step + 1) * tokens_per_step,
            modelled_s=modelled,
            loss=row["loss"],
            staleness=0,
        )
        exported.transfers(ledger.rows())
        exported.energy(
            {n: b["joules"] for n, b in bill["by_node"].items()}, steps=done, usd=bill["usd"]["total"]
        )
        progress(
            f"step {step + 1}/{steps}  loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s  "
            f"modelled step {row['modelled_step_s'] * 1e3:.1f} ms"
        )
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _checkpoint(replicas[0], config, tokenizer, ckpt, step + 1, modelled)
        if replan_every and (step + 1) % replan_every == 0 and step + 1 < steps:
            measured = measured.merged(LinkConditions.from_arrivals(topology, recent))
            recent = []
            new_config, moved_from = config, ""
            if partitioner is None:
                new_plans = _replan(topology, plans, config, measured, seq_len)
            else:
                running = partitioner.current(plans[0], config)
                moved = partitioner.better(running, measured)
                new_plans = None
                if moved is not None:
                    assert moved.best is not None
                    new_plan, new_config = partitioner.layout(moved.best, config)
                    new_plans, moved_from = [new_plan], f"{running} -> {moved.best.name}"
                    with (out / "plan.txt").open("a") as f:
                        f.write(f"\nre-partitioned after step {step + 1}: {running} -> {moved.best.name}\n")
                        f.write(moved.table() + "\n")
            if new_plans is not None:
                # Move the stages: checkpoint, stop them, start the new plan from the checkpoint (exact).
                _checkpoint(replicas[0], config, tokenizer, ckpt, step + 1, modelled)
                for w in workers:
                    ray.kill(w)
                for reservation in held:  # the new plan's CPUs may be the old one's
                    reservation.close()
                held.clear()
                replans.append(
                    {
                        "after_step": step + 1,
                        "from": [p.nodes for p in plans],
                        "to": [p.nodes for p in new_plans],
                        "measured": [
                            measured.describe(topology, [n for ranks in stages for n in ranks])
                            for stages in tp_nodes(topology, plans, config)
                        ],
                    }
                )
                if moved_from:
                    replans[-1]["layout"] = moved_from
                progress(
                    f"re-plan after step {step + 1}: measured {'; '.join(replans[-1]['measured'])}; "
                    f"stages {' | '.join('>'.join(n) for n in replans[-1]['from'])} -> "
                    f"{' | '.join('>'.join(n) for n in replans[-1]['to'])}"
                    + (f" ({moved_from})" if moved_from else "")
                )
                plans = new_plans
                config = replace(new_config, group_prefix=f"{config.group_prefix}replan{len(replans)}/")
                with (out / "plan.txt").open("a") as f:
                    f.write(f"\nre-planned after step {step + 1} (measured {replans[-1]['measured']})\n")
                    f.write("\n\n".join(f"replica {r}\n{p.table()}" for r, p in enumerate(plans)) + "\n")
                replicas = _start(topology, plans, config, data, ckpt, held, progress)
                workers[:] = [w for ws in replicas for ranks in ws for w in ranks]
    _checkpoint(replicas[0], config, tokenizer, ckpt, steps, modelled)  # replicas hold identical weights
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    p, m = config.stages, config.microbatches
    summary = {
        "initial_loss": metrics[0]["loss"],
        "final_loss": metrics[-1]["loss"],
        "val_loss": _val_loss(ckpt, data),
        "bubble_fraction": 1 - busy_total / wall_total if wall_total else None,
        # the share of the step the busiest stage (the one that sets the step time) spends not computing:
        # the schedule's own bubble, without the other stages' idle time that unequal stage compute
        # (layers come in whole units) adds to bubble_fraction
        "bottleneck_bubble": (
            1 - max(acc["busy_s"] / acc["wall_s"] for acc in per_stage.values()) if per_stage else None
        ),
        # where each stage's step time went, as fractions of the step (the slowest stage's time): compute,
        # waiting for a neighbour's tensors, waiting for its own sends, the update, done early and idle
        # until the step ends (drain), and "other" (batching, Python)
        "time_breakdown": [
            {
                "stage": k,
                **{p.removesuffix("_s"): acc[p] / acc["wall_s"] for p in parts},
                "end_idle": 1 - acc["own_wall_s"] / acc["wall_s"],
                "other": (acc["own_wall_s"] - sum(acc[p] for p in parts)) / acc["wall_s"],
            }
            for k, acc in sorted(per_stage.items())
        ],
        "theoretical_bubble": (p - 1) / (m + p - 1),
        "tokens_per_s": sum(r["tokens_per_s"] for r in metrics) / len(metrics),
        "checkpoint": str(ckpt),
        "steps": steps,
        "stages": p,
        "replicas": config.replicas,
        "schedule": config.schedule,
        "replans": replans,
        "modelled_s": modelled,
        "measured_s": time.perf_counter() - t0,
        # joules and dollars of the steps this run trained (edgeray.energy: each stage's node up for the
        # modelled step time, busy for its compute as measured times its slowdown)
        "energy": _energy(topology, busy_by_node, up_s, egress, steps - start),
    }
    exported.evaluation(summary["val_loss"])
    exported.close()
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def tp_nodes(topology: Topology, plans: list[PipelinePlan], config: PipelineConfig) -> list[list[list[str]]]:
    """Per replica and stage, the nodes of the stage's tensor-parallel group: the planned node first, then
    the next nodes of its region that no stage uses (``config.tp``; one node where the degree is 1)."""
    used = {n for p in plans for n in p.nodes}
    out: list[list[list[str]]] = []
    for p in plans:
        groups = []
        for i, node in enumerate(p.nodes):
            degree = config.degree(i)
            region = topology.nodes[node].region
            free = [n.name for n in topology.regions[region].nodes if n.name not in used]
            if len(free) < degree - 1:
                raise ValueError(
                    f"PipelineConfig.tp[{i}] = {degree}: stage {i} runs on {node} in region {region}, whose "
                    f"nodes no other stage uses are {free}; it needs {degree - 1} (a smaller degree, or "
                    "fewer stages in that region)"
                )
            peers = free[: degree - 1]
            used.update(peers)
            groups.append([node, *peers])
        out.append(groups)
    return out


def _start(
    topology: Topology,
    plans: list[PipelinePlan],
    config: PipelineConfig,
    data: Path,
    init: Path | None,
    held: list[Reservation],
    progress: Callable[[str], None],
) -> list[list[list[Any]]]:
    """StageWorkers for every replica, stage and tensor-parallel rank (``[replica][stage][rank]``), joined
    to their groups; ``init``: checkpoint to load. Their CPUs (``config.torch_threads`` each) are reserved
    all at once; the reservation goes into ``held`` (closing it ends the workers)."""
    placed = tp_nodes(topology, plans, config)
    slots = [(node, config.torch_threads) for stages in placed for ranks in stages for node in ranks]
    reservation = reserve(slots, what=f"pipeline run {config.group_prefix}", progress=progress)
    held.append(reservation)
    slot = iter(range(len(slots)))
    replicas = [
        [
            [
                reservation.pin(StageWorker, next(slot)).remote(
                    config, i, str(topology.path), node, str(data), str(init) if init else None, r, t
                )
                for t, node in enumerate(ranks)
            ]
            for i, ranks in enumerate(stages)
        ]
        for r, stages in enumerate(placed)
    ]
    dp_nodes = [[p.nodes[i] for p in plans] for i in range(config.stages)]  # stage i in every replica
    ray.get(
        [w.join.remote(dp_nodes[i]) for ws in replicas for i, ranks in enumerate(ws) for w in ranks],
        timeout=WAIT_S,
    )
    return replicas


def _replan(
    topology: Topology,
    plans: list[PipelinePlan],
    config: PipelineConfig,
    conditions: LinkConditions,
    seq_len: int,
) -> list[PipelinePlan] | None:
    """New plans if the measured link conditions move any stage (same data nodes, layers, int8 stages)
    and make some replica's chain at least ``REPLAN_GAIN`` x faster (no flapping on noise)."""
    tiers = frozenset(topology.regions[s.region].tier.value for p in plans for s in p.stages if s.int8)
    new: list[PipelinePlan] = []
    for r, plan in enumerate(plans):
        taken = {n for q in new for n in q.nodes} | {n for q in plans[r + 1 :] for n in q.nodes}
        candidate = replan(
            topology,
            plan,
            conditions,
            micro_batch_size=config.micro_batch_size,
            microbatches=config.microbatches,
            seq_len=seq_len,
            schedule=config.schedule,
            extra_warmup=config.extra_warmup,
            int8_tiers=tiers,
            exclude=frozenset(taken),
        )
        if candidate.int8_stages != tuple(sorted(config.int8_stages)):
            candidate = plan  # a stage's weight format is fixed for the run
        before, after = (conditions.chain_ms(topology, q.nodes) for q in (plan, candidate))
        new.append(candidate if after * REPLAN_GAIN <= before else plan)
    changed = any(a.nodes != b.nodes for a, b in zip(plans, new, strict=True))
    return new if changed else None


def _checkpoint(
    stages: list[list[Any]], config: PipelineConfig, tokenizer: Any, ckpt: Path, step: int, modelled_s: float
) -> None:
    """The whole model and AdamW's state of every parameter, both by the whole model's names (a
    tensor-parallel stage's shards gathered): ``optimizer.pt`` fits any split of the model, so a run resumes
    on another layer split, degree or layout (re-partitioning) on the same trajectory."""
    state: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {k: {} for k in OPTIMIZER_KEYS}
    model = build_model(config.preset, seed=config.seed)
    for ranks in stages:
        parts = ray.get([w.global_state.remote() for w in ranks], timeout=WAIT_S)
        state.update(parts[0] if len(parts) == 1 else gather_state(parts, model.config, len(parts)))
        moments = ray.get([w.optimizer_state.remote() for w in ranks], timeout=WAIT_S)
        for k in OPTIMIZER_KEYS:
            per_rank = [m[k] for m in moments]
            if len(per_rank) == 1 or k == "step":  # a step count is the same on every rank
                optim[k].update(per_rank[0])
            else:
                optim[k].update(gather_state(per_rank, model.config, len(per_rank)))
    model.load_state_dict(state, strict=True)

    def extra(tmp: Path) -> None:
        torch.save(optim, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "modelled_s": modelled_s}))

    save_pretrained(model, tokenizer, ckpt, extra=extra)


@torch.no_grad()
def _val_loss(ckpt: Path, data: Path) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    val = read_validation(data)[:64]
    logits = model(input_ids=val[:, :-1]).logits
    return float(
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1))
    )
