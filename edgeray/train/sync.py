"""Decentralized data-parallel training: one runner, pluggable strategies to keep edge workers in step.

    summary = run_sync(SyncConfig(strategy="diloco", params={"h": 30}, steps=200), topology, out="runs/diloco")

Every worker is a :class:`SyncWorker` Ray actor on its own topology node, training the tiny Llama on that
node's Parquet shard; every byte between them (gradients, parameters, pseudo-gradients, state for a
joining node) moves through the fabric, so the ledger counts it and the link model times it.

The strategies (sync, sync-hier, async, ssp, easgd, gossip, diloco, streaming-diloco) live in
:mod:`edgeray.train.strategies`, one file each, behind one interface; this module is the runner they all
use and knows none of them by name (see that package's README.md, which also shows how to add one).

Time is modelled, not measured: the driver keeps a virtual clock and runs every worker's events in
modelled-time order (a step costs ``compute_s`` x the node's ``slowdown``; a transfer costs what the link
model says for its bytes on its route, after the receiver's ready notice: an exchange is the sum over its
steps of the slowest transfer, edgeray.fabric.ledger.modelled_critical_path). The same configuration gives the same run, and a 2-core machine
emulates a fleet whose speeds it does not have. The pipeline and MoE charge the same link model and the
same slowdown rule on the fabric's per-process clock (edgeray.fabric.backend.Fabric.clock), with their
work measured rather than configured; every summary reports ``modelled_s`` beside ``measured_s``.

Failures (edgeray.train.failures): a worker that dies, or is killed by churn, leaves the run; an exception
raised by a live worker fails the run at once with its traceback (never churn).

Churn: :class:`ChurnEvent` (from a schedule or sampled from the topology's availability / MTBF) takes a
node's actor down (``ray.kill``) or brings a new one up at a modelled instant. Groups are re-formed over
the live nodes; a joining node fetches the current state over the fabric (the server's parameters, or a
live peer's parameters, optimizer and strategy state). A worker that dies unannounced is found by its
failing call and treated the same way. Metrics record every leave and join with what the node had
contributed.

Run directory: ``config.json``, ``metrics.parquet`` (one row per event: step, node, modelled time, loss,
tokens, staleness, validation loss at evaluations; rewritten at every evaluation and when the run ends,
however it ends), ``ledger.parquet`` and ``summary.json`` (``final_val_loss``, ``inter_region_bytes``,
``modelled_wall_s``, ``steps``, ``tokens``, ...), and ``resume/`` while the run is under way (everything the
rest of the run depends on, written at every evaluation; see :meth:`Run.checkpoint` and ``run_sync(resume=True)``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeray.atomic import latest_dir, write_atomic, write_dir_atomic
from edgeray.energy import account, egress_by_region
from edgeray.fabric.backend import EdgeGroup, Fabric, FabricError, install
from edgeray.fabric.collectives import GroupPlan, hierarchical_allreduce
from edgeray.fabric.groups import Membership, RunGroups
from edgeray.fabric.groups import join as join_groups
from edgeray.fabric.groups import leave as leave_groups
from edgeray.fabric.ledger import Ledger, modelled_critical_path
from edgeray.model.presets import PRESETS, build_model, save_pretrained
from edgeray.model.shards import build_shards, read_shard, read_validation
from edgeray.model.tokenizer import train_tokenizer
from edgeray.monitoring.export import TrainMetrics
from edgeray.placement import Reservation, reserve
from edgeray.topology import Topology, load_topology
from edgeray.train.failures import WorkerFailed, dead_actors
from edgeray.train.failures import kind as failure_kind
from edgeray.train.strategies import Strategy, StrategyError, SyncError
from edgeray.train.strategies import get as get_strategy
from edgeray.train.strategies import names as strategy_names
from edgeray.train.strategies.base import flat, unflat_

STRATEGIES = tuple(strategy_names())
"""The registered strategies (edgeray.train.strategies) when this module was imported."""
OPTIMIZERS = ("adamw", "sgd")
WAIT_S = 300.0
"""Bound on every driver wait for a worker call (a collective's own transfers time out sooner)."""
PS_GROUP = "ps"


@dataclass(frozen=True)
class SyncConfig:
    """One data-parallel run, validated on construction (every problem at once, as SyncError)."""

    strategy: str = "sync"
    params: Any = None
    """The strategy's hyperparameters: a mapping checked against its ``params_type`` (unknown names are
    refused), or that dataclass; None gives its defaults. After construction, always the dataclass."""
    preset: str = "tiny"
    init_from: str | None = None
    """A Hugging Face checkpoint directory to start from instead of the preset's random weights: an edgeray
    run's ``checkpoint/``, or any causal LM whose vocabulary is the data's (checked against its manifest)."""
    batch_size: int = 4
    """Sequences per worker step."""
    steps: int = 40
    """Token budget in synchronous steps: every strategy stops after steps x workers x batch_size
    sequences, however its workers share them."""
    lr: float = 3e-3
    optimizer: str = "adamw"
    """Each worker's (DiLoCo: inner) optimizer; the parameter server's too: adamw | sgd."""
    compute_s: float = 0.25
    """Modelled seconds of one step on a reference node (slowdown 1); x the node's slowdown."""
    slowdown: dict[str, float] = field(default_factory=dict)
    """Per-node slowdown overriding the topology's (node -> factor >= 1)."""
    transient: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    """Transient stragglers: node -> (factor >= 1, start, end); the node is that much slower (on top of its
    slowdown) while the run has trained between these fractions of its token budget."""
    seed: int = 0
    timeout_s: float = 60.0
    """Fabric bound on each transfer / rendezvous: a peer that died inside a collective surfaces as
    FabricError this fast (one that died between calls is found at once by its failing call). Generous, so
    that actor start-up on a loaded machine is not taken for a death."""
    evals: int = 8
    """Validation-loss evaluations over the run (at equal token milestones), plus the final one."""
    val_windows: int = 64
    torch_threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        try:
            cls = get_strategy(self.strategy)
            object.__setattr__(self, "params", cls.params_type.build(self.params, self.strategy))
        except StrategyError as exc:
            problems.append(str(exc))
        if self.preset not in PRESETS:
            problems.append(f"preset = {self.preset!r}: valid presets are {sorted(PRESETS)}")
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            problems.append(
                f"init_from = {self.init_from!r}: not a Hugging Face checkpoint directory (no config.json); "
                "give a run's checkpoint/ directory"
            )
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer = {self.optimizer!r}: valid optimizers are {list(OPTIMIZERS)}")
        for name in ("batch_size", "steps", "evals"):
            if getattr(self, name) < 1:
                problems.append(f"{name} = {getattr(self, name)}: must be >= 1")
        for name in ("lr", "compute_s", "timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} = {getattr(self, name)}: must be > 0")
        bad = {n: f for n, f in self.slowdown.items() if not f >= 1}
        if bad:
            problems.append(f"slowdown = {bad}: factors must be >= 1")
        bad_t = {
            n: t
            for n, t in self.transient.items()
            if len(t) != 3 or not (t[0] >= 1 and 0 <= t[1] < t[2] <= 1)
        }
        if bad_t:
            problems.append(
                f"transient = {bad_t}: each must be (factor >= 1, start, end) with 0 <= start < end <= 1"
            )
        if problems:
            raise SyncError("sync config: " + "; ".join(problems))

    def strategy_class(self) -> type[Strategy]:
        return get_strategy(self.strategy)


@dataclass(frozen=True)
class ChurnEvent:
    """``node`` leaves at modelled second ``leave_s`` and, if ``join_s`` is set, comes back then."""

    node: str
    leave_s: float
    join_s: float | None = None
    crash: bool = False
    """Kill the actor without telling the run: it finds out when a call to the node fails."""

    @classmethod
    def parse(cls, text: str) -> ChurnEvent:
        """``NODE@LEAVE``, ``NODE@LEAVE-JOIN`` (modelled seconds; e.g. ``campus-jetson@20-45``); a trailing
        ``!`` makes the leave a crash the run is not told about (``campus-jetson@20!``)."""
        crash = text.endswith("!")
        try:
            node, times = text.rstrip("!").split("@")
            leave, _, join = times.partition("-")
            event = cls(node, float(leave), float(join) if join else None, crash)
        except ValueError:
            raise SyncError(
                f"churn {text!r}: expected NODE@LEAVE_S, NODE@LEAVE_S-JOIN_S or NODE@LEAVE_S! (a crash), "
                "e.g. campus-jetson@20-45"
            ) from None
        if event.leave_s < 0 or (event.join_s is not None and event.join_s <= event.leave_s):
            raise SyncError(f"churn {text!r}: need 0 <= LEAVE_S < JOIN_S")
        return event


def churn_from_topology(
    topology: Topology, nodes: Iterable[str], *, horizon_s: float, speedup: float = 1.0, seed: int = 0
) -> list[ChurnEvent]:
    """Failures sampled from each node's MTBF (exponential), each down for MTTR = MTBF x (1 - a) / a so the
    long-run availability is ``a``; ``speedup`` compresses both (an hours-long MTBF in a seconds-long run)."""
    rng = random.Random(seed)
    events = []
    for name in nodes:
        churn = topology.nodes[name].churn
        if churn.mtbf_s is None:
            continue
        mtbf = churn.mtbf_s / speedup
        mttr = mtbf * (1 - churn.availability) / churn.availability
        t = rng.expovariate(1 / mtbf)
        while t < horizon_s:
            events.append(ChurnEvent(name, t, t + max(mttr, 1e-3)))
            t += max(mttr, 1e-3) + rng.expovariate(1 / mtbf)
    return sorted(events, key=lambda e: e.leave_s)


# --------------------------------------------------------------------------------------------- the worker
def lm_loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``batch`` (N, T + 1): inputs are the first T, targets the last T."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def make_model(config: SyncConfig, strategy: Strategy) -> tuple[Any, list[torch.nn.Parameter]]:
    """The model a worker trains and the driver evaluates (the preset's, or ``init_from``'s weights), as the
    strategy prepares it, and the parameters the strategy moves."""
    model: Any
    if config.init_from is not None:
        model = AutoModelForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
    else:
        model = build_model(config.preset, seed=config.seed)
    return strategy.prepare_model(model, config.seed)


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


@ray.remote(num_cpus=0)  # started in a Reservation slot that declares its config.torch_threads CPUs
class SyncWorker:
    """A data-parallel worker (``role="worker"``) or a strategy's server (``role="server"``) on one node.

    Generic: model, optimizer, shard, fabric groups, a local step, the all-reduce every synchronous
    strategy uses, parameter and state transfers. What a strategy adds runs in :meth:`op`, which calls
    the strategy's ``op_<name>(worker, ...)``; its per-worker state lives in ``extra``."""

    def __init__(
        self,
        config: SyncConfig,
        topology_path: str,
        node: str,
        data_dir: str | None,
        role: str,
        strategy_cls: type[Strategy],
    ) -> None:
        self.joined: list[str] = []
        self.fault_after: int | None = None
        self.reset(config, topology_path, node, data_dir, role, strategy_cls)

    def reset(
        self,
        config: SyncConfig,
        topology_path: str,
        node: str,
        data_dir: str | None,
        role: str,
        strategy_cls: type[Strategy],
    ) -> str:
        """Start over for a new run (a :class:`WorkerPool` reuses actors: no process start per run)."""
        self._leave_groups()
        self.config, self.node, self.role = config, node, role
        self.strategy = strategy_cls(config.params)
        torch.set_num_threads(config.torch_threads)
        self.fabric = Fabric.from_topology(
            load_topology(topology_path), node=node, seed=config.seed, timeout_s=config.timeout_s
        )
        install(self.fabric)
        self.model, self.params = make_model(config, self.strategy)
        self.numel = sum(p.numel() for p in self.params)
        self.optimizer = make_optimizer(config.optimizer, self.params, config.lr)
        self.data_dir = data_dir
        self.shard = read_shard(data_dir, node) if role == "worker" and data_dir else None
        self.steps = 0
        self.grad: torch.Tensor | None = None
        self.plan: GroupPlan | None = None
        self.extra: dict[str, Any] = {}
        self.strategy.setup_worker(self)
        return node

    def ping(self) -> str:
        return self.node

    def inject_fault(self, after_steps: int | None) -> None:
        """Chaos testing: after ``after_steps`` more local steps, the next :meth:`compute` raises
        RuntimeError while the actor stays alive (a bug, which must fail the run, not count as churn).
        Survives :meth:`reset`, so it can be armed on a pooled actor before a run; None disarms it."""
        self.fault_after = after_steps

    def op(self, name: str, *args: Any) -> Any:
        """Run the strategy's worker operation ``op_<name>`` here."""
        return getattr(self.strategy, f"op_{name}")(self, *args)

    def _leave_groups(self) -> None:
        leave_groups(self.joined)
        self.joined = []

    # ------------------------------------------------------------------ groups
    def join(self, plan: GroupPlan | None, memberships: list[Membership]) -> list[str]:
        """Leave the previous generation's groups and join these (every member calls at once)."""
        self._leave_groups()
        self.plan = plan
        self.joined = join_groups(memberships)
        return self.joined

    def server_group(self) -> str:
        """The group of every worker (ranks 1..n) and the server (rank 0)."""
        assert self.plan is not None
        return self.plan.name(PS_GROUP)

    def rows(self) -> list[dict[str, Any]]:
        """The ledger rows of the transfers made since the last call."""
        rows = self.fabric.ledger.rows()
        self.fabric.ledger.clear()
        return rows

    # ------------------------------------------------------------------ local work
    def compute(self) -> dict[str, Any]:
        """Forward and backward on this node's next batch; keeps the flat gradient for a later call."""
        assert self.shard is not None, "the server holds no data"
        if self.fault_after is not None:
            self.fault_after -= 1
            if self.fault_after < 0:
                self.fault_after = None
                raise RuntimeError(f"injected fault on {self.node} at local step {self.steps + 1}")
        b = self.config.batch_size
        rows = [(self.steps * b + i) % len(self.shard) for i in range(b)]
        batch = self.shard[rows]
        self.model.zero_grad(set_to_none=False)
        loss = lm_loss(self.model, batch)
        loss.backward()
        self.grad = flat(p.grad for p in self.params)  # type: ignore[misc]
        self.steps += 1
        return {"loss": float(loss), "tokens": int(batch[:, 1:].numel()), "step": self.steps}

    def apply(self, grad: torch.Tensor) -> None:
        """An optimizer step with ``grad`` (flat) as the gradient."""
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = grad[offset : offset + n].view_as(p).clone()
            offset += n
        self.optimizer.step()

    def apply_local(self) -> None:
        assert self.grad is not None
        self.apply(self.grad)

    def allreduce_step(self, scope: str, scale: float, codec: str = "none") -> list[dict[str, Any]]:
        """Average the kept gradient over ``scope`` ("global", "hierarchical" or "region") and step."""
        assert self.grad is not None and self.plan is not None
        grad = self.grad * scale  # a copy: a failed collective leaves self.grad intact for the retry
        plan = self.plan
        if scope == "global":
            EdgeGroup.get(plan.name("global")).ring_allreduce(grad)
        elif scope == "hierarchical":
            hierarchical_allreduce(grad, plan, self.node, codec=codec)
        else:
            group = EdgeGroup.get(plan.name(f"region/{plan.region_of(self.node)}"))
            if group.world_size > 1:
                group.ring_allreduce(grad)
        self.apply(grad)
        return self.rows()

    # ------------------------------------------------------------------ parameters and state
    def send_params(self, dst: int, group: str | None = None) -> list[dict[str, Any]]:
        EdgeGroup.get(group or self.server_group()).send_to(flat(self.params), dst)
        return self.rows()

    def recv_params(self, src: int, group: str | None = None) -> list[dict[str, Any]]:
        buf = torch.empty(self.numel)
        unflat_(EdgeGroup.get(group or self.server_group()).recv_from(buf, src), self.params)
        return self.rows()

    def _optimizer_state(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for p in self.params:
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq") if self.config.optimizer == "adamw" else ():
                out.append(st[key].reshape(-1) if key in st else torch.zeros(p.numel()))
        step = next((float(s["step"]) for s in self.optimizer.state.values() if "step" in s), 0.0)
        return [*out, torch.tensor([step])]

    def _state_tensors(self) -> list[torch.Tensor]:
        out = [flat(self.params)]
        if self.strategy.copies_optimizer_state:
            out += self._optimizer_state()
        out += self.strategy.extra_state(self)
        return [t.reshape(-1).float() for t in out]

    def send_state(self, dst: int) -> list[dict[str, Any]]:
        """Send this worker's state to a joining one (rank ``dst`` of the global group)."""
        assert self.plan is not None
        EdgeGroup.get(self.plan.name("global")).send_to(torch.cat(self._state_tensors()), dst)
        return self.rows()

    def recv_state(self, src: int) -> list[dict[str, Any]]:
        assert self.plan is not None
        layout = self._state_tensors()
        vec = EdgeGroup.get(self.plan.name("global")).recv_from(
            torch.empty(sum(t.numel() for t in layout)), src
        )
        parts = list(torch.split(vec, [t.numel() for t in layout]))
        unflat_(parts.pop(0), self.params)
        if self.strategy.copies_optimizer_state:
            adamw = self.config.optimizer == "adamw"
            step = float(parts[2 * len(self.params)].item()) if adamw else 0.0
            if adamw and step > 0:
                for i, p in enumerate(self.params):
                    self.optimizer.state[p] = {
                        "step": torch.tensor(step),
                        "exp_avg": parts[2 * i].view_as(p).clone(),
                        "exp_avg_sq": parts[2 * i + 1].view_as(p).clone(),
                    }
            parts = parts[2 * len(self.params) + 1 :] if adamw else parts[1:]
        self.strategy.load_extra_state(self, parts)
        return self.rows()

    def params_vector(self) -> np.ndarray:
        return flat(self.params).numpy()

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> dict[str, Any]:
        """Everything this worker's future depends on: parameters, optimizer, data position, the gradient
        it holds, the strategy's state and the random streams (torch's, and the link model's jitter/loss)."""
        return {
            "node": self.node,
            "role": self.role,
            "params": flat(self.params),
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "grad": self.grad,
            "strategy": self.strategy.worker_state(self),
            "torch_rng": torch.get_rng_state(),
            "link_rng": self.fabric.links.rng_state(),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        """Install a :meth:`snapshot` (on a freshly reset worker of the same node and role)."""
        if (snap["node"], snap["role"]) != (self.node, self.role):
            raise SyncError(
                f"checkpoint of {snap['role']} {snap['node']!r} given to {self.role} {self.node!r}"
            )
        unflat_(snap["params"], self.params)
        self.optimizer.load_state_dict(snap["optimizer"])
        self.steps = snap["steps"]
        self.grad = snap["grad"]
        self.strategy.load_worker_state(self, snap["strategy"])
        torch.set_rng_state(snap["torch_rng"])
        self.fabric.links.set_rng_state(snap["link_rng"])


# --------------------------------------------------------------------------------------------- the driver
class WorkerPool:
    """Actors kept across runs (one per node and role), so that a comparison of strategies starts each
    worker process once: ``with WorkerPool() as pool: run_sync(..., pool=pool)``. Actors a run kills
    (churn) are dropped and replaced on demand."""

    def __init__(self) -> None:
        self.actors: dict[tuple[str, str], Any] = {}
        self.reservations: dict[tuple[str, str], Reservation] = {}

    def take(self, config: SyncConfig, topology: Topology, node: str, data_dir: Path, role: str) -> Any:
        args = (config, str(topology.path), node, str(data_dir), role, config.strategy_class())
        actor = self.actors.get((node, role))
        held = self.reservations.get((node, role))
        if held is not None and held.cpus[0] != config.torch_threads:  # other threads: other CPUs
            held.close()  # ends the actor in it
            actor = held = None
            del self.actors[(node, role)], self.reservations[(node, role)]
        if actor is not None:
            try:
                ray.get(actor.reset.remote(*args), timeout=WAIT_S)
                return actor
            except ray.exceptions.RayError as exc:
                if failure_kind(exc) == "bug":
                    raise WorkerFailed.from_ray(exc, f"resetting the worker on {node}") from exc
                # killed by the last run's churn: start a new one
        if held is None:  # each pooled actor holds its own CPUs: one driver runs the pool's runs in turn
            held = reserve([(node, config.torch_threads)], what=f"pooled sync {role} on {node}")
            self.reservations[(node, role)] = held
        actor = held.pin(SyncWorker, 0).remote(*args)
        self.actors[(node, role)] = actor
        return actor

    def close(self) -> None:
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors.clear()
        for held in self.reservations.values():
            held.close()
        self.reservations.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Node:
    name: str
    actor: Any
    alive: bool = True
    steps: int = 0
    tokens: int = 0
    version: int = 0  # server version its parameters came from (async / ssp)
    start_steps: int = 0  # a joining node's SSP clock starts at the slowest live worker's
    inc: int = 0  # incarnation: events of a node that left are void after it rejoins
    joined_s: float = 0.0  # modelled time this incarnation joined (its energy counts from here)
    last: dict[str, Any] = field(default_factory=dict)  # its latest compute() result


class Run:
    """Shared machinery of every strategy: nodes, groups, clock, churn, metrics, ledger, evaluations."""

    def __init__(
        self,
        config: SyncConfig,
        topology: Topology,
        data_dir: Path,
        nodes: list[str],
        server_node: str | None,
        churn: list[ChurnEvent],
        progress: Callable[[str], None],
        pool: WorkerPool | None = None,
        out: Path | None = None,
        restore: Path | None = None,
    ) -> None:
        """``restore``: a checkpoint directory written by :meth:`checkpoint` to continue from (only its
        live workers are started, each loaded with its snapshot; the strategy's driver state is in
        ``self.restored["strategy"]`` for :meth:`Strategy.load_state_dict`)."""
        self.config, self.topology, self.data_dir, self.progress = config, topology, data_dir, progress
        self.strategy_cls = config.strategy_class()
        self.strategy: Strategy | None = None
        """The strategy driving this run, set by run_sync when the run is checkpointed (its driver state
        goes into the checkpoints)."""
        self.restored: dict[str, Any] | None = (
            torch.load(restore / "driver.pt", weights_only=False) if restore is not None else None
        )
        self.resumed = restore is not None
        """Whether this run continues a checkpoint: a strategy then skips its set-up (see driver_state)."""
        self.out = out
        self.pool = pool
        self.order = [n.name for n in topology.iter_nodes() if n.name in set(nodes)]
        self.groups = RunGroups("sync")
        self.plan: GroupPlan | None = None
        self.nodes: dict[str, Node] = {}
        self.server: Any = None
        self.server_node = server_node
        self.crashed_at: dict[str, float] = {}
        self.incarnations = 0
        # the CPUs every worker (and the server) computes with, held for the whole run (a pool holds its own)
        self.reservation: Reservation | None = None
        if pool is None:
            slots = [(name, config.torch_threads) for name in self.order]
            self.reservation = reserve(
                slots + ([(server_node, config.torch_threads)] if server_node else []),
                what=f"{config.strategy} run {self.groups.prefix}",
                progress=progress,
            )
        saved = self.restored["nodes"] if self.restored else {}
        try:
            for name in self.order:
                alive = saved.get(name, {}).get("alive", True)
                self.nodes[name] = Node(
                    name, self._spawn(name, "worker") if alive else None, **saved.get(name, {})
                )
            self.server = self._spawn(server_node, "server") if server_node else None
        except BaseException:
            self.shutdown()
            raise
        self.pending_churn: list[tuple[float, str, str]] = sorted(
            [(e.leave_s, "crash" if e.crash else "leave", e.node) for e in churn]
            + [(e.join_s, "join", e.node) for e in churn if e.join_s is not None]
        )
        seq_len = int(json.loads((data_dir / "manifest.json").read_text())["seq_len"])
        self.tokens_per_step = config.batch_size * seq_len
        self.budget = config.steps * len(self.order) * self.tokens_per_step
        self.tokens = 0
        self.now = 0.0
        self.metrics: list[dict[str, Any]] = []
        self.ledger = Ledger()
        self.inter_region_bytes = 0
        val = read_validation(data_dir)
        self.val = val[: config.val_windows]
        self.eval_model, self.eval_params = make_model(config, self.strategy_cls(config.params))
        self.eval_model.eval()
        self.next_eval = 0
        self.evals: list[dict[str, Any]] = []
        self.spread: float | None = None
        self.exported = TrainMetrics(
            topology, app="sync", strategy=config.strategy, run=out.name if out is not None else "-"
        )
        self._exported_rows = 0  # ledger rows already given to the exporter
        self._egress: dict[str, float] = {}  # their bytes sent from each region to others
        """Largest difference of a live worker's parameters from their mean at the last evaluation."""
        if restore is not None:
            self._restore(restore)

    # ------------------------------------------------------------------ checkpoints
    RUN_STATE = (
        "now", "tokens", "inter_region_bytes", "metrics", "evals", "next_eval", "spread",
        "pending_churn", "crashed_at", "incarnations",
    )  # fmt: skip
    NODE_STATE = ("alive", "steps", "tokens", "version", "start_steps", "inc", "last", "joined_s")

    def checkpoint(self) -> None:
        """Write OUT/resume atomically: every live worker's snapshot (and the server's), the run's state
        (clock, tokens, metrics, ledger, churn still to come) and the strategy's driver state. Skipped when
        the strategy keeps no driver state, and when a worker does not answer (it is found dead later;
        skipping changes nothing in the run)."""
        strategy = self.strategy
        if self.out is None or strategy is None or not strategy.resumable():
            return
        live = self.live()
        actors = [n.actor for n in live] + ([self.server] if self.server is not None else [])
        try:
            snaps = ray.get([a.snapshot.remote() for a in actors], timeout=WAIT_S)
        except ray.exceptions.RayError as exc:
            if failure_kind(exc) == "bug":
                raise WorkerFailed.from_ray(exc, f"{self.config.strategy}: checkpoint") from exc
            self.progress(f"  t={self.now:8.2f}s  checkpoint skipped: a worker did not answer")
            return
        state = {
            "run": {k: getattr(self, k) for k in self.RUN_STATE},
            "ledger": self.ledger.rows(),
            "nodes": {name: {k: getattr(n, k) for k in self.NODE_STATE} for name, n in self.nodes.items()},
            "strategy": strategy.state_dict(),
        }

        def fill(tmp: Path) -> None:
            for n, snap in zip(live, snaps, strict=False):
                torch.save(snap, tmp / f"worker-{n.name}.pt")
            if self.server is not None:
                torch.save(snaps[-1], tmp / "server.pt")
            torch.save(state, tmp / "driver.pt")

        write_dir_atomic(self.out / "resume", fill)

    def _restore(self, path: Path) -> None:
        assert self.restored is not None
        for k, v in self.restored["run"].items():
            setattr(self, k, v)
        self.ledger = Ledger(self.restored["ledger"])
        calls = [
            n.actor.restore.remote(torch.load(path / f"worker-{n.name}.pt", weights_only=False))
            for n in self.live()
        ]
        if self.server is not None:
            calls.append(self.server.restore.remote(torch.load(path / "server.pt", weights_only=False)))
        self.call(calls, "restoring the checkpoint")

    # ------------------------------------------------------------------ actors and groups
    def _spawn(self, node: str, role: str) -> Any:
        if self.pool is not None:
            return self.pool.take(self.config, self.topology, node, self.data_dir, role)
        assert self.reservation is not None
        slot = (
            len(self.order) if role == "server" else self.order.index(node)
        )  # a replacement: the slot freed
        return self.reservation.pin(SyncWorker, slot).remote(
            self.config, str(self.topology.path), node, str(self.data_dir), role, self.strategy_cls
        )

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.alive]

    def slowdown(self, node: str) -> float:
        return self.config.slowdown.get(node, self.topology.nodes[node].slowdown)

    def step_s(self, node: str) -> float:
        """Modelled seconds of one local step on ``node`` at its own speed (what energy accounting counts
        as busy; a transient slowdown window is not included)."""
        return self.config.compute_s * self.slowdown(node)

    def energy_use(self, until: float) -> tuple[dict[str, float], dict[str, float]]:
        """Each node's modelled busy and up seconds by ``until``: its finished incarnations (from their
        ``leave`` events) and the live one. A parameter server on a node no worker runs on counts as up
        and idle for the whole run (on a worker's node it adds nothing: one machine, one power draw)."""
        busy = dict.fromkeys(self.nodes, 0.0)
        up = dict.fromkeys(self.nodes, 0.0)
        for m in self.metrics:
            if m["event"] == "leave" and m["node"] in busy:
                busy[m["node"]] += float(m.get("busy_s", 0.0))
                up[m["node"]] += float(m.get("up_s", 0.0))
        for n in self.live():
            busy[n.name] += (n.steps - n.start_steps) * self.step_s(n.name)
            up[n.name] += max(0.0, until - n.joined_s)
        if self.server_node is not None and self.server_node not in self.nodes:
            busy[self.server_node] = 0.0
            up[self.server_node] = until
        return busy, up

    def drain_over_budget(self, until: float) -> bool:
        """Take every live worker whose modelled energy by ``until`` exceeds its ``power.budget_wh`` out
        of the run for good (it does not rejoin); True when one left."""
        from edgeray.energy import J_PER_WH, node_joules

        if all(self.topology.nodes[n.name].power.budget_wh is None for n in self.live()):
            return False  # mains powered: nothing to check (energy_use reads every event so far)
        busy, up = self.energy_use(until)
        drained = False
        for n in self.live():
            budget = self.topology.nodes[n.name].power.budget_wh
            if budget is None:
                continue
            spent = node_joules(self.topology.nodes[n.name], busy[n.name], up[n.name])
            if spent > budget * J_PER_WH:
                self.pending_churn = [e for e in self.pending_churn if e[2] != n.name]
                self.leave(n, until, "energy budget")
                self.metrics[-1]["spent_wh"] = spent / J_PER_WH
                self.progress(
                    f"  t={until:8.2f}s  {n.name} drained: {spent / J_PER_WH:.4g} Wh spent of its "
                    f"{budget:g} Wh budget"
                )
                drained = True
        return drained

    def compute_s(self, node: str) -> float:
        """Modelled seconds of one local step on ``node`` now (its slowdown, and a transient one while the
        run's progress is inside its window)."""
        seconds = self.config.compute_s * self.slowdown(node)
        transient = self.config.transient.get(node)
        if transient is not None and transient[1] <= self.tokens / self.budget < transient[2]:
            seconds *= transient[0]
        return seconds

    def regroup(self) -> None:
        """Form a new generation of groups over the live workers (and the server)."""
        live = self.live()
        if not live:
            raise SyncError("every worker has left: nothing can train")
        plan = GroupPlan.from_nodes(self.topology, [n.name for n in live], prefix=self.groups.generation())
        self.plan = plan
        calls = []
        for n in live:
            ms = plan.memberships(n.name)
            if self.server is not None:
                ms.append(Membership(plan.name(PS_GROUP), len(plan.nodes) + 1, plan.nodes.index(n.name) + 1))
            calls.append(n.actor.join.remote(plan, ms))
        if self.server is not None:
            calls.append(
                self.server.join.remote(plan, [Membership(plan.name(PS_GROUP), len(plan.nodes) + 1, 0)])
            )
        try:
            self.call(calls, "joining groups")
        except (ray.exceptions.RayError, FabricError) as exc:
            self.lost(exc, "joining groups")  # a member that crashed unnoticed: form the groups without it
            self.regroup()

    def rank(self, node: str) -> int:
        assert self.plan is not None
        return self.plan.nodes.index(node)

    def call(self, refs: list[Any], what: str = "a worker call") -> list[Any]:
        """Bounded wait on worker calls. An exception a live worker raised fails the run (WorkerFailed, with
        its traceback); a death or a suspect failure (FabricError, timeout) is re-raised for :meth:`lost`."""
        try:
            return ray.get(refs, timeout=WAIT_S)
        except ray.exceptions.RayError as exc:
            if failure_kind(exc) == "bug":
                raise WorkerFailed.from_ray(exc, f"{self.config.strategy}: {what}") from exc
            raise

    def lost(self, exc: BaseException, what: str) -> list[Node]:
        """After a failed call: the workers found dead (they leave the run). A bug fails the run at once, and
        so does a suspect failure with nobody dead (a collective that failed among live workers)."""
        if failure_kind(exc) == "bug":
            raise WorkerFailed.from_ray(exc, f"{self.config.strategy}: {what}") from exc
        gone = self.find_dead()
        if not gone:
            raise SyncError(
                f"{self.config.strategy}: {what} failed and no worker was found dead: {exc}"
            ) from exc
        return gone

    def account(self, parts: list[list[dict[str, Any]]]) -> float:
        """Record transfer rows (one list per participant); returns the modelled seconds of the exchange."""
        self.ledger.extend(row for rows in parts for row in rows)
        for rows in parts:
            for row in rows:
                if row["link_class"] == "inter-region":
                    self.inter_region_bytes += int(row["bytes"])
        return modelled_critical_path(parts)

    def record(self, event: str, node: str | None, **fields: Any) -> None:
        self.metrics.append(
            {
                "event": event,
                "node": node,
                "t_s": self.now,
                "tokens": self.tokens,
                "inter_region_bytes": self.inter_region_bytes,
                **fields,
            }
        )
        m = self.exported
        if event == "leave":
            m.churn("drain" if fields.get("reason") == "energy budget" else "leave")
        elif event == "join":
            m.churn("join")
        elif event == "eval":
            m.evaluation(float(fields["val_loss"]))
        loss = fields.get("loss")
        if loss is not None and loss == loss:  # not nan (a federated round nobody finished)
            m.progress(
                steps=self.tokens // self.tokens_per_step,
                tokens=self.tokens,
                modelled_s=self.now,
                loss=float(loss),
                staleness=fields.get("staleness"),
            )

    def leave(self, n: Node, at: float, why: str) -> None:
        if not n.alive:
            return
        n.alive = False
        with contextlib.suppress(Exception):
            ray.kill(n.actor, no_restart=True)
        self.now = max(self.now, at)
        steps = n.steps - n.start_steps
        self.record(
            "leave", n.name, reason=why, contributed_tokens=n.tokens, contributed_steps=steps,
            up_s=max(0.0, at - n.joined_s), busy_s=steps * self.step_s(n.name),
        )  # fmt: skip
        self.progress(
            f"  t={at:8.2f}s  {n.name} left ({why}) after {steps} steps / {n.tokens} tokens contributed"
        )

    def find_dead(self) -> list[Node]:
        """Live workers whose actor died or does not answer within the fabric bound (a survivor may still be
        waiting out a collective's timeout before it can answer)."""
        live = self.live()
        gone = [live[i] for i in dead_actors([n.actor for n in live], self.config.timeout_s + 15)]
        for n in gone:
            self.leave(n, self.now, "failed")
            self.metrics[-1]["crashed_s"] = self.crashed_at.get(n.name)
        return gone

    def due_churn(self, until: float) -> list[tuple[float, str, str]]:
        out = []
        while self.pending_churn and self.pending_churn[0][0] <= until:
            out.append(self.pending_churn.pop(0))
        return out

    def apply_churn(
        self, until: float, on_join: Callable[[Node, float], None], *, regroup_on_leave: bool
    ) -> None:
        """Apply churn events due by modelled time ``until``. A leave kills the node's actor (its groups are
        re-formed when the strategy needs every member, ``regroup_on_leave``); a join starts a new actor,
        re-forms the groups with it and lets the strategy hand it the current state (``on_join``)."""
        left = self.drain_over_budget(until)
        for at, kind, name in self.due_churn(until):
            n = self.nodes[name]
            if kind == "leave" and n.alive:
                self.leave(n, at, "churn")
                left = True
            elif kind == "crash" and n.alive:  # a real kill; the run learns of it from a failing call
                self.progress(f"  t={at:8.2f}s  {name} crashes")
                ray.kill(n.actor, no_restart=True)
                self.crashed_at[name] = at
            elif kind == "join" and not n.alive:
                self.incarnations += 1
                slowest = min((m.steps for m in self.live()), default=0)
                self.nodes[name] = Node(
                    name,
                    self._spawn(name, "worker"),
                    steps=slowest,
                    start_steps=slowest,
                    inc=self.incarnations,
                    joined_s=at,
                )
                self.progress(f"  t={at:8.2f}s  {name} joins")
                self.regroup()
                left = False  # the new groups already leave out whoever left
                on_join(self.nodes[name], at)
        if left and regroup_on_leave:
            self.regroup()

    def fetch_from_server(self, n: Node) -> float:
        """A joining worker pulls the parameter server's current parameters over the fabric."""
        parts = self.call(
            [self.server.send_params.remote(self.rank(n.name) + 1), n.actor.recv_params.remote(0)],
            "state fetch for a joining worker",
        )
        seconds = self.account(parts)
        self.record(
            "join",
            n.name,
            source=self.server_node,
            fetch_s=seconds,
            fetched_bytes=sum(r["bytes"] for r in parts[0]),
        )
        return seconds

    def fetch_from_peer(self, n: Node, at: float) -> float:
        """A joining worker copies a live peer's state (the nearest by latency) over the fabric."""
        peers = [p for p in self.live() if p.name != n.name]
        if not peers:
            return 0.0
        region = self.topology.nodes[n.name].region
        same = [p for p in peers if self.topology.nodes[p.name].region == region]
        donor = min(same or peers, key=lambda p: self.topology.path_latency_ms(n.name, p.name))
        parts = self.call(
            [
                donor.actor.send_state.remote(self.rank(n.name)),
                n.actor.recv_state.remote(self.rank(donor.name)),
            ],
            "state fetch for a joining worker",
        )
        seconds = self.account(parts)
        self.record(
            "join",
            n.name,
            source=donor.name,
            fetch_s=seconds,
            fetched_bytes=sum(r["bytes"] for r in parts[0]),
        )
        return seconds

    # ------------------------------------------------------------------ evaluation
    def model_vector(self) -> np.ndarray:
        """The run's model: the server's (async, ssp, easgd), else the mean of the live workers' (equal for
        the synchronous strategies and DiLoCo after a round; the consensus for gossip)."""
        if self.server is not None:
            return ray.get(self.server.params_vector.remote(), timeout=WAIT_S)
        vecs = ray.get([n.actor.params_vector.remote() for n in self.live()], timeout=WAIT_S)
        mean = np.mean(vecs, axis=0)
        self.spread = max(float(np.abs(v - mean).max()) for v in vecs)
        return mean

    @torch.no_grad()
    def val_loss(self) -> float:
        unflat_(torch.from_numpy(np.array(self.model_vector(), dtype=np.float32)), self.eval_params)
        losses = [float(lm_loss(self.eval_model, self.val[i : i + 16])) for i in range(0, len(self.val), 16)]
        sizes = [len(self.val[i : i + 16]) for i in range(0, len(self.val), 16)]
        return float(np.average(losses, weights=sizes))

    def maybe_eval(self, force: bool = False) -> None:
        milestone = self.budget * self.next_eval / self.config.evals
        if force and self.evals and self.evals[-1]["tokens"] == self.tokens:
            return  # already evaluated at exactly this point
        if force or self.tokens >= milestone:
            loss = self.val_loss()
            self.evals.append(
                {
                    "t_s": self.now,
                    "tokens": self.tokens,
                    "inter_region_bytes": self.inter_region_bytes,
                    "val_loss": loss,
                }
            )
            self.record("eval", None, val_loss=loss)
            self.progress(
                f"  t={self.now:8.2f}s  tokens {self.tokens:>8}/{self.budget}  val loss {loss:.4f}  "
                f"inter-region {self.inter_region_bytes / 2**20:8.1f} MiB"
            )
            while self.budget * self.next_eval / self.config.evals <= self.tokens:
                self.next_eval += 1
            self.flush()
            if not force and 0 < self.tokens < self.budget:
                self.checkpoint()

    def flush(self) -> None:
        """Write the metrics and the ledger so far into the run directory (atomically)."""
        if self.out is not None:
            write_parquet(self.out / "metrics.parquet", self.metrics)
            self.ledger.save(self.out / "ledger.parquet")
        rows = self.ledger.rows()[self._exported_rows :]  # transfers since the last flush
        self.exported.transfers(rows)
        self._exported_rows += len(rows)
        for region, sent in egress_by_region(self.topology, rows).items():
            self._egress[region] = self._egress.get(region, 0.0) + sent
        if self.exported.enabled:
            busy, up = self.energy_use(self.now)
            bill = account(self.topology, busy_s=busy, wall_s=up, egress_bytes=self._egress)
            self.exported.energy(
                {n: b["joules"] for n, b in bill["by_node"].items()},
                steps=self.tokens // self.tokens_per_step,
                usd=bill["usd"]["total"],
            )

    def shutdown(self) -> None:
        self.exported.close()
        self.groups.close()
        if self.pool is not None:
            return  # the pool's owner ends them
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                ray.kill(n.actor, no_restart=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.server, no_restart=True)
        if self.reservation is not None:
            self.reservation.close()


def default_server_node(topology: Topology, nodes: list[str]) -> str:
    """Where the parameter server goes: the node with the least total latency to the workers."""
    return min(topology.nodes, key=lambda s: (sum(topology.path_latency_ms(s, n) for n in nodes), s))


def check_run(
    config: SyncConfig,
    topology: Topology,
    nodes: list[str],
    churn: list[ChurnEvent],
    server_node: str | None = None,
) -> None:
    """Everything about a run that can be wrong before any actor starts, reported at once (SyncError)."""
    where = f"topology {topology.name!r}"
    problems = []
    unknown = [n for n in nodes if n not in topology.nodes]
    if unknown:
        problems.append(f"workers {unknown} are not nodes of {where}; nodes are {sorted(topology.nodes)}")
    if len(set(nodes)) != len(nodes) or not nodes:
        problems.append(f"workers {nodes}: need at least one, each node at most once")
    bad = sorted({e.node for e in churn if e.node not in nodes})
    if bad:
        problems.append(f"churn names {bad}, which are not workers of this run; workers are {nodes}")
    for what, names in (("slowdown", config.slowdown), ("transient", config.transient)):
        bad = sorted(n for n in names if n not in topology.nodes)
        if bad:
            problems.append(
                f"{what} names {bad}, which are not nodes of {where}; nodes are {sorted(topology.nodes)}"
            )
    if server_node is not None and server_node not in topology.nodes:
        problems.append(
            f"server node {server_node!r} is not a node of {where}; nodes are {sorted(topology.nodes)}"
        )
    if problems:
        raise SyncError("; ".join(problems))


def run_sync(
    config: SyncConfig,
    topology: Topology,
    *,
    data_dir: str | Path,
    out: str | Path,
    nodes: list[str] | None = None,
    server_node: str | None = None,
    churn: list[ChurnEvent] | None = None,
    progress: Callable[[str], None] = print,
    pool: WorkerPool | None = None,
    resume: bool = False,
    resumable: bool = True,
) -> dict[str, Any]:
    """Run one strategy on a connected Ray cluster; writes the run directory and returns the summary.
    The strategy (``config.strategy``, from edgeray.train.strategies) drives the run; this function only
    prepares it, applies the failure policy and writes the results.

    ``data_dir``: shards from :func:`edgeray.model.shards.build_shards` (one per node). ``nodes``: the workers
    (default: every topology node). ``server_node``: the parameter server's node (async, ssp, easgd; default
    the node nearest to all workers). ``pool``: reuse worker processes across runs (see :class:`WorkerPool`).

    Checkpoints: at every evaluation but the last, ``OUT/resume`` holds everything the rest of the run
    depends on (see :meth:`Run.checkpoint`); ``resume=True`` continues from it, with the same arguments, on
    the same loss trajectory as a run never interrupted. It is removed when the run completes.
    ``resumable=False`` skips them (each costs a snapshot of every worker: ~3 s for six tiny-model workers
    here); for comparisons that would rather rerun than resume."""
    nodes = list(nodes or topology.nodes)
    churn = list(churn or [])
    check_run(config, topology, nodes, churn, server_node)
    data_dir = Path(data_dir).resolve()  # actors resolve paths in their own working directory
    if config.init_from is not None:
        vocab = json.loads((Path(config.init_from) / "config.json").read_text()).get("vocab_size")
        data_vocab = json.loads((data_dir / "manifest.json").read_text()).get("vocab_size")
        if vocab != data_vocab:
            raise SyncError(
                f"init_from = {config.init_from!r}: its vocabulary has {vocab} tokens, the shards in "
                f"{data_dir} were tokenized with {data_vocab}; start from a checkpoint of the same tokenizer"
            )
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    strategy = config.strategy_class()(config.params)
    uses_server = strategy.uses_server
    server = (server_node or default_server_node(topology, nodes)) if uses_server else None
    run_config = json.dumps(
        {
            "sync": asdict(config),
            "topology": str(topology.path),
            "topology_digest": topology.digest(),
            "nodes": nodes,
            "server_node": server,
            "churn": [asdict(e) for e in churn],
        },
        indent=2,
    )
    restore = _resume_point(out, run_config, config.strategy, strategy) if resume else None
    write_atomic(out / "config.json", run_config)
    progress(
        f"{config.strategy}: {len(nodes)} workers"
        + (f", server on {server}" if server else "")
        + f", budget {config.steps} steps x {len(nodes)} workers x {config.batch_size} sequences"
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    run = Run(config, topology, data_dir, nodes, server, churn, progress, pool, out, restore)
    run.strategy = strategy if resumable else None
    try:
        if run.restored is not None:
            progress(f"resuming at tokens {run.tokens}/{run.budget}, modelled t={run.now:.2f} s ({restore})")
            strategy.load_state_dict(run.restored["strategy"], run)
            run.regroup()
        strategy.run(run)
        run.maybe_eval(force=True)  # leaves the final model in run.eval_model
    finally:
        run.shutdown()
        run.flush()  # what was measured survives a failed run
    tokenizer: Any = (
        AutoTokenizer.from_pretrained(config.init_from)
        if config.init_from is not None
        else train_tokenizer(PRESETS[config.preset].vocab_size)
    )
    save_pretrained(strategy.export_model(run.eval_model), tokenizer, out / "checkpoint")
    final = run.evals[-1]
    per_node = {
        name: {"steps": n.steps, "tokens": n.tokens, "alive": n.alive, "slowdown": run.slowdown(name)}
        for name, n in run.nodes.items()
    }
    summary = {
        "strategy": config.strategy,
        "final_val_loss": final["val_loss"],
        "inter_region_bytes": run.inter_region_bytes,
        "modelled_wall_s": run.now,
        "modelled_s": run.now,  # the name every fabric user's summary has (pipeline, MoE)
        "steps": run.tokens // run.tokens_per_step,
        "tokens": run.tokens,
        "token_budget": run.budget,
        "bytes_by_class": run.ledger.bytes_by_class(),
        "nodes": per_node,
        "left": [m for m in run.metrics if m["event"] == "leave"],
        "joined": [m for m in run.metrics if m["event"] == "join"],
        "evals": run.evals,
        "replica_spread": run.spread,
        "measured_s": time.perf_counter() - t0,
        "resumed_at_tokens": run.restored["run"]["tokens"] if run.restored else None,
    }
    busy, up = run.energy_use(run.now)
    summary["energy"] = account(
        topology,
        busy_s=busy,
        wall_s=up,
        egress_bytes=egress_by_region(topology, run.ledger.rows()),
        units={"step": summary["steps"]},
    )
    summary["drained"] = [m["node"] for m in run.metrics if m.get("reason") == "energy budget"]
    summary.update(strategy.summary(run))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    for leftover in (out / "resume", out / ".resume.old"):  # the run is complete: nothing to resume
        shutil.rmtree(leftover, ignore_errors=True)
    progress(
        f"{config.strategy}: val loss {summary['final_val_loss']:.4f}, modelled {summary['modelled_wall_s']:.1f} s, "
        f"inter-region {summary['inter_region_bytes'] / 2**20:.1f} MiB, {summary['tokens']} tokens "
        f"({summary['measured_s']:.0f} s here)"
    )
    return summary


def _resume_point(out: Path, run_config: str, name: str, strategy: Strategy) -> Path:
    """The checkpoint ``resume`` continues from, after checking it belongs to this very run (SyncError)."""
    if not strategy.resumable():
        raise SyncError(
            f"resume: strategy {name!r} names no driver state (Strategy.driver_state), so its runs are not "
            "checkpointed; resumable strategies: "
            f"{[s for s in strategy_names() if get_strategy(s).resumable()]}"
        )
    found = latest_dir(out / "resume")
    if found is None:
        raise SyncError(
            f"resume: no checkpoint at {out / 'resume'} (one is written at every evaluation but the last, "
            "and removed when a run completes)"
        )
    try:
        before = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SyncError(
            f"resume: {out / 'config.json'} of the interrupted run is unreadable: {exc}"
        ) from None
    now = json.loads(run_config)
    changed = []
    for section, value in now.items():
        if isinstance(value, dict):
            changed += [f"{section}.{k}" for k in value if before.get(section, {}).get(k) != value[k]]
        elif section != "topology" and before.get(section) != value:  # the file may lie elsewhere now
            changed.append(section)
    if changed:
        raise SyncError(
            f"resume: {out / 'config.json'} was written by a run with other settings ({', '.join(sorted(changed))} "
            "differ); resume with the same arguments, or start a new run in another directory"
        )
    return found


def prepare_data(topology: Topology, data_dir: str | Path, *, seq_len: int, non_iid: bool = False) -> Path:
    """Shards for every topology node in ``data_dir`` (built once; rebuilt when the sequence length or the
    split differs)."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    have = json.loads(manifest.read_text()) if manifest.exists() else {}
    if (
        have.get("seq_len") != seq_len
        or bool(have.get("non_iid")) != non_iid
        or set(topology.nodes) - set(have.get("nodes", {}))
    ):
        build_shards(topology, train_tokenizer(), data_dir, seq_len=seq_len, non_iid=non_iid)
    return data_dir


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """Event rows (heterogeneous keys; dicts stored as JSON text) as Parquet, atomically."""
    keys = sorted({k for r in rows for k in r})
    columns = {k: [json.dumps(r[k]) if isinstance(r.get(k), dict) else r.get(k) for r in rows] for k in keys}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)
