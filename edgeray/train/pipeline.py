"""Pipeline-parallel training: one actor per stage, activations and gradients over the edge fabric.

    stages = start_pipeline(topology, nodes=["campus-gw", "metro-mec-1"], config=PipelineConfig(...),
                            data_dir="runs/x/data")
    losses = ray.get([s.train_step.remote(step) for s in stages], timeout=600)   # last stage reports loss

Each :class:`StageWorker` builds the model from the preset and seed, keeps only its stage's layers, and runs
its part of the schedule: GPipe (all forwards, then all backwards) or 1F1B (warm-up forwards, then one
forward / one backward, then cool-down backwards) over ``microbatches`` micro-batches. Stage 0 reads its
own node's shard (data never leaves it except as activations) and sends each micro-batch's targets to the
last stage. Every tensor that crosses stages goes through an EDGERAY group ``<prefix>pipe`` (emulated link
cost, ledger). Sends are posted asynchronously and completed at the end of the step, so the two directions
of 1F1B never wait on each other; receives are posted ``recv_ahead`` messages ahead of use, so the next
micro-batches' tensors move while the current one computes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from edgeray.fabric.backend import BACKEND, EdgeGroup, Fabric, install
from edgeray.fabric.collectives import GroupPlan, hierarchical_allreduce
from edgeray.fabric.collectives import join as join_groups
from edgeray.fabric.groups import leave as leave_groups
from edgeray.model.presets import PRESETS, build_model
from edgeray.model.quant import int8_state, quantize_int8_, stage_weight_bytes
from edgeray.model.shards import read_shard
from edgeray.model.stages import LlamaStage, split_llama
from edgeray.topology import Topology, load_topology

SCHEDULES = ("gpipe", "1f1b")
OPTIMIZER_KEYS = ("step", "exp_avg", "exp_avg_sq")  # AdamW's per-parameter state


@dataclass(frozen=True)
class PipelineConfig:
    """A pipeline run, validated on construction."""

    preset: str = "tiny"
    boundaries: tuple[int, ...] = (2,)
    """Layer indices where a new stage starts; len + 1 stages."""
    schedule: str = "1f1b"
    microbatches: int = 4
    micro_batch_size: int = 4
    lr: float = 3e-3
    seed: int = 0
    time_scale: float = 0.0
    """Link emulation: wait this many times each modelled transfer (0 = account only)."""
    group_prefix: str = ""
    extra_warmup: int = 1
    """1F1B only: warm-up forwards beyond ``stages - stage - 1`` on every stage but the last (hides
    message latency; see :func:`schedule_ops`)."""
    torch_threads: int = 1
    """Intra-op threads per stage actor: stages share the machine's cores."""
    recv_ahead: int = 2
    """Receives each stage keeps posted ahead of use, per neighbour: the transport moves the next
    micro-batches' activations / gradients while the current one computes (0 = receive on use, blocking:
    the transfer then starts only when the stage asks for it)."""
    replicas: int = 1
    """Data-parallel copies of the pipeline (each on its own nodes and data); stage k of every replica
    averages its gradients with the others over the fabric before the optimizer step."""
    actual_topology: str | None = None
    """Emulate links from this topology file instead of the declared one (a network that differs from
    its description: what re-planning from measured link conditions reacts to)."""
    int8_stages: tuple[int, ...] = ()
    """Stages that hold their weights as frozen int8 (device-tier nodes, see edgeray.model.quant): they
    pass gradients through and train only their norms."""
    tp: tuple[int, ...] = ()
    """Tensor-parallel degree of each stage (empty: 1 everywhere): stage k runs on ``tp[k]`` nodes of one
    region, its attention and MLP split across them (edgeray.train.tensor_parallel). Rank 0 of each stage
    exchanges activations and gradients with the neighbouring stages and broadcasts them to its peers."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets are {sorted(PRESETS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.recv_ahead < 0:
            raise ValueError(f"recv_ahead must be >= 0, got {self.recv_ahead}")
        if self.extra_warmup < 0:
            raise ValueError(f"extra_warmup must be >= 0, got {self.extra_warmup}")
        if self.microbatches < 1 or self.micro_batch_size < 1:
            raise ValueError("microbatches and micro_batch_size must be >= 1")
        n = PRESETS[self.preset].num_hidden_layers
        if list(self.boundaries) != sorted(set(self.boundaries)) or not all(
            0 < b < n for b in self.boundaries
        ):
            raise ValueError(f"boundaries {self.boundaries} must be strictly increasing within (0, {n})")
        if not all(0 <= i < self.stages for i in self.int8_stages):
            raise ValueError(f"int8_stages {self.int8_stages} must be stage indices in 0..{self.stages - 1}")
        if self.tp:
            from edgeray.train.tensor_parallel import check_degree

            if len(self.tp) != self.stages:
                raise ValueError(f"tp {self.tp}: one degree per stage ({self.stages} stages)")
            for degree in set(self.tp):
                check_degree(PRESETS[self.preset].config(), degree)
            split = [k for k in self.int8_stages if self.tp[k] > 1]
            if split:
                raise ValueError(
                    f"stages {split} are both int8 and tensor-parallel: a stage is one or the other"
                )
            if self.replicas > 1 and max(self.tp) > 1:
                raise ValueError(
                    "tp with replicas > 1: data-parallel copies of tensor-parallel stages are not supported"
                )

    @property
    def stages(self) -> int:
        return len(self.boundaries) + 1

    def degree(self, stage: int) -> int:
        return self.tp[stage] if self.tp else 1

    def batch_rows(self, step: int, available: int) -> list[int]:
        """Shard rows of one step (m x micro_batch_size), cycling through the shard."""
        size = self.microbatches * self.micro_batch_size
        return [(step * size + i) % available for i in range(size)]


def schedule_ops(
    schedule: str, stage: int, stages: int, microbatches: int, extra_warmup: int = 0
) -> list[tuple[str, int]]:
    """The ("F" | "B", micro-batch) sequence one stage runs in a step.

    1F1B: ``stages - stage - 1`` warm-up forwards, then one forward / one backward, then the remaining
    backwards. ``extra_warmup`` adds that many warm-up forwards on every stage but the last: in plain
    1F1B the forward of micro-batch i+1 and the gradient of i chase each other with no slack, so every
    message's latency becomes idle time on both stages; one more micro-batch in flight absorbs it, for one
    more micro-batch of activations held."""
    m = microbatches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(stages - stage - 1 + (extra_warmup if stage < stages - 1 else 0), m)
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [("F", warmup + i), ("B", i)]
    ops += [("B", i) for i in range(m - warmup, m)]
    return ops


@dataclass
class _Micro:
    sent: torch.Tensor | None = None  # this stage's output (kept for backward)
    received: torch.Tensor | None = None  # the input from the previous stage (requires grad)
    loss: torch.Tensor | None = None
    finishers: list[Callable[[], None]] = field(default_factory=list)


def incoming(
    schedule: str, stage: int, stages: int, microbatches: int, extra_warmup: int = 0
) -> list[tuple[str, int, int]]:
    """The (op, micro-batch, source stage) messages a stage receives in a step, in the order it uses them.

    Per source this is also the order that source sends them in (activations, and the targets when the
    source is stage 0 of the last stage, in forward order; gradients in backward order), which is what lets
    receives be posted ahead."""
    out: list[tuple[str, int, int]] = []
    for kind, i in schedule_ops(schedule, stage, stages, microbatches, extra_warmup):
        if kind == "F" and stage > 0:
            out.append(("activations", i, stage - 1))
            if stage == stages - 1:
                out.append(("targets", i, 0))
        elif kind == "B" and stage < stages - 1:
            out.append(("gradients", i, stage + 1))
    return out


class _Inbox:
    """A step's receives, kept ``ahead`` posted per source (see :meth:`EdgeGroup.post_recv_raw`)."""

    def __init__(
        self,
        group: EdgeGroup,
        expected: list[tuple[str, int, int]],
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
        ahead: int,
    ) -> None:
        self.group, self.shapes, self.ahead = group, shapes, ahead
        self.pending: dict[int, list[tuple[str, int]]] = {}
        for op, i, src in expected:
            self.pending.setdefault(src, []).append((op, i))
        self.posted: dict[int, list[tuple[tuple[str, int], Callable[[], torch.Tensor]]]] = {}
        for src in self.pending:
            self.posted[src] = []
            for _ in range(ahead):
                self._post_next(src)

    def _post_next(self, src: int) -> None:
        if self.pending[src]:
            op, i = self.pending[src].pop(0)
            shape, dtype = self.shapes[op]
            self.posted[src].append(((op, i), self.group.post_recv_raw(shape, dtype, src, op)))

    def take(self, op: str, i: int, src: int) -> torch.Tensor:
        """Micro-batch ``i``'s ``op`` tensor from stage ``src`` (waits for it); posts the next receive."""
        if not self.posted[src]:  # ahead == 0: receive on use
            self._post_next(src)
        key, finish = self.posted[src].pop(0)
        assert key == (op, i), f"stage {src} sends {key} next, this stage expected {(op, i)}"
        if self.ahead:
            self._post_next(src)
        return finish()

    def drain(self) -> None:
        """Check that the step used every message it posted (a schedule bug otherwise)."""
        left = [k for src in self.posted for k, _ in self.posted[src]] + [
            k for src in self.pending for k in self.pending[src]
        ]
        assert not left, f"messages posted or expected but never used this step: {left}"


