"""Mixture-of-Experts across edge nodes: experts as node actors, locality-aware routing.

    summary = train_moe(MoEConfig(locality_bias=2.0), topology, data_dir=..., out="runs/moe", steps=60)

The model is a Hugging Face ``MixtralForCausalLM`` (the tiny preset's attention and sizes; every layer's
feed-forward is a sparse MoE block of ``experts`` SwiGLU experts, top-``top_k`` gating), so checkpoints load
with ``transformers`` (and vLLM) unchanged. At run time the model is split:

- the **trunk** (a :class:`TrunkWorker` actor on the data node): embeddings, attention, norms, the routers
  and the LM head. It routes every token, sends each expert the hidden states of its tokens through the
  fabric, combines what comes back, and runs the backward pass, whose gradients go back to the experts the
  same way;
- each **expert** (an :class:`ExpertWorker` actor, one per expert index, holding that expert's weights in
  every layer) on the node the expert plan gives it: experts are spread over the regions, nearest first.

Routing (:func:`route`): router probabilities are Mixtral's (softmax over all experts, top-k renormalised).
The *selection* subtracts ``locality_bias`` x the expert's distance from the trunk (its node's latency,
normalised to the farthest expert), so a positive bias keeps tokens near home at a measured cost in quality.
Each expert takes at most ``capacity = ceil(capacity_factor x tokens x top_k / experts)`` tokens per layer
(highest weight first); the rest are dropped (their slot contributes nothing) or, with ``overflow="local"``,
sent to the expert nearest the trunk. Both are counted. Dead experts are masked out of the selection, so
inference reroutes their tokens to the survivors.

The load-balancing loss is Switch Transformer's: ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the
router's own top-k choices (before the locality penalty and capacity) naming expert ``e`` and ``P_e`` its
mean router probability (1 when perfectly balanced), averaged over layers, weighted ``aux_loss_coef``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from edgeray.atomic import write_atomic
from edgeray.errors import EdgerayError
from edgeray.fabric.backend import EdgeGroup, Fabric, FabricError, install
from edgeray.fabric.groups import Membership, RunGroups
from edgeray.fabric.groups import join as join_groups
from edgeray.fabric.ledger import Ledger
from edgeray.model.presets import PRESETS, latest_checkpoint, save_pretrained
from edgeray.model.shards import read_shard, read_validation
from edgeray.model.tokenizer import train_tokenizer
from edgeray.placement import pin
from edgeray.topology import Topology, load_topology
from edgeray.train.failures import WorkerFailed, dead_actors
from edgeray.train.failures import kind as failure_kind

OVERFLOW = ("drop", "local")
WAIT_S = 300.0
GROUP = "moe"
FORWARD, BACKWARD, STEP, END, SYNC = 0.0, 1.0, 2.0, 3.0, 4.0


class MoEError(EdgerayError):
    """A MoE run that cannot go on (bad configuration, an unsatisfiable expert plan, every expert gone)."""


class ExpertsLost(MoEError):
    """Expert actors died: training restarts every actor from the last checkpoint."""


@dataclass(frozen=True)
class MoEConfig:
    preset: str = "tiny"
    """Attention, hidden size, layers and vocabulary of this Llama preset."""
    experts: int = 6
    top_k: int = 2
    expert_intermediate: int = 256
    """SwiGLU width of each expert (the dense preset uses 512: two experts of 256 cost one dense MLP)."""
    capacity_factor: float = 2.0
    overflow: str = "drop"
    """What happens to an assignment beyond an expert's capacity: drop | local (the expert nearest the trunk)."""
    locality_bias: float = 0.0
    replicas: int = 1
    """Actors per expert, on different nodes (other regions first): the nearest live one serves, the others
    stand by; each optimizer step is copied to them over the fabric, and one takes over when the serving one
    dies."""
    aux_loss_coef: float = 0.01
    lr: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    timeout_s: float = 120.0
    """Fabric bound on each rendezvous and transfer, and on an expert's wait for the trunk's next message
    (which includes the trunk's own compute: generous, so a loaded machine is not mistaken for a dead peer;
    dead experts are found by their actor's death first)."""
    torch_threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"preset = {self.preset!r}: valid presets are {sorted(PRESETS)}")
        if self.experts < 1:
            problems.append(f"experts = {self.experts}: must be >= 1")
        if not 1 <= self.top_k <= max(self.experts, 1):
            problems.append(f"top_k = {self.top_k}: must be in 1..experts ({self.experts})")
        if self.overflow not in OVERFLOW:
            problems.append(f"overflow = {self.overflow!r}: valid values are {list(OVERFLOW)}")
        if not self.capacity_factor > 0:
            problems.append(f"capacity_factor = {self.capacity_factor}: must be > 0")
        if self.locality_bias < 0:
            problems.append(f"locality_bias = {self.locality_bias}: must be >= 0")
        for name in ("lr", "timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} = {getattr(self, name)}: must be > 0")
        if self.replicas < 1:
            problems.append(f"replicas = {self.replicas}: must be >= 1")
        if self.batch_size < 1 or self.expert_intermediate < 1:
            problems.append("batch_size and expert_intermediate must be >= 1")
        if problems:
            raise MoEError("moe config: " + "; ".join(problems))

    def hf_config(self) -> MixtralConfig:
        p = PRESETS[self.preset]
        return MixtralConfig(  # type: ignore[call-arg]
            vocab_size=p.vocab_size,
            hidden_size=p.hidden_size,
            intermediate_size=self.expert_intermediate,
            num_hidden_layers=p.num_hidden_layers,
            num_attention_heads=p.num_attention_heads,
            num_key_value_heads=p.num_key_value_heads,
            head_dim=p.hidden_size // p.num_attention_heads,
            max_position_embeddings=p.max_position_embeddings,
            num_local_experts=self.experts,
            num_experts_per_tok=self.top_k,
            router_aux_loss_coef=self.aux_loss_coef,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="eager",
        )


