"""Decentralized data-parallel training: one interface, seven ways to keep edge workers in step.

    summary = run_sync(SyncConfig(strategy="diloco", steps=200), topology, out="runs/diloco")

Every worker is a :class:`SyncWorker` Ray actor on its own topology node, training the tiny Llama on that
node's Parquet shard; every byte between them (gradients, parameters, pseudo-gradients, state for a
joining node) moves through the fabric, so the ledger counts it and the link model times it.

| strategy | what moves, when | waits for |
|---|---|---|
| ``sync`` | ring all-reduce of gradients over every worker, each step | everyone, each step |
| ``sync-hier`` | the same, hierarchical (reduce in region, leaders' ring, broadcast) | everyone, each step |
| ``async`` | push gradient to a parameter server, pull parameters (optional staleness bound: older gradients are dropped) | the server only |
| ``ssp`` | as ``async``; a worker may be at most ``ssp_bound`` steps ahead of the slowest live one | the slowest, beyond the bound |
| ``easgd`` | every ``easgd_period`` local steps, an elastic exchange with the server's center variable | the server only |
| ``gossip`` | after each local step, average parameters with one random live peer (AD-PSGD style) | one peer |
| ``diloco`` | inner optimizer steps inside each region (gradients all-reduced in the region), then every round an outer Nesterov step on the pseudo-gradient averaged across regions (hierarchical, optional codec) | the round's end |

Time is modelled, not measured: the driver keeps a virtual clock per worker and runs every worker's
events in modelled-time order (a step costs ``compute_s`` x the node's ``slowdown``; a transfer costs what
the link model says for its bytes on its route). The same configuration gives the same run, and a 2-core
machine emulates a fleet whose speeds it does not have. The parameter server serializes its updates (its
clock), applying them in the order workers finish computing. DiLoCo rounds last ``diloco_h`` inner steps
of the fastest region; with ``diloco_fit`` a slower region runs the inner steps that fit in that window
(at least one), and pseudo-gradients are weighted by the tokens behind them.

Churn: :class:`ChurnEvent` (from a schedule or sampled from the topology's availability / MTBF) takes a
node's actor down (``ray.kill``) or brings a new one up at a modelled instant. Groups are re-formed over
the live nodes; a joining node fetches the current state over the fabric (the server's parameters, a live
peer's parameters and optimizer state, or its region's DiLoCo state). A worker that dies unannounced is
found by its failing call and treated the same way. Metrics record every leave and join with what the
node had contributed.

Run directory: ``config.json``, ``metrics.parquet`` (one row per event: step, node, modelled time, loss,
tokens, staleness, validation loss at evaluations), ``ledger.parquet`` and ``summary.json``
(``final_val_loss``, ``inter_region_bytes``, ``modelled_wall_s``, ``steps``, ``tokens``, ...).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import random
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

from edgeray.atomic import write_atomic
from edgeray.errors import EdgerayError
from edgeray.fabric.backend import BACKEND, EdgeGroup, Fabric, FabricError, install
from edgeray.fabric.codecs import CODECS
from edgeray.fabric.collectives import GroupPlan, Membership, hierarchical_allreduce
from edgeray.fabric.ledger import Ledger, modelled_critical_path
from edgeray.model.presets import PRESETS, build_model, save_pretrained
from edgeray.model.shards import build_shards, read_shard, read_validation
from edgeray.model.tokenizer import train_tokenizer
from edgeray.placement import pin
from edgeray.topology import Topology, load_topology

STRATEGIES = ("sync", "sync-hier", "async", "ssp", "easgd", "gossip", "diloco")
OPTIMIZERS = ("adamw", "sgd")
WAIT_S = 300.0
"""Bound on every driver wait for a worker call (a collective's own transfers time out sooner)."""
PS_GROUP = "ps"


class SyncError(EdgerayError):
    """A sync run that cannot go on (bad configuration, every worker gone)."""


@dataclass(frozen=True)
class SyncConfig:
    """One data-parallel run, validated on construction."""

    strategy: str = "sync"
    preset: str = "tiny"
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
    staleness: int | None = None
    """async: drop a gradient computed on parameters more than this many server versions old."""
    staleness_lr: bool = True
    """async / ssp: the server divides its learning rate by each gradient's staleness (staleness-aware
    asynchronous SGD, Zhang et al. 2016); without it, stale AdamW updates make the loss climb back."""
    ssp_bound: int = 3
    easgd_alpha: float = 0.15
    """Elasticity: each exchange moves worker and center this fraction of their difference."""
    easgd_period: int = 4
    diloco_h: int = 20
    """Inner steps per round (of the fastest region)."""
    diloco_fit: bool = True
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    """Nesterov momentum of DiLoCo's outer SGD (0 = plain SGD)."""
    codec: str = "none"
    """Codec on the inter-region hops of DiLoCo's outer all-reduce and of sync-hier (see edgeray.fabric)."""
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
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy = {self.strategy!r}: valid strategies are {list(STRATEGIES)}")
        if self.preset not in PRESETS:
            problems.append(f"preset = {self.preset!r}: valid presets are {sorted(PRESETS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer = {self.optimizer!r}: valid optimizers are {list(OPTIMIZERS)}")
        if self.codec not in CODECS:
            problems.append(f"codec = {self.codec!r}: valid codecs are {sorted(CODECS)}")
        for name in ("batch_size", "steps", "ssp_bound", "easgd_period", "diloco_h", "evals"):
            if getattr(self, name) < (0 if name == "ssp_bound" else 1):
                problems.append(
                    f"{name} = {getattr(self, name)}: must be >= {0 if name == 'ssp_bound' else 1}"
                )
        if self.staleness is not None and self.staleness < 0:
            problems.append(f"staleness = {self.staleness}: must be >= 0 or None (unbounded)")
        if not 0 < self.easgd_alpha <= 1:
            problems.append(f"easgd_alpha = {self.easgd_alpha}: must be in (0, 1]")
        if not 0 <= self.outer_momentum < 1:
            problems.append(f"outer_momentum = {self.outer_momentum}: must be in [0, 1)")
        for name in ("lr", "compute_s", "outer_lr", "timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} = {getattr(self, name)}: must be > 0")
        bad = {n: f for n, f in self.slowdown.items() if not f >= 1}
        if bad:
            problems.append(f"slowdown = {bad}: factors must be >= 1")
        if problems:
            raise SyncError("sync config: " + "; ".join(problems))


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
def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _unflat_(vec: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(vec[offset : offset + n].view_as(t))
        offset += n


def lm_loss(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``batch`` (N, T + 1): inputs are the first T, targets the last T."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


@ray.remote(num_cpus=0)
class SyncWorker:
    """A data-parallel worker (``role="worker"``) or the parameter server (``role="server"``) on one node."""

    def __init__(
        self, config: SyncConfig, topology_path: str, node: str, data_dir: str | None, role: str = "worker"
    ) -> None:
        self.joined: list[str] = []
        self.reset(config, topology_path, node, data_dir, role)

    def reset(
        self, config: SyncConfig, topology_path: str, node: str, data_dir: str | None, role: str = "worker"
    ) -> str:
        """Start over for a new run (a :class:`WorkerPool` reuses actors: no process start per run)."""
        self._leave_groups()
        self.config, self.node, self.role = config, node, role
        torch.set_num_threads(config.torch_threads)
        self.fabric = Fabric.from_topology(
            load_topology(topology_path), node=node, seed=config.seed, timeout_s=config.timeout_s
        )
        install(self.fabric)
        self.model = build_model(config.preset, seed=config.seed)
        self.params = list(self.model.parameters())
        self.numel = sum(p.numel() for p in self.params)
        self.optimizer = make_optimizer(config.optimizer, self.params, config.lr)
        self.shard = read_shard(data_dir, node) if role == "worker" and data_dir else None
        self.steps = 0
        self.grad: torch.Tensor | None = None
        self.plan: GroupPlan | None = None
        self.version = 0  # server: updates applied
        self.pending: dict[int, torch.Tensor] = {}  # server: received gradients by worker rank
        # DiLoCo: the global (outer) parameters and the outer optimizer on them.
        self.outer: torch.nn.Parameter | None = None
        self.outer_opt: torch.optim.Optimizer | None = None
        if config.strategy == "diloco":
            self.outer = torch.nn.Parameter(_flat(self.params))
            self.outer_opt = torch.optim.SGD(
                [self.outer],
                lr=config.outer_lr,
                momentum=config.outer_momentum,
                nesterov=config.outer_momentum > 0,
            )
        return node

    def ping(self) -> str:
        return self.node

    def _leave_groups(self) -> None:
        import ray.util.collective as col

        for name in self.joined:
            with contextlib.suppress(Exception):
                col.destroy_collective_group(name)
        self.joined = []

    # ------------------------------------------------------------------ groups
    def join(self, plan: GroupPlan | None, memberships: list[Membership]) -> list[str]:
        """Leave the previous generation's groups and join these (every member calls at once)."""
        import ray.util.collective as col

        self._leave_groups()
        self.plan = plan
        for m in memberships:
            col.init_collective_group(m.world_size, m.rank, backend=BACKEND, group_name=m.group)  # type: ignore[arg-type]
            self.joined.append(m.group)
        return self.joined

    def _rows(self) -> list[dict[str, Any]]:
        rows = self.fabric.ledger.rows()
        self.fabric.ledger.clear()
        return rows

    # ------------------------------------------------------------------ local work
    def compute(self) -> dict[str, Any]:
        """Forward and backward on this node's next batch; keeps the flat gradient for a later call."""
        assert self.shard is not None, "the server holds no data"
        b = self.config.batch_size
        rows = [(self.steps * b + i) % len(self.shard) for i in range(b)]
        batch = self.shard[rows]
        self.model.zero_grad(set_to_none=False)
        loss = lm_loss(self.model, batch)
        loss.backward()
        self.grad = _flat(p.grad for p in self.params)  # type: ignore[misc]
        self.steps += 1
        return {"loss": float(loss), "tokens": int(batch[:, 1:].numel()), "step": self.steps}

    def _apply(self, grad: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = grad[offset : offset + n].view_as(p).clone()
            offset += n
        self.optimizer.step()

    def apply_local(self) -> None:
        assert self.grad is not None
        self._apply(self.grad)

    def allreduce_step(self, scope: str, scale: float) -> list[dict[str, Any]]:
        """Average the kept gradient over ``scope`` ("global", "hierarchical" or "region") and step."""
        assert self.grad is not None and self.plan is not None
        grad = self.grad * scale  # a copy: a failed collective leaves self.grad intact for the retry
        plan = self.plan
        if scope == "global":
            EdgeGroup.get(plan.name("global")).ring_allreduce(grad)
        elif scope == "hierarchical":
            hierarchical_allreduce(grad, plan, self.node, codec=self.config.codec)
        else:
            group = EdgeGroup.get(plan.name(f"region/{plan.region_of(self.node)}"))
            if group.world_size > 1:
                group.ring_allreduce(grad)
        self._apply(grad)
        return self._rows()

    # ------------------------------------------------------------------ parameter server
    def push_grad(self, dst: int = 0) -> list[dict[str, Any]]:
        assert self.grad is not None
        EdgeGroup.get(self._ps_group()).send_to(self.grad, dst)
        return self._rows()

    def receive_grad(self, src: int) -> list[dict[str, Any]]:
        buf = torch.empty(self.numel)
        self.pending[src] = EdgeGroup.get(self._ps_group()).recv_from(buf, src)
        return self._rows()

    def apply_pending(self, src: int, drop: bool = False, staleness: int = 0) -> int:
        """Server: apply (or drop, when too stale) the gradient received from ``src``; returns the version."""
        grad = self.pending.pop(src)
        if not drop:
            lr = self.config.lr / max(1, staleness) if self.config.staleness_lr else self.config.lr
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._apply(grad)
            self.version += 1
        return self.version

    def send_params(self, dst: int, group: str | None = None) -> list[dict[str, Any]]:
        EdgeGroup.get(group or self._ps_group()).send_to(_flat(self.params), dst)
        return self._rows()

    def recv_params(self, src: int, group: str | None = None) -> list[dict[str, Any]]:
        buf = torch.empty(self.numel)
        _unflat_(EdgeGroup.get(group or self._ps_group()).recv_from(buf, src), self.params)
        return self._rows()

    def _ps_group(self) -> str:
        assert self.plan is not None
        return self.plan.name(PS_GROUP)

    # ------------------------------------------------------------------ EASGD
    def easgd_worker(self) -> list[dict[str, Any]]:
        """Worker side of an elastic exchange: get the center, move toward it, send the move to the server."""
        group = EdgeGroup.get(self._ps_group())
        center = group.recv_from(torch.empty(self.numel), 0)
        mine = _flat(self.params)
        diff = self.config.easgd_alpha * (mine - center)
        _unflat_(mine - diff, self.params)
        group.send_to(diff, 0)
        return self._rows()

    def easgd_server(self, src: int) -> list[dict[str, Any]]:
        group = EdgeGroup.get(self._ps_group())
        group.send_to(_flat(self.params), src)
        diff = group.recv_from(torch.empty(self.numel), src)
        _unflat_(_flat(self.params) + diff, self.params)
        self.version += 1
        return self._rows()

    # ------------------------------------------------------------------ gossip
    def gossip(self, peer_rank: int) -> list[dict[str, Any]]:
        """Swap parameters with ``peer_rank`` of the global group and keep the mean (both sides call this)."""
        assert self.plan is not None
        mine = _flat(self.params)
        other = EdgeGroup.get(self.plan.name("global")).pair_exchange(mine, peer_rank)
        _unflat_((mine + other) * 0.5, self.params)
        return self._rows()

    # ------------------------------------------------------------------ DiLoCo
    def diloco_outer(self, weight: float) -> list[dict[str, Any]]:
        """Average the weighted pseudo-gradient (global - local parameters) over every worker, take the outer
        step on the global parameters and restart the inner loop from them."""
        assert self.plan is not None and self.outer is not None and self.outer_opt is not None
        delta = (self.outer.detach() - _flat(self.params)) * weight
        hierarchical_allreduce(delta, self.plan, self.node, codec=self.config.codec)
        self.outer.grad = delta
        self.outer_opt.step()
        _unflat_(self.outer.detach(), self.params)
        return self._rows()

    # ------------------------------------------------------------------ state (joining nodes)
    def _state_tensors(self) -> list[torch.Tensor]:
        out = [_flat(self.params)]
        if self.config.strategy in ("sync", "sync-hier", "diloco"):
            for p in self.params:
                st = self.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq") if self.config.optimizer == "adamw" else ():
                    out.append(st[key].reshape(-1) if key in st else torch.zeros(p.numel()))
            step = next((float(s["step"]) for s in self.optimizer.state.values() if "step" in s), 0.0)
            out.append(torch.tensor([step]))
        if self.outer is not None and self.outer_opt is not None:
            out.append(self.outer.detach().clone())
            buf = self.outer_opt.state.get(self.outer, {}).get("momentum_buffer")
            out.append(buf.reshape(-1).clone() if buf is not None else torch.zeros(self.numel))
        return [t.reshape(-1).float() for t in out]

    def send_state(self, dst: int) -> list[dict[str, Any]]:
        assert self.plan is not None
        EdgeGroup.get(self.plan.name("global")).send_to(torch.cat(self._state_tensors()), dst)
        return self._rows()

    def recv_state(self, src: int) -> list[dict[str, Any]]:
        assert self.plan is not None
        layout = self._state_tensors()
        vec = EdgeGroup.get(self.plan.name("global")).recv_from(
            torch.empty(sum(t.numel() for t in layout)), src
        )
        parts = list(torch.split(vec, [t.numel() for t in layout]))
        _unflat_(parts.pop(0), self.params)
        if self.config.strategy in ("sync", "sync-hier", "diloco"):
            step = float(parts[2 * len(self.params)].item()) if self.config.optimizer == "adamw" else 0.0
            if self.config.optimizer == "adamw" and step > 0:
                for i, p in enumerate(self.params):
                    self.optimizer.state[p] = {
                        "step": torch.tensor(step),
                        "exp_avg": parts[2 * i].view_as(p).clone(),
                        "exp_avg_sq": parts[2 * i + 1].view_as(p).clone(),
                    }
            parts = parts[2 * len(self.params) + 1 :] if self.config.optimizer == "adamw" else parts[1:]
        if self.outer is not None and self.outer_opt is not None:
            self.outer.data.copy_(parts[0])
            if self.config.outer_momentum > 0 and bool(parts[1].abs().sum() > 0):
                self.outer_opt.state[self.outer] = {"momentum_buffer": parts[1].clone()}
        return self._rows()

    def params_vector(self) -> np.ndarray:
        return _flat(self.params).numpy()


# --------------------------------------------------------------------------------------------- the driver
class WorkerPool:
    """Actors kept across runs (one per node and role), so that a comparison of strategies starts each
    worker process once: ``with WorkerPool() as pool: run_sync(..., pool=pool)``. Actors a run kills
    (churn) are dropped and replaced on demand."""

    def __init__(self) -> None:
        self.actors: dict[tuple[str, str], Any] = {}

    def take(self, config: SyncConfig, topology: Topology, node: str, data_dir: Path, role: str) -> Any:
        actor = self.actors.get((node, role))
        if actor is not None:
            try:
                ray.get(
                    actor.reset.remote(config, str(topology.path), node, str(data_dir), role), timeout=WAIT_S
                )
                return actor
            except ray.exceptions.RayError:
                pass  # killed by the last run's churn: start a new one
        actor = pin(SyncWorker, node=node).remote(config, str(topology.path), node, str(data_dir), role)
        self.actors[(node, role)] = actor
        return actor

    def close(self) -> None:
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Node:
    name: str
    actor: Any
    alive: bool = True
    steps: int = 0
    tokens: int = 0
    version: int = 0  # server version its parameters came from (async / ssp)
    start_steps: int = 0  # a joining node's SSP clock starts at the slowest live worker's
    inc: int = 0  # incarnation: events of a node that left are void after it rejoins
    last: dict[str, Any] = field(default_factory=dict)  # its latest compute() result


class _Run:
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
    ) -> None:
        self.config, self.topology, self.data_dir, self.progress = config, topology, data_dir, progress
        self.pool = pool
        self.order = [n.name for n in topology.iter_nodes() if n.name in set(nodes)]
        self.run_id = f"sync/{os.getpid()}/{time.time_ns()}"
        self.gen = 0
        self.plan: GroupPlan | None = None
        self.nodes: dict[str, _Node] = {}
        self.crashed_at: dict[str, float] = {}
        self.incarnations = 0
        for name in self.order:
            self.nodes[name] = _Node(name, self._spawn(name, "worker"))
        self.server: Any = self._spawn(server_node, "server") if server_node else None
        self.server_node = server_node
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
        self.eval_model = build_model(config.preset, seed=config.seed)
        self.eval_model.eval()
        self.next_eval = 0
        self.evals: list[dict[str, Any]] = []
        self.spread: float | None = None
        """Largest difference of a live worker's parameters from their mean at the last evaluation."""

    # ------------------------------------------------------------------ actors and groups
    def _spawn(self, node: str, role: str) -> Any:
        if self.pool is not None:
            return self.pool.take(self.config, self.topology, node, self.data_dir, role)
        return pin(SyncWorker, node=node).remote(
            self.config, str(self.topology.path), node, str(self.data_dir), role
        )

    def live(self) -> list[_Node]:
        return [n for n in self.nodes.values() if n.alive]

    def slowdown(self, node: str) -> float:
        return self.config.slowdown.get(node, self.topology.nodes[node].slowdown)

    def compute_s(self, node: str) -> float:
        return self.config.compute_s * self.slowdown(node)

    def regroup(self) -> None:
        """Form a new generation of groups over the live workers (and the server)."""
        live = self.live()
        if not live:
            raise SyncError("every worker has left: nothing can train")
        self.gen += 1
        plan = GroupPlan.from_nodes(
            self.topology, [n.name for n in live], prefix=f"{self.run_id}/g{self.gen}/"
        )
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
            ray.get(calls, timeout=WAIT_S)
        except ray.exceptions.RayError:
            if not self.find_dead():  # a member that crashed unnoticed: form the groups without it
                raise
            self.regroup()

    def rank(self, node: str) -> int:
        assert self.plan is not None
        return self.plan.nodes.index(node)

    def call(self, refs: list[Any]) -> list[Any]:
        return ray.get(refs, timeout=WAIT_S)

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

    def dead(self, n: _Node) -> bool:
        try:
            ray.get(n.actor.ping.remote(), timeout=10)
            return False
        except Exception:
            return True

    def leave(self, n: _Node, at: float, why: str) -> None:
        if not n.alive:
            return
        n.alive = False
        with contextlib.suppress(Exception):
            ray.kill(n.actor, no_restart=True)
        self.now = max(self.now, at)
        steps = n.steps - n.start_steps
        self.record("leave", n.name, reason=why, contributed_tokens=n.tokens, contributed_steps=steps)
        self.progress(
            f"  t={at:8.2f}s  {n.name} left ({why}) after {steps} steps / {n.tokens} tokens contributed"
        )

    def find_dead(self) -> list[_Node]:
        gone = [n for n in self.live() if self.dead(n)]
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
        self, until: float, on_join: Callable[[_Node, float], None], *, regroup_on_leave: bool
    ) -> None:
        """Apply churn events due by modelled time ``until``. A leave kills the node's actor (its groups are
        re-formed when the strategy needs every member, ``regroup_on_leave``); a join starts a new actor,
        re-forms the groups with it and lets the strategy hand it the current state (``on_join``)."""
        left = False
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
                self.nodes[name] = _Node(
                    name,
                    self._spawn(name, "worker"),
                    steps=slowest,
                    start_steps=slowest,
                    inc=self.incarnations,
                )
                self.progress(f"  t={at:8.2f}s  {name} joins")
                self.regroup()
                left = False  # the new groups already leave out whoever left
                on_join(self.nodes[name], at)
        if left and regroup_on_leave:
            self.regroup()

    def fetch_from_server(self, n: _Node) -> float:
        """A joining worker pulls the parameter server's current parameters over the fabric."""
        parts = self.call(
            [self.server.send_params.remote(self.rank(n.name) + 1), n.actor.recv_params.remote(0)]
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

    def fetch_from_peer(self, n: _Node, at: float) -> float:
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
            ]
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
        _unflat_(
            torch.from_numpy(np.array(self.model_vector(), dtype=np.float32)), self.eval_model.parameters()
        )
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

    def shutdown(self) -> None:
        if self.pool is not None:
            return  # the pool's owner ends them
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                ray.kill(n.actor, no_restart=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.server, no_restart=True)


# ----------------------------------------------------------------------------------- synchronous (flat, hier)
def _run_synchronous(run: _Run) -> None:
    scope = "global" if run.config.strategy == "sync" else "hierarchical"
    run.regroup()
    run.maybe_eval()

    def on_join(n: _Node, at: float) -> None:
        run.fetch_from_peer(n, at)

    step = 0
    while run.tokens < run.budget:
        run.apply_churn(run.now, on_join, regroup_on_leave=True)
        live = run.live()
        try:
            results = dict(
                zip([n.name for n in live], run.call([n.actor.compute.remote() for n in live]), strict=True)
            )
        except ray.exceptions.RayError:
            run.find_dead()
            run.regroup()
            continue
        for attempt in range(3):
            try:
                parts = run.call([n.actor.allreduce_step.remote(scope, 1.0 / len(live)) for n in live])
                break
            except (ray.exceptions.RayError, FabricError) as exc:  # a member died mid-collective
                if not run.find_dead() or attempt == 2:
                    raise SyncError(f"{scope} all-reduce failed and no member was found dead: {exc}") from exc
                run.regroup()  # the survivors still hold their gradients: average those
                live = run.live()
        step_compute = max(run.compute_s(n.name) for n in live)
        comm = run.account(parts)
        run.now += step_compute + comm
        for n in live:
            n.steps += 1
            n.tokens += results[n.name]["tokens"]
            run.tokens += results[n.name]["tokens"]
        step += 1
        loss = float(np.mean([results[n.name]["loss"] for n in live]))
        run.record("step", None, step=step, loss=loss, workers=len(live), comm_s=comm, compute_s=step_compute)
        run.maybe_eval()


class _Events:
    """Modelled-time event queue of the asynchronous strategies. Each event carries the incarnation of its
    node, so events of a node that left and came back are recognisably stale."""

    def __init__(self, run: _Run, kind: str = "start") -> None:
        self.run = run
        self.heap: list[tuple[float, int, str, str, int]] = []
        self.seq = 0
        for n in run.live():
            self.push(0.0, kind, n.name)

    def push(self, t: float, kind: str, node: str) -> None:
        heapq.heappush(self.heap, (t, self.seq, kind, node, self.run.nodes[node].inc))
        self.seq += 1

    def pop(self) -> tuple[float, str, str, int]:
        t, _, kind, node, inc = heapq.heappop(self.heap)
        return t, kind, node, inc

    def __bool__(self) -> bool:
        return bool(self.heap)


# ------------------------------------------------------------------------------ parameter server (async, ssp)
def _run_server(run: _Run) -> None:
    cfg = run.config
    run.regroup()
    run.maybe_eval()
    events = _Events(run)
    push = events.push
    server_clock = 0.0
    version = 0
    blocked: set[str] = set()

    def on_join(n: _Node, at: float) -> None:
        seconds = run.fetch_from_server(n)
        n.version = version
        push(at + seconds, "start", n.name)

    while run.tokens < run.budget:
        if not events and blocked:  # whoever held them back has left: re-check against the live ones
            for b in sorted(blocked):
                push(run.now, "start", b)
            blocked.clear()
        if not events:
            break
        t, kind, name, inc = events.pop()
        run.apply_churn(t, on_join, regroup_on_leave=False)
        n = run.nodes[name]
        if not n.alive or n.inc != inc:
            continue
        run.now = max(run.now, t)
        if kind == "start":
            if cfg.strategy == "ssp":
                slowest = min(m.steps for m in run.live())
                if n.steps - slowest >= cfg.ssp_bound + 1:
                    blocked.add(name)  # resumes when the slowest worker's next update lands
                    run.record("wait", name, step=n.steps, ahead=n.steps - slowest, bound=cfg.ssp_bound)
                    continue
                run.record("start", name, step=n.steps, ahead=n.steps - slowest, bound=cfg.ssp_bound)
            try:
                n.last = run.call([n.actor.compute.remote()])[0]
            except ray.exceptions.RayError:
                run.find_dead()
                continue
            push(t + run.compute_s(name), "push", name)
        else:  # push: the gradient goes to the server, is applied (or dropped), the parameters come back
            rank = run.rank(name) + 1
            try:
                up = run.call([n.actor.push_grad.remote(0), run.server.receive_grad.remote(rank)])
            except (ray.exceptions.RayError, FabricError):
                run.find_dead()
                continue
            arrive = t + run.account(up)
            staleness = version - n.version
            drop = cfg.strategy == "async" and cfg.staleness is not None and staleness > cfg.staleness
            server_clock = max(server_clock, arrive)
            version = run.call([run.server.apply_pending.remote(rank, drop, staleness)])[0]
            down = run.call([run.server.send_params.remote(rank), n.actor.recv_params.remote(0)])
            ready = server_clock + run.account(down)
            n.version = version
            n.steps += 1
            tokens = n.last["tokens"]
            if not drop:
                n.tokens += tokens
                run.tokens += tokens
            run.now = max(run.now, server_clock)
            run.record(
                "dropped" if drop else "update",
                name,
                step=n.steps,
                loss=n.last["loss"],
                staleness=staleness,
                version=version,
            )
            push(ready, "start", name)
            for b in sorted(blocked):
                blocked.discard(b)
                push(server_clock, "start", b)
            run.maybe_eval()
    if run.tokens < run.budget:
        raise SyncError("no worker left to finish the token budget")


# ------------------------------------------------------------------------------------------------- EASGD
def _run_easgd(run: _Run) -> None:
    cfg = run.config
    run.regroup()
    run.maybe_eval()
    events = _Events(run)
    server_clock = 0.0

    def on_join(n: _Node, at: float) -> None:
        events.push(at + run.fetch_from_server(n), "start", n.name)

    while run.tokens < run.budget and events:
        t, _, name, inc = events.pop()
        run.apply_churn(t, on_join, regroup_on_leave=False)
        n = run.nodes[name]
        if not n.alive or n.inc != inc:
            continue
        run.now = max(run.now, t)
        try:
            result = run.call([n.actor.compute.remote()])[0]
            run.call([n.actor.apply_local.remote()])
        except ray.exceptions.RayError:
            run.find_dead()
            continue
        done = t + run.compute_s(name)
        n.steps += 1
        n.tokens += result["tokens"]
        run.tokens += result["tokens"]
        ready = done
        if n.steps % cfg.easgd_period == 0:
            rank = run.rank(name) + 1
            try:
                parts = run.call([n.actor.easgd_worker.remote(), run.server.easgd_server.remote(rank)])
            except (ray.exceptions.RayError, FabricError):
                run.find_dead()
                continue
            server_clock = max(server_clock, done) + run.account(parts)
            ready = server_clock
        run.now = max(run.now, done)
        run.record("step", name, step=n.steps, loss=result["loss"])
        events.push(ready, "start", name)
        run.maybe_eval()


# ------------------------------------------------------------------------------------------------ gossip
def _run_gossip(run: _Run) -> None:
    cfg = run.config
    rng = random.Random(cfg.seed)
    run.regroup()
    run.maybe_eval()
    events = _Events(run)
    push = events.push

    def on_join(n: _Node, at: float) -> None:
        push(at + run.fetch_from_peer(n, at), "start", n.name)

    while run.tokens < run.budget and events:
        t, kind, name, inc = events.pop()
        run.apply_churn(t, on_join, regroup_on_leave=False)
        n = run.nodes[name]
        if not n.alive or n.inc != inc:
            continue
        run.now = max(run.now, t)
        try:
            if kind == "start":
                n.last = run.call([n.actor.compute.remote()])[0]
                push(t + run.compute_s(name), "gossip", name)
                continue
            run.call([n.actor.apply_local.remote()])  # the local step, then average with a random live peer
        except ray.exceptions.RayError:
            run.find_dead()
            continue
        n.steps += 1
        n.tokens += n.last["tokens"]
        run.tokens += n.last["tokens"]
        peers = [p for p in run.live() if p.name != name]
        seconds, peer_name = 0.0, None
        if peers:
            peer = rng.choice(peers)
            try:
                parts = run.call(
                    [n.actor.gossip.remote(run.rank(peer.name)), peer.actor.gossip.remote(run.rank(name))]
                )
                seconds, peer_name = run.account(parts), peer.name
            except (ray.exceptions.RayError, FabricError):
                run.find_dead()  # the step stands; this round's averaging is lost
        run.record("step", name, step=n.steps, loss=n.last["loss"], peer=peer_name, comm_s=seconds)
        if n.alive:
            push(t + seconds, "start", name)
        run.maybe_eval()


# ------------------------------------------------------------------------------------------------ DiLoCo
def _run_diloco(run: _Run) -> None:
    cfg = run.config
    run.regroup()
    run.maybe_eval()
    round_ = 0

    def on_join(n: _Node, at: float) -> None:
        run.fetch_from_peer(n, at)

    while run.tokens < run.budget:
        run.apply_churn(run.now, on_join, regroup_on_leave=True)
        start = run.now
        regions: dict[str, list[_Node]] = {}
        for n in run.live():
            regions.setdefault(run.topology.nodes[n.name].region, []).append(n)
        clock = dict.fromkeys(regions, 0.0)
        last = dict.fromkeys(regions, 0.0)
        round_tokens = {n.name: 0 for n in run.live()}
        window = math.inf
        i = 0
        while True:
            if i == 0:
                active = list(regions)
            else:
                active = [
                    r
                    for r in regions
                    if (i < cfg.diloco_h if not cfg.diloco_fit else clock[r] + last[r] <= window * (1 + 1e-9))
                ]
            room = run.budget - run.tokens  # never past the token budget: regions that fit, in order
            fitting = []
            for r in active:
                if len(regions[r]) * run.tokens_per_step <= room:
                    fitting.append(r)
                    room -= len(regions[r]) * run.tokens_per_step
            active = fitting
            if not active:
                break
            members = [n for r in active for n in regions[r]]
            try:
                results = run.call([n.actor.compute.remote() for n in members])
                parts = run.call(
                    [
                        n.actor.allreduce_step.remote(
                            "region", 1.0 / len(regions[run.topology.nodes[n.name].region])
                        )
                        for n in members
                    ]
                )
            except (ray.exceptions.RayError, FabricError) as exc:
                if not run.find_dead():
                    raise SyncError(f"DiLoCo inner step failed and no member was found dead: {exc}") from exc
                run.regroup()
                # Redo this inner step with the round's survivors. (A region whose own all-reduce completed
                # before the failure surfaced keeps that step, uncounted: a crash costs a little work.)
                regions = {r: [n for n in ns if n.alive] for r, ns in regions.items()}
                regions = {r: ns for r, ns in regions.items() if ns}
                if not regions:
                    raise SyncError("every worker has left: nothing can train") from exc
                continue
            by_node = dict(zip([n.name for n in members], zip(results, parts, strict=True), strict=True))
            for r in active:
                comm = run.account([by_node[n.name][1] for n in regions[r]])
                step = max(run.compute_s(n.name) for n in regions[r]) + comm
                clock[r] += step
                last[r] = step
                for n in regions[r]:
                    tokens = by_node[n.name][0]["tokens"]
                    n.steps += 1
                    n.tokens += tokens
                    round_tokens[n.name] += tokens
                    run.tokens += tokens
                run.record(
                    "inner",
                    None,
                    region=r,
                    round=round_,
                    step=i,
                    loss=float(np.mean([by_node[n.name][0]["loss"] for n in regions[r]])),
                )
            if i == 0:
                window = cfg.diloco_h * min(clock.values())
            i += 1
        live = (
            run.live()
        )  # every member takes part in the all-reduce; weight = its share of the round's tokens
        total = sum(round_tokens.get(n.name, 0) for n in live)
        if total == 0:
            break  # what is left of the budget is less than one region's step
        try:
            parts = run.call([n.actor.diloco_outer.remote(round_tokens.get(n.name, 0) / total) for n in live])
        except (ray.exceptions.RayError, FabricError) as exc:
            if not run.find_dead():
                raise SyncError(
                    f"DiLoCo outer all-reduce failed and no member was found dead: {exc}"
                ) from exc
            run.regroup()
            continue  # the survivors keep their inner progress and sync at the next round
        comm = run.account(parts)
        run.now = start + max(clock.values()) + comm
        run.record(
            "outer",
            None,
            round=round_,
            inner_steps={r: round(clock[r] / max(last[r], 1e-12)) for r in clock},
            comm_s=comm,
        )
        round_ += 1
        run.maybe_eval()


RUNNERS: dict[str, Callable[[_Run], None]] = {
    "sync": _run_synchronous,
    "sync-hier": _run_synchronous,
    "async": _run_server,
    "ssp": _run_server,
    "easgd": _run_easgd,
    "gossip": _run_gossip,
    "diloco": _run_diloco,
}


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
    bad = sorted(n for n in config.slowdown if n not in topology.nodes)
    if bad:
        problems.append(
            f"slowdown names {bad}, which are not nodes of {where}; nodes are {sorted(topology.nodes)}"
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
) -> dict[str, Any]:
    """Run one strategy on a connected Ray cluster; writes the run directory and returns the summary.

    ``data_dir``: shards from :func:`edgeray.model.shards.build_shards` (one per node). ``nodes``: the workers
    (default: every topology node). ``server_node``: the parameter server's node (async, ssp, easgd; default
    the node nearest to all workers). ``pool``: reuse worker processes across runs (see :class:`WorkerPool`)."""
    nodes = list(nodes or topology.nodes)
    churn = list(churn or [])
    check_run(config, topology, nodes, churn, server_node)
    data_dir = Path(data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uses_server = config.strategy in ("async", "ssp", "easgd")
    server = (server_node or default_server_node(topology, nodes)) if uses_server else None
    write_atomic(
        out / "config.json",
        json.dumps(
            {
                "sync": asdict(config),
                "topology": str(topology.path),
                "nodes": nodes,
                "server_node": server,
                "churn": [asdict(e) for e in churn],
            },
            indent=2,
        ),
    )
    progress(
        f"{config.strategy}: {len(nodes)} workers"
        + (f", server on {server}" if server else "")
        + f", budget {config.steps} steps x {len(nodes)} workers x {config.batch_size} sequences"
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    run = _Run(config, topology, data_dir, nodes, server, churn, progress, pool)
    try:
        RUNNERS[config.strategy](run)
        run.maybe_eval(force=True)  # leaves the final model in run.eval_model
    finally:
        run.shutdown()
    save_pretrained(run.eval_model, train_tokenizer(PRESETS[config.preset].vocab_size), out / "checkpoint")
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
    }
    if config.strategy in ("async", "ssp"):
        stale = [m["staleness"] for m in run.metrics if m["event"] in ("update", "dropped")]
        summary["max_staleness"] = max(stale, default=0)
        summary["dropped"] = sum(1 for m in run.metrics if m["event"] == "dropped")
    if config.strategy == "ssp":
        summary["max_ahead"] = max((m["ahead"] for m in run.metrics if m["event"] == "start"), default=0)
        summary["waits"] = sum(1 for m in run.metrics if m["event"] == "wait")
    write_parquet(out / "metrics.parquet", run.metrics)
    run.ledger.save(out / "ledger.parquet")
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    progress(
        f"{config.strategy}: val loss {summary['final_val_loss']:.4f}, modelled {summary['modelled_wall_s']:.1f} s, "
        f"inter-region {summary['inter_region_bytes'] / 2**20:.1f} MiB, {summary['tokens']} tokens "
        f"({summary['measured_s']:.0f} s here)"
    )
    return summary


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