@ray.remote(num_cpus=0)
class StageWorker:
    """One pipeline stage on one topology node."""

    def __init__(
        self,
        config: PipelineConfig,
        stage: int,
        topology_path: str,
        node: str,
        data_dir: str,
        init_dir: str | None = None,
        replica: int = 0,
        tp_rank: int = 0,
    ) -> None:
        """``init_dir``: a checkpoint written by the trainer (weights + this stage's optimizer state) to
        resume from; otherwise the preset is initialised from ``config.seed``. ``replica``: which
        data-parallel copy of the pipeline this stage belongs to. ``tp_rank``: this actor's rank in its
        stage's tensor-parallel group (``config.tp``); the group is joined, and the model split, in
        :meth:`join`."""
        self.replica, self.tp_rank = replica, tp_rank
        self.tp_group: EdgeGroup | None = None
        self.init_dir = init_dir
        self.dp_plan: GroupPlan | None = None
        self.config, self.index, self.node, self.data_dir = config, stage, node, data_dir
        torch.set_num_threads(config.torch_threads)
        topology: Topology = load_topology(topology_path)
        self.fabric = Fabric.from_topology(
            topology,
            node=node,
            time_scale=config.time_scale,
            seed=config.seed,
            actual=load_topology(config.actual_topology) if config.actual_topology else None,
        )
        install(self.fabric)
        if init_dir:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(init_dir, attn_implementation="eager")
        else:
            model = build_model(config.preset, seed=config.seed)
        self.stage: LlamaStage = split_llama(model, list(config.boundaries))[stage]
        if stage in config.int8_stages:
            quantize_int8_(self.stage)
        self.model = model
        self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=config.lr)
        if init_dir and config.degree(stage) == 1:
            self._load_optimizer(Path(init_dir))
        self.shard: torch.Tensor | None = read_shard(data_dir, node) if stage == 0 and tp_rank == 0 else None
        self.seq_len = int(json.loads((Path(data_dir) / "manifest.json").read_text())["seq_len"])
        self.group: EdgeGroup | None = None
        self.joined: list[str] = []  # every collective group joined, for reset()
        self._waited = 0.0
        self._inbox: _Inbox | None = None

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Leave every group this actor joined and start over as the stage these arguments (those of the
        constructor) describe: a process reused instead of a new one, whose start imports torch and
        transformers again (about 6 s of CPU; the test suite reuses one per node)."""
        leave_groups(self.joined)
        self.__init__(*args, **kwargs)  # type: ignore[misc]

    def join(self, dp_nodes: list[str] | None = None) -> str:
        """Join this replica's pipeline group and, with several replicas, the data-parallel groups of this
        stage: ``dp_nodes`` is stage ``k``'s node in every replica (replica order). Those form a
        topology :class:`~edgeray.fabric.collectives.GroupPlan` (one group per region, one of region
        leaders), so gradients are averaged hierarchically: reduce inside each region, ring among leaders,
        broadcast back."""
        import ray.util.collective as col

        cfg = self.config
        name = f"{cfg.group_prefix}pipe/r{self.replica}"
        if self.tp_rank == 0:  # a stage's rank 0 talks to the neighbouring stages
            col.init_collective_group(cfg.stages, self.index, backend=BACKEND, group_name=name)  # type: ignore[arg-type]
            self.joined.append(name)
            self.group = EdgeGroup.get(name)
        degree = cfg.degree(self.index)
        if degree > 1:
            from edgeray.train.tensor_parallel import FabricComm, shard_llama

            tp_name = f"{cfg.group_prefix}tp/r{self.replica}/s{self.index}"
            col.init_collective_group(degree, self.tp_rank, backend=BACKEND, group_name=tp_name)  # type: ignore[arg-type]
            self.joined.append(tp_name)
            comm = FabricComm(tp_name)
            self.tp_group = comm.group
            shard_llama(self.model, self.tp_rank, degree, comm)  # in place: the stage holds the same layers
            self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=cfg.lr)
            if self.init_dir:
                self._load_optimizer(Path(self.init_dir))
        if cfg.replicas > 1:
            if dp_nodes is None or len(dp_nodes) != cfg.replicas or dp_nodes[self.replica] != self.node:
                raise ValueError(
                    f"stage {self.index} of replica {self.replica} on {self.node}: dp_nodes must list this "
                    f"stage's node in each of the {cfg.replicas} replicas, got {dp_nodes}"
                )
            self.dp_plan = GroupPlan.from_nodes(
                self.fabric.topology, list(dp_nodes), prefix=f"{cfg.group_prefix}dp/stage{self.index}/"
            )
            self.joined += join_groups(self.dp_plan, self.node)
        return name

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int, apply: bool = True, clock: float | None = None) -> dict[str, Any]:
        """Run this stage's schedule for one step; the last stage returns the mean micro-batch loss.
        ``clock``: the modelled instant the step starts (every stage's fabric clock is set to it); the
        result's ``clock_s`` is this stage's modelled clock at its end (its work charged as measured, times
        its node's slowdown; every transfer by the link model: see Fabric.clock)."""
        assert self.group is not None or self.tp_group is not None, "join() first"
        if clock is not None:
            self.fabric.clock = clock
        with self.fabric.working():
            out = self._train_step(step, apply)
        out["clock_s"] = self.fabric.clock
        return out

    def _train_step(self, step: int, apply: bool) -> dict[str, Any]:
        cfg, s, n = self.config, self.index, self.config.stages
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        micro: dict[int, _Micro] = {i: _Micro() for i in range(cfg.microbatches)}
        inputs, targets = self._batch(step)
        busy = 0.0
        self._waited = 0.0
        self._inbox = None
        if self.group is not None:  # rank 0 of the stage: post the step's first receives now
            b, t, h = cfg.micro_batch_size, self.seq_len, self.stage.config.hidden_size
            self._inbox = _Inbox(
                self.group,
                incoming(cfg.schedule, s, n, cfg.microbatches, cfg.extra_warmup),
                {
                    "activations": ((b, t, h), torch.float32),
                    "gradients": ((b, t, h), torch.float32),
                    "targets": ((b, t), torch.long),
                },
                cfg.recv_ahead,
            )
        for kind, i in schedule_ops(cfg.schedule, s, n, cfg.microbatches, cfg.extra_warmup):
            c0 = time.perf_counter()
            if kind == "F":
                self._forward(i, micro[i], inputs, targets)
            else:
                self._backward(i, micro[i])
            busy += time.perf_counter() - c0
        if self._inbox is not None:
            self._inbox.drain()
        if self.tp_group is not None:
            from edgeray.train.tensor_parallel import sync_replicated_grads

            sync_replicated_grads(self.model)
        busy -= self._waited  # time blocked on a neighbour is bubble, not work
        f0 = time.perf_counter()
        for m in micro.values():
            for finish in m.finishers:
                finish()
        u0 = time.perf_counter()
        if self.dp_plan is not None:
            self._average_gradients()
        if apply:
            self.optimizer.step()
        wall = time.perf_counter() - t0
        out: dict[str, Any] = {
            "stage": s,
            "node": self.node,
            "wall_s": wall,
            "busy_s": busy,  # forward + backward compute
            "recv_wait_s": self._waited,  # blocked on a neighbour's activations / gradients
            "send_wait_s": u0 - f0,  # sends still in flight at the end of the schedule
            "update_s": time.perf_counter() - u0,  # gradient averaging + optimizer step
        }
        if s == n - 1 and self.tp_rank == 0:
            out["loss"] = float(
                sum(float(m.loss) for m in micro.values() if m.loss is not None) / cfg.microbatches
            )
        return out

    def _batch(self, step: int) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        cfg = self.config
        if self.index != 0 or self.tp_rank > 0:
            return None, None
        assert self.shard is not None
        rows = self.shard[cfg.batch_rows(step, len(self.shard))]  # (m * b, T + 1)
        chunks = rows.split(cfg.micro_batch_size)
        return [c[:, :-1] for c in chunks], [c[:, 1:] for c in chunks]

    def _forward(self, i: int, m: _Micro, inputs: Any, targets: Any) -> None:
        s, n, g, lead = self.index, self.config.stages, self.group, self.tp_rank == 0
        b, t = self.config.micro_batch_size, self.seq_len
        mask = torch.ones(b, t, dtype=torch.long)
        if s == 0:
            ids = self._share(inputs[i] if lead else None, (b, t), torch.long)
            out = self.stage(input_ids=ids, attention_mask=mask)
        else:
            shape = (b, t, self.stage.config.hidden_size)
            hidden = self._recv("activations", i, s - 1) if lead else None
            m.received = self._share(hidden, shape, torch.float32).requires_grad_(True)
            out = self.stage(hidden=m.received, attention_mask=mask)
        if s == n - 1:
            labels = None
            if lead:
                labels = targets[i] if s == 0 else self._recv("targets", i, 0)
            labels = self._share(labels, (b, t), torch.long)
            logits = out  # (B, T, V)
            m.loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            )
        else:
            m.sent = out
            if lead:
                assert g is not None
                m.finishers.append(g.send_raw(out.detach(), s + 1, "activations"))
        if s == 0 and n > 1 and lead:
            # After the activations: with two stages both go over the same pair, and the last stage reads
            # activations first.
            assert g is not None
            m.finishers.append(g.send_raw(targets[i], n - 1, "targets"))

    def _backward(self, i: int, m: _Micro) -> None:
        s, g, lead = self.index, self.group, self.tp_rank == 0
        if m.loss is not None:
            (m.loss / self.config.microbatches).backward()
        else:
            assert m.sent is not None
            grad = self._recv("gradients", i, s + 1) if lead else None
            m.sent.backward(self._share(grad, tuple(m.sent.shape), torch.float32))
        if s > 0 and lead:  # every rank holds the same input gradient (tensor_parallel's f operator)
            assert g is not None and m.received is not None and m.received.grad is not None
            m.finishers.append(g.send_raw(m.received.grad, s - 1, "gradients"))

    def _share(self, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank of this stage's tensor-parallel group (itself without one)."""
        if self.tp_group is None:
            assert tensor is not None
            return tensor
        buf = tensor.detach().clone() if tensor is not None else torch.empty(shape, dtype=dtype)
        t0 = time.perf_counter()
        self.tp_group.broadcast_from(buf, root=0)
        if self.tp_rank > 0:
            self._waited += time.perf_counter() - t0
        return buf

    def _average_gradients(self) -> None:
        """Mean of this stage's gradients over the data-parallel replicas (hierarchical all-reduce)."""
        assert self.dp_plan is not None
        params = [p for p in self.stage.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        hierarchical_allreduce(flat, self.dp_plan, self.node)
        flat /= self.config.replicas
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))  # type: ignore[union-attr]
            offset += n

    def _recv(self, op: str, i: int, src: int) -> torch.Tensor:
        assert self._inbox is not None
        t0 = time.perf_counter()
        tensor = self._inbox.take(op, i, src)
        self._waited += time.perf_counter() - t0
        return tensor

    # ------------------------------------------------------------------ inspection
    def global_grads(self) -> dict[str, torch.Tensor]:
        """Gradients under the full model's parameter names (``model.layers.{k}...``)."""
        return {name: p.grad.clone() for name, p in self._global_params().items() if p.grad is not None}

    def global_state(self) -> dict[str, torch.Tensor]:
        """This stage's weights under the full model's names; int8 weights dequantized (what it computes)."""
        state = {name: p.detach().clone() for name, p in self._global_params().items()}
        state |= {self._global_name(n): t for n, t in int8_state(self.stage).items()}
        return state

    def weight_bytes(self) -> int:
        """Bytes this stage's weights occupy as stored (int8 stages: about a quarter of fp32)."""
        return stage_weight_bytes(self.stage)

    def _global_name(self, name: str) -> str:
        head, _, rest = name.partition(".")
        if head == "layers":
            idx, _, tail = rest.partition(".")
            return f"model.layers.{self.stage.start + int(idx)}.{tail}"
        if head in ("embed_tokens", "norm"):
            return f"model.{name}"
        return name

    def _global_params(self) -> dict[str, torch.nn.Parameter]:
        """By the whole model's names (a tensor-parallel rank's shards under the unsplit names: see
        edgeray.train.tensor_parallel.gather_state)."""
        from edgeray.train.tensor_parallel import unsplit_name

        return {unsplit_name(self._global_name(name)): p for name, p in self.stage.named_parameters()}

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """AdamW's state by the whole model's parameter names (a tensor-parallel rank's shards under the
        unsplit names, as :meth:`global_state`): ``{"exp_avg": {name: t}, "exp_avg_sq": ..., "step": ...}``.
        Gathered over stages and ranks, it fits any other split of the same model (see
        :func:`edgeray.train.run._checkpoint`)."""
        by_param = {id(p): name for name, p in self._global_params().items()}
        out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in OPTIMIZER_KEYS}
        for param, state in self.optimizer.state.items():
            for k in OPTIMIZER_KEYS:
                out[k][by_param[id(param)]] = state[k].detach().clone()
        return out

    def _load_optimizer(self, init_dir: Path) -> None:
        """This stage's (or rank's) part of a checkpoint's ``optimizer.pt`` (whole-model moments by name)."""
        saved: dict[str, dict[str, torch.Tensor]] = torch.load(init_dir / "optimizer.pt")
        mine = self._global_params()
        degree = self.config.degree(self.index)
        parts = {k: {n: t for n, t in saved[k].items() if n in mine} for k in OPTIMIZER_KEYS}
        if degree > 1:
            from edgeray.train.tensor_parallel import shard_state

            parts = {
                k: v if k == "step" else shard_state(v, self.model.config, self.tp_rank, degree)
                for k, v in parts.items()
            }
        for name, param in mine.items():
            if name in parts["step"]:
                self.optimizer.state[param] = {k: parts[k][name].clone() for k in OPTIMIZER_KEYS}

    def arrivals(self) -> list[dict[str, Any]]:
        """Receiver-side timings since the last call (for re-planning from measured links)."""
        return self.fabric.arrivals.take()

    def ledger_rows(self) -> list[dict[str, Any]]:
        rows = self.fabric.ledger.rows()
        self.fabric.ledger.clear()
        return rows

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)