def build_moe_model(config: MoEConfig) -> MixtralForCausalLM:
    """A freshly initialised Mixtral-format model; the same config and seed give the same weights."""
    torch.manual_seed(config.seed)
    return MixtralForCausalLM(config.hf_config())


# ---------------------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class ExpertPlan:
    trunk: str
    nodes: tuple[str, ...]
    """Node of each expert index."""
    distance: tuple[float, ...]
    """Each expert's latency from the trunk, normalised to the farthest (0 = on the trunk's node)."""
    regions: tuple[str, ...]
    standbys: tuple[tuple[str, ...], ...] = ()
    """Each expert's standby replicas' nodes (empty: one actor per expert)."""

    def replica_nodes(self, expert: int) -> tuple[str, ...]:
        """Nodes of the expert's actors, the serving one first."""
        return (self.nodes[expert], *(self.standbys[expert] if self.standbys else ()))

    def table(self) -> str:
        lines = [f"trunk on {self.trunk}", "expert  node             region    distance  standbys"]
        for e, (n, d, r) in enumerate(zip(self.nodes, self.distance, self.regions, strict=True)):
            lines.append(f"{e:>6}  {n:<16} {r:<9} {d:8.2f}  {', '.join(self.replica_nodes(e)[1:])}")
        return "\n".join(lines)


def plan_experts(
    topology: Topology, experts: int, trunk: str, nodes: list[str] | None = None, replicas: int = 1
) -> ExpertPlan:
    """Spread ``experts`` over the regions (nearest the trunk first), round-robin over each region's nodes
    (more experts than nodes put several on one node). With ``replicas`` > 1, each expert's standbys go to
    other nodes, other regions first (the next regions in the same order)."""
    if trunk not in topology.nodes:
        raise MoEError(
            f"trunk node {trunk!r} is not in topology {topology.name!r}; nodes are {sorted(topology.nodes)}"
        )
    pool = list(nodes or topology.nodes)
    unknown = [n for n in pool if n not in topology.nodes]
    if unknown:
        raise MoEError(
            f"expert nodes {unknown} are not in topology {topology.name!r}; nodes are {sorted(topology.nodes)}"
        )
    by_region: dict[str, list[str]] = {}
    for n in topology.iter_nodes():
        if n.name in pool:
            by_region.setdefault(n.region, []).append(n.name)
    order = sorted(by_region, key=lambda r: min(topology.path_latency_ms(trunk, n) for n in by_region[r]))
    for r in order:  # the trunk's own node first inside its region
        by_region[r].sort(key=lambda n: (topology.path_latency_ms(trunk, n), n != trunk))
    # round-robin: one expert per region in turn, cycling through each region's nodes
    cursor = dict.fromkeys(order, 0)
    placed: list[str] = []
    while len(placed) < experts:
        for r in order:
            if len(placed) == experts:
                break
            placed.append(by_region[r][cursor[r] % len(by_region[r])])
            cursor[r] += 1
    latency = [topology.path_latency_ms(trunk, n) if n != trunk else 0.0 for n in placed]
    far = max(latency) or 1.0
    standbys: list[tuple[str, ...]] = []
    if replicas > 1:
        everyone = [n for r in order for n in by_region[r]]
        if len(everyone) < replicas:
            raise MoEError(
                f"replicas = {replicas}: each expert needs that many distinct nodes, but only {len(everyone)} "
                f"may host experts ({everyone})"
            )
        for e, node in enumerate(placed):
            home = order.index(topology.nodes[node].region)
            rotated = order[home + 1 :] + order[: home + 1]
            candidates = []  # other regions first, each region's nodes rotated so experts spread out
            for r in rotated:
                k = e % len(by_region[r])
                candidates += by_region[r][k:] + by_region[r][:k]
            chosen: list[str] = []
            for cand in candidates:
                if cand != node and cand not in chosen:
                    chosen.append(cand)
                if len(chosen) == replicas - 1:
                    break
            standbys.append(tuple(chosen))
    return ExpertPlan(
        trunk,
        tuple(placed),
        tuple(lat / far for lat in latency),
        tuple(topology.nodes[n].region for n in placed),
        tuple(standbys),
    )


# ------------------------------------------------------------------------------------------------ routing
@dataclass
class Routing:
    indices: torch.Tensor
    """(T, k) expert of each assignment."""
    weights: torch.Tensor
    """(T, k) combine weight (Mixtral's renormalised top-k probability); differentiable."""
    kept: torch.Tensor
    """(T, k) bool: the assignment is served (False: dropped for capacity)."""
    probs: torch.Tensor
    """(T, E) router probabilities."""
    preferred: torch.Tensor
    """(T, k) the router's own top-k (no locality penalty, no capacity): what load balancing counts."""
    dropped: int = 0
    fallback: int = 0


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    capacity: int | None = None,
    penalty: torch.Tensor | None = None,
    alive: torch.Tensor | None = None,
    overflow: str = "drop",
    local_expert: int = 0,
) -> Routing:
    """Choose experts for each token (rows of ``logits``, (T, E)).

    ``penalty`` (E,) is subtracted from the logits for the selection only; ``alive`` (E,) bool masks dead
    experts out; ``capacity`` caps each expert's assignments (highest weight first); overflow is dropped or
    moved to ``local_expert``."""
    probs = F.softmax(logits.float(), dim=-1)
    scores = logits.detach().float().clone()
    if penalty is not None:
        scores = scores - penalty
    if alive is not None:
        if not bool(alive.any()):
            raise MoEError("every expert is dead: nothing to route to")
        scores = scores.masked_fill(~alive, float("-inf"))
    k = min(top_k, int(alive.sum()) if alive is not None else top_k)
    indices = torch.topk(scores, k, dim=-1).indices
    own = (
        logits.detach().float()
        if alive is None
        else logits.detach().float().masked_fill(~alive, float("-inf"))
    )
    preferred = torch.topk(own, k, dim=-1).indices
    chosen = probs.gather(1, indices)
    weights = chosen / chosen.sum(dim=-1, keepdim=True)
    kept = torch.ones_like(indices, dtype=torch.bool)
    dropped = fallback = 0
    if capacity is not None:
        indices = indices.clone()
        # the local expert first: fallbacks it receives later ignore its capacity and push out none of its own
        for e in [local_expert] + [e for e in range(logits.shape[1]) if e != local_expert]:
            rows, cols = torch.where(indices == e)
            if len(rows) <= capacity:
                continue
            order = torch.argsort(weights.detach()[rows, cols], descending=True, stable=True)
            over_rows, over_cols = rows[order[capacity:]], cols[order[capacity:]]
            if overflow == "local" and e != local_expert:
                # to the expert nearest the trunk, unless the token already uses it in another slot
                dup = (indices[over_rows] == local_expert).any(dim=1)
                indices[over_rows[~dup], over_cols[~dup]] = local_expert
                kept[over_rows[dup], over_cols[dup]] = False
                fallback += int((~dup).sum())
                dropped += int(dup.sum())
            else:
                kept[over_rows, over_cols] = False
                dropped += len(over_rows)
    return Routing(indices, weights, kept, probs, preferred, dropped, fallback)


def load_balancing_loss(routings: Iterable[Routing], experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, averaged over layers: ``E * sum_e f_e * P_e`` with ``f_e`` the
    fraction of the router's own top-k choices that name ``e`` and ``P_e`` its mean router probability.

    The locality penalty is left out of ``f_e`` on purpose: counted in, the loss would teach the router to
    raise far experts' logits until the penalty no longer steers anything."""
    losses = []
    for r in routings:
        counts = torch.bincount(r.preferred.reshape(-1), minlength=experts).float()
        f = counts / r.preferred.numel()
        p = r.probs.mean(dim=0)
        losses.append(experts * torch.sum(f * p))
    return torch.stack(losses).mean()


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One Mixtral expert (SwiGLU), the same arithmetic as ``MixtralExperts``."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


# ---------------------------------------------------------------------------------------------- MoE block
class _Dispatcher:
    """How a block's tokens reach their experts: in this process (reference) or through the fabric."""

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LocalExperts(_Dispatcher):
    """Every expert in this process: the single-process reference the distributed run must equal."""

    def __init__(self, model: MixtralForCausalLM) -> None:
        self.weights = [
            (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj) for layer in model.model.layers
        ]

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights[layer]
        return expert_mlp(x, gate_up[expert], down[expert])


class EdgeMoeBlock(nn.Module):
    """Drop-in for ``MixtralSparseMoeBlock``: the router stays here, experts run wherever ``dispatcher`` says."""

    def __init__(self, original: nn.Module, layer: int, owner: MoERouting) -> None:
        super().__init__()
        self.gate: Any = original.gate  # the router's parameter keeps its checkpoint name
        self.layer = layer
        self.owner = owner

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits = F.linear(flat, self.gate.weight)
        o = self.owner
        capacity = (  # capacity binds in training; inference is dropless (as the checkpoint serves anywhere)
            math.ceil(o.config.capacity_factor * flat.shape[0] * o.config.top_k / o.config.experts)
            if self.training
            else None
        )
        r = route(
            logits,
            o.config.top_k,
            capacity=capacity,
            penalty=o.penalty,
            alive=o.alive,
            overflow=o.config.overflow,
            local_expert=o.local_expert,
        )
        o.routings.append(r)
        out = torch.zeros_like(flat)
        for e in range(o.config.experts):
            rows, slots = torch.where((r.indices == e) & r.kept)
            if len(rows) == 0:
                continue
            y = o.dispatcher.run(self.layer, e, flat[rows])
            out = out.index_add(0, rows, y * r.weights[rows, slots, None].to(y.dtype))
        return out.reshape(shape)


class MoERouting:
    """Routing state shared by a model's MoE blocks: bias, live experts, dispatcher and the step's routings."""

    def __init__(self, config: MoEConfig, plan: ExpertPlan | None, dispatcher: _Dispatcher) -> None:
        self.config = config
        self.dispatcher = dispatcher
        distance = torch.tensor(plan.distance if plan else [0.0] * config.experts)
        self.penalty = config.locality_bias * distance if config.locality_bias else None
        self.local_expert = int(torch.argmin(distance)) if plan else 0
        self.alive = torch.ones(config.experts, dtype=torch.bool)
        self.routings: list[Routing] = []

    def install(self, model: MixtralForCausalLM) -> MixtralForCausalLM:
        for i, layer in enumerate(model.model.layers):
            layer.mlp = EdgeMoeBlock(layer.mlp, i, self)
        return model


def moe_loss(
    model: MixtralForCausalLM, routing: MoERouting, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(language-model loss, load-balancing loss) of ``batch`` (N, T + 1)."""
    routing.routings = []
    logits = model(input_ids=batch[:, :-1]).logits
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return lm, load_balancing_loss(routing.routings, routing.config.experts)


# ------------------------------------------------------------------------------------------- remote experts
class _RemoteExpert(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dispatcher: FabricExperts, layer: int, expert: int
    ) -> torch.Tensor:
        ctx.meta = (dispatcher, layer, expert)
        return dispatcher.exchange(FORWARD, layer, expert, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        dispatcher, layer, expert = ctx.meta
        return dispatcher.exchange(BACKWARD, layer, expert, grad.contiguous()), None, None, None


class FabricExperts(_Dispatcher):
    """The trunk's side: each expert is rank ``expert + 1`` of the ``moe`` group; rank 0 is the trunk."""

    def __init__(self, group: str, hidden: int, ranks: list[int]) -> None:
        self.group = group
        self.hidden = hidden
        self.ranks = ranks
        """Group rank of the actor serving each expert."""

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        return _RemoteExpert.apply(x, self, layer, expert)

    def exchange(self, kind: float, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        g = EdgeGroup.get(self.group)
        header = torch.tensor([kind, float(layer), float(x.shape[0])])
        op = "dispatch" if kind == FORWARD else "grad-out"
        rank = self.ranks[expert]
        g.send_raw(header, rank, op="header")()
        g.send_raw(x.detach().float().contiguous(), rank, op=op)()
        back = "combine" if kind == FORWARD else "grad-in"
        return g.recv_raw((x.shape[0], self.hidden), torch.float32, rank, op=back)

    def signal(self, kind: float, ranks: Iterable[int], arg: float = -1.0) -> None:
        """Send a control header (step, sync from rank ``arg``, end) to these ranks; a dead one is skipped."""
        g = EdgeGroup.get(self.group)
        for rank in ranks:
            with contextlib.suppress(FabricError):
                g.send_raw(torch.tensor([kind, arg, 0.0]), rank, op="header")()


def _rows(fabric: Fabric) -> list[dict[str, Any]]:
    rows = fabric.ledger.rows()
    fabric.ledger.clear()
    return rows


def _group_name(prefix: str) -> str:
    return f"{prefix}{GROUP}"


@ray.remote(num_cpus=0)
class ExpertWorker:
    """Expert ``index`` of every MoE layer, on one node; serves the trunk's requests until told to stop."""

    def __init__(
        self, config: MoEConfig, topology_path: str, node: str, index: int, init_dir: str | None = None
    ) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config, self.node, self.index = config, node, index
        self.fabric = Fabric.from_topology(
            load_topology(topology_path), node=node, seed=config.seed, timeout_s=config.timeout_s
        )
        install(self.fabric)
        model = _load_or_build(config, init_dir)
        self.gate_up = nn.ParameterList(
            [
                nn.Parameter(layer.mlp.experts.gate_up_proj[index].detach().clone())
                for layer in model.model.layers
            ]
        )
        self.down = nn.ParameterList(
            [
                nn.Parameter(layer.mlp.experts.down_proj[index].detach().clone())
                for layer in model.model.layers
            ]
        )
        self.optimizer = torch.optim.AdamW([*self.gate_up, *self.down], lr=config.lr)
        if init_dir and (Path(init_dir) / f"optimizer-expert{index}.pt").exists():
            self.optimizer.load_state_dict(torch.load(Path(init_dir) / f"optimizer-expert{index}.pt"))
        self.hidden = model.config.hidden_size
        self.group: str | None = None
        self.standbys: list[int] = []

    def ping(self) -> str:
        return self.node

    def join(self, prefix: str, world: int, rank: int) -> str:
        self.group = _group_name(prefix)
        join_groups([Membership(self.group, world, rank)])
        return self.group

    def set_standbys(self, ranks: list[int]) -> None:
        """Ranks this (serving) replica copies its weights to after each optimizer step."""
        self.standbys = list(ranks)

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in [*self.gate_up, *self.down]])

    def serve(self) -> dict[str, Any]:
        """Answer the trunk until it sends END: forward (keeping the graph when training), backward, step."""
        assert self.group is not None
        g = EdgeGroup.get(self.group)
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tokens = 0
        while True:
            kind, layer, n = (float(v) for v in g.recv_raw((3,), torch.float32, 0, op="header"))
            if kind == END:
                break
            if kind == STEP:
                self.optimizer.step()
                self.optimizer.zero_grad()
                flat = self._flat()
                for rank in self.standbys:  # keep the standby replicas identical
                    g.send_raw(flat, rank, op="replica-sync")()
                continue
            if kind == SYNC:  # a standby: take the serving replica's weights
                flat = g.recv_raw((self._flat().numel(),), torch.float32, int(layer), op="replica-sync")
                offset = 0
                for p in [*self.gate_up, *self.down]:
                    p.data.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
                continue
            li, count = int(layer), int(n)
            x = g.recv_raw(
                (count, self.hidden), torch.float32, 0, op="dispatch" if kind == FORWARD else "grad-out"
            )
            if kind == FORWARD:
                tokens += count
                with torch.enable_grad():
                    x.requires_grad_(True)
                    y = expert_mlp(x, self.gate_up[li], self.down[li])
                saved[li] = (x, y)
                g.send_raw(y.detach().contiguous(), 0, op="combine")()
            else:
                xin, y = saved.pop(li)
                y.backward(x)
                g.send_raw(xin.grad.contiguous(), 0, op="grad-in")()  # type: ignore[union-attr]
        return {"tokens": tokens, "rows": _rows(self.fabric)}

    def grads(self) -> dict[str, list[torch.Tensor]]:
        zero = torch.zeros_like
        return {
            "gate_up": [p.grad.clone() if p.grad is not None else zero(p) for p in self.gate_up],
            "down": [p.grad.clone() if p.grad is not None else zero(p) for p in self.down],
        }

    def weights(self) -> dict[str, Any]:
        return {
            "gate_up": [p.detach().clone() for p in self.gate_up],
            "down": [p.detach().clone() for p in self.down],
            "optimizer": self.optimizer.state_dict(),
        }


def _load_or_build(config: MoEConfig, init_dir: str | None) -> MixtralForCausalLM:
    if init_dir:
        return MixtralForCausalLM.from_pretrained(init_dir, attn_implementation="eager")
    return build_moe_model(config)


@ray.remote(num_cpus=0)
class TrunkWorker:
    """Everything but the experts, on the data node: routes tokens, dispatches them, trains."""

    def __init__(
        self,
        config: MoEConfig,
        topology_path: str,
        plan: ExpertPlan,
        data_dir: str,
        init_dir: str | None = None,
    ) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config, self.plan, self.node = config, plan, plan.trunk
        self.fabric = Fabric.from_topology(
            load_topology(topology_path), node=plan.trunk, seed=config.seed, timeout_s=config.timeout_s
        )
        install(self.fabric)
        self.model = _load_or_build(config, init_dir)
        for layer in self.model.model.layers:
            layer.mlp.experts = None  # the experts live in their actors
        self.dispatcher: FabricExperts | None = None
        self.standbys: list[list[int]] = [[] for _ in range(config.experts)]
        self.routing = MoERouting(config, plan, _Dispatcher())
        self.routing.install(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr)
        if init_dir and (Path(init_dir) / "optimizer-trunk.pt").exists():
            self.optimizer.load_state_dict(torch.load(Path(init_dir) / "optimizer-trunk.pt"))
        self.shard = read_shard(data_dir, plan.trunk)
        self.val = read_validation(data_dir)

    def join(self, prefix: str, world: int) -> str:
        group = _group_name(prefix)
        join_groups([Membership(group, world, 0)])
        self.dispatcher = FabricExperts(group, self.model.config.hidden_size, [0] * self.config.experts)
        self.routing.dispatcher = self.dispatcher
        return group

    def set_routes(self, serving: list[int | None], standbys: list[list[int]]) -> None:
        """The rank serving each expert (None: no live replica, masked out) and each one's standbys."""
        assert self.dispatcher is not None
        self.routing.alive = torch.tensor([r is not None for r in serving], dtype=torch.bool)
        self.dispatcher.ranks = [r if r is not None else -1 for r in serving]
        self.standbys = standbys

    def _serving(self) -> list[int]:
        assert self.dispatcher is not None
        return [r for r in self.dispatcher.ranks if r >= 0]

    def _end(self) -> None:
        assert self.dispatcher is not None
        self.dispatcher.signal(END, self._serving() + [r for s in self.standbys for r in s])

    def batch(self, step: int) -> torch.Tensor:
        b = self.config.batch_size
        return self.shard[[(step * b + i) % len(self.shard) for i in range(b)]]

    def train_step(self, step: int, apply: bool = True) -> dict[str, Any]:
        """Forward, backward (through the experts) and, with ``apply``, every optimizer's step."""
        batch = self.batch(step)
        try:
            self.model.train()
            self.optimizer.zero_grad()
            lm, aux = moe_loss(self.model, self.routing, batch)
            (lm + self.config.aux_loss_coef * aux).backward()
            if apply:
                self.optimizer.step()
                assert self.dispatcher is not None
                self.dispatcher.signal(STEP, self._serving())
                for e, ranks in enumerate(self.standbys):  # standbys take the serving replica's new weights
                    self.dispatcher.signal(SYNC, ranks, float(self.dispatcher.ranks[e]))
        finally:
            with contextlib.suppress(FabricError):
                self._end()
        return {
            **self._stats(),
            "loss": lm.item(),
            "aux_loss": aux.item(),
            "tokens": int(batch[:, 1:].numel()),
        }

    def _stats(self) -> dict[str, Any]:
        e = self.config.experts
        load = torch.zeros(e)
        for r in self.routing.routings:
            load += torch.bincount(r.indices[r.kept], minlength=e).float()
        return {
            "expert_load": load.tolist(),
            "dropped": sum(r.dropped for r in self.routing.routings),
            "fallback": sum(r.fallback for r in self.routing.routings),
            "rows": _rows(self.fabric),
        }

    @torch.no_grad()
    def evaluate(self, windows: int = 64) -> dict[str, Any]:
        """Validation loss over the first ``windows`` validation windows (forward only)."""
        self.model.eval()
        losses, sizes = [], []
        try:
            for i in range(0, min(windows, len(self.val)), 16):
                chunk = self.val[i : min(i + 16, windows)]
                lm, _ = moe_loss(self.model, self.routing, chunk)
                losses.append(lm.item())
                sizes.append(len(chunk))
        finally:
            with contextlib.suppress(FabricError):
                self._end()
        return {**self._stats(), "val_loss": float(np.average(losses, weights=sizes))}

    @torch.no_grad()
    def generate(self, input_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
        """Greedy decoding (full recompute per token: the tiny model does not need a cache)."""
        self.model.eval()
        ids = torch.tensor([input_ids])
        try:
            for _ in range(max_new_tokens):
                self.routing.routings = []
                logits = self.model(input_ids=ids).logits[0, -1]
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        finally:
            with contextlib.suppress(FabricError):
                self._end()
        return {**self._stats(), "tokens": ids[0, len(input_ids) :].tolist()}

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def state(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }


# ------------------------------------------------------------------------------------------------- driver
class MoEFleet:
    """The trunk and one actor per expert on a connected cluster, joined in one fabric group."""

    def __init__(
        self,
        config: MoEConfig,
        topology: Topology,
        plan: ExpertPlan,
        data_dir: str | Path,
        init_dir: str | Path | None = None,
        progress: Callable[[str], None] = print,
    ) -> None:
        self.config, self.topology, self.plan, self.data_dir = config, topology, plan, str(data_dir)
        self.progress = progress
        self.groups = RunGroups("moe")
        self.ledger = Ledger()
        self.trunk: Any = None
        self.actors: list[list[Any]] = []
        """Each expert's actors, serving replica first (plan order)."""
        self.up: list[list[bool]] = []
        self.start(init_dir)

    @property
    def alive(self) -> list[bool]:
        """Whether each expert still has a live replica."""
        return [any(up) for up in self.up]

    @property
    def experts(self) -> list[Any]:
        """The actor serving each expert now (its first live replica; the primary when none is left)."""
        return [
            acts[up.index(True)] if any(up) else acts[0]
            for acts, up in zip(self.actors, self.up, strict=True)
        ]

    def rank(self, expert: int, replica: int) -> int:
        return 1 + expert * self.config.replicas + replica

    def start(self, init_dir: str | Path | None) -> None:
        """(Re)create every actor from ``init_dir`` (a checkpoint) or the seed, and join a new group."""
        self._stop()
        init = str(init_dir) if init_dir else None
        path = str(self.topology.path)
        self.trunk = pin(TrunkWorker, node=self.plan.trunk).remote(
            self.config, path, self.plan, self.data_dir, init
        )
        self.actors = [
            [
                pin(ExpertWorker, node=node).remote(self.config, path, node, e, init)
                for node in self.plan.replica_nodes(e)
            ]
            for e in range(self.config.experts)
        ]
        self.up = [[True] * len(acts) for acts in self.actors]
        prefix = self.groups.generation()
        world = 1 + self.config.experts * self.config.replicas
        joins = [self.trunk.join.remote(prefix, world)]
        for e, acts in enumerate(self.actors):
            joins += [a.join.remote(prefix, world, self.rank(e, r)) for r, a in enumerate(acts)]
        ray.get(joins, timeout=WAIT_S)
        self._routes()

    def _routes(self) -> None:
        """Tell the trunk which replica serves each expert, and each serving replica its live standbys."""
        serving: list[int | None] = []
        standbys: list[list[int]] = []
        calls = []
        for e, (acts, up) in enumerate(zip(self.actors, self.up, strict=True)):
            live = [r for r, ok in enumerate(up) if ok]
            serving.append(self.rank(e, live[0]) if live else None)
            standbys.append([self.rank(e, r) for r in live[1:]])
            if live:
                calls.append(acts[live[0]].set_standbys.remote(standbys[-1]))
        ray.get([self.trunk.set_routes.remote(serving, standbys), *calls], timeout=WAIT_S)

    def _live_actors(self) -> list[Any]:
        return [
            a
            for acts, up in zip(self.actors, self.up, strict=True)
            for a, ok in zip(acts, up, strict=True)
            if ok
        ]

    def close(self) -> None:
        """Stop every actor and remove the run's rendezvous keys from the cluster."""
        self._stop()
        self.groups.close()

    def _stop(self) -> None:
        for a in [self.trunk, *(a for acts in self.actors for a in acts)]:
            if a is not None:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
        self.trunk, self.actors, self.up = None, [], []

    def check_experts(self) -> list[tuple[int, int]]:
        """Find dead expert actors (expert, replica): a standby takes over a dead serving replica; an expert
        with no live replica is masked out (its tokens go to the surviving experts). Returns the dead."""
        live = [(e, r) for e, up in enumerate(self.up) for r, ok in enumerate(up) if ok]
        dead = [
            live[i] for i in dead_actors([self.actors[e][r] for e, r in live], self.config.timeout_s + 15)
        ]
        for e, r in dead:
            self.up[e][r] = False
            with contextlib.suppress(Exception):  # unresponsive: make sure it is gone
                ray.kill(self.actors[e][r], no_restart=True)
        if dead:
            self._routes()
            gone = [e for e, _ in dead if not self.alive[e]]
            self.progress(
                f"  expert actors {dead} are gone"
                + (
                    f"; experts {gone} have no replica left: their tokens go to the surviving experts"
                    if gone
                    else "; standbys serve"
                )
            )
        return dead

    def _session(self, call: Any, what: str) -> dict[str, Any]:
        """Run one trunk call while every live expert serves it; bounded; experts' rows go to the ledger.
        An exception a live actor raised fails at once (:class:`WorkerFailed`)."""
        serving = [a.serve.remote() for a in self._live_actors()]
        try:
            result = ray.get(call, timeout=WAIT_S)
            done = ray.get(serving, timeout=WAIT_S)
        except ray.exceptions.RayError as exc:
            if failure_kind(exc) == "bug":
                raise WorkerFailed.from_ray(exc, f"MoE {what}") from exc
            raise
        for d in done:
            self.ledger.extend(d["rows"])
        self.ledger.extend(result.pop("rows"))
        return result

    def run(self, make_call: Callable[[], Any], retries: int = 2) -> dict[str, Any]:
        """A session that survives dead experts: on failure, mark them dead and run it again without them."""
        for attempt in range(retries + 1):
            self.check_experts()
            try:
                return self._session(make_call(), "session")
            except (ray.exceptions.RayError, FabricError) as exc:
                dead = self.check_experts()
                if attempt == retries or not dead:
                    raise MoEError(f"MoE session failed (dead experts: {dead}): {exc}") from exc
        raise AssertionError("unreachable")

    def train_step(self, step: int, apply: bool = True) -> dict[str, Any]:
        """One training step with every expert: a dead one is not routed around (its weights would stop
        learning) but reported, so the trainer restarts from the last checkpoint."""
        gone = self.check_experts()
        if gone:
            raise ExpertsLost(f"expert actors (expert, replica) {gone} are gone")
        try:
            return self._session(self.trunk.train_step.remote(step, apply), f"training step {step}")
        except (ray.exceptions.RayError, FabricError) as exc:
            gone = self.check_experts()
            if not gone:
                raise MoEError(
                    f"training step {step} failed and no expert actor was found dead: {exc}"
                ) from exc
            raise ExpertsLost(
                f"training step {step}: expert actors (expert, replica) {gone} died: {exc}"
            ) from exc

    def evaluate(self, windows: int = 64) -> dict[str, Any]:
        return self.run(lambda: self.trunk.evaluate.remote(windows))

    def generate(self, input_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
        return self.run(lambda: self.trunk.generate.remote(input_ids, max_new_tokens))

    def checkpoint(self, path: Path, step: int) -> None:
        """A Mixtral checkpoint (transformers loads it as is) plus every actor's optimizer state, atomically."""
        trunk = ray.get(self.trunk.state.remote(), timeout=WAIT_S)
        parts = ray.get([x.weights.remote() for x in self.experts], timeout=WAIT_S)
        model = build_moe_model(self.config)
        state = model.state_dict()
        for k, v in trunk["model"].items():
            state[k] = v
        for i in range(len(model.model.layers)):
            state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [p["gate_up"][i] for p in parts]
            )
            state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([p["down"][i] for p in parts])
        model.load_state_dict(state)

        def extra(tmp: Path) -> None:
            torch.save(trunk["optimizer"], tmp / "optimizer-trunk.pt")
            for e, p in enumerate(parts):
                torch.save(p["optimizer"], tmp / f"optimizer-expert{e}.pt")
            write_atomic(tmp / "trainer_state.json", json.dumps({"step": step, "plan": asdict(self.plan)}))

        save_pretrained(model, train_tokenizer(PRESETS[self.config.preset].vocab_size), path, extra)


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
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train on a connected cluster; writes OUT/{config.json, plan.txt, metrics.parquet, ledger.parquet,
    summary.json, checkpoint/}. ``kill_expert_at=(step, expert)`` kills that expert's actor before that
    step (a failure drill): training restarts every actor from the last checkpoint and goes on."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_experts(
        topology, config.experts, trunk or next(iter(topology.nodes)), expert_nodes, config.replicas
    )
    write_atomic(out / "plan.txt", plan.table() + "\n")
    write_atomic(
        out / "config.json",
        json.dumps(
            {"moe": asdict(config), "steps": steps, "plan": asdict(plan), "topology": str(topology.path)},
            indent=2,
        ),
    )
    progress(plan.table())
    ckpt = out / "checkpoint"
    fleet = MoEFleet(config, topology, plan, data_dir, progress=progress)
    metrics: list[dict[str, Any]] = []
    load = np.zeros(config.experts)
    dropped = fallback = tokens = 0
    restarts: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        fleet.checkpoint(ckpt, 0)
        step = 0
        while step < steps:
            if kill_expert_at and kill_expert_at[0] == step and not restarts:
                ray.kill(fleet.experts[kill_expert_at[1]], no_restart=True)
                progress(f"  step {step}: expert {kill_expert_at[1]} killed (failure drill)")
            try:
                r = fleet.train_step(step)
            except ExpertsLost as exc:  # only death restarts; a bug fails the run (WorkerFailed, MoEError)
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
            }
            if eval_every and step % eval_every == 0:
                row["val_loss"] = fleet.evaluate()["val_loss"]
            metrics.append(row)
            tokens = sum(m["tokens"] for m in metrics)
            if step % max(1, steps // 10) == 0 or step == steps:
                progress(
                    f"  step {step:4d}/{steps}  loss {r['loss']:.4f}  aux {r['aux_loss']:.3f}  dropped {r['dropped']:4d}  inter-region {inter / 2**20:8.1f} MiB"
                )
            if checkpoint_every and step % checkpoint_every == 0:
                fleet.checkpoint(ckpt, step)
        train_bytes = fleet.ledger.bytes_by_class()
        load = np.sum([m["expert_load"] for m in metrics], axis=0)
        dropped = sum(m["dropped"] for m in metrics)
        fallback = sum(m["fallback"] for m in metrics)
        val = fleet.evaluate()
        fleet.checkpoint(ckpt, steps)
    finally:
        fleet.close()
    fleet.ledger.save(out / "ledger.parquet")
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
        "measured_s": time.perf_counter() - t0,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    progress(
        f"val loss {summary['final_val_loss']:.4f}, inter-region {summary['inter_region_bytes'] / 2**20:.1f} MiB, "
        f"dropped {dropped}, fallback {fallback}, load {np.round(load / assignments, 3).tolist()}"
    )
    return summary
