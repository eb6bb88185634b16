"""Partition planner: which node runs which layers, balanced against compute, memory and links.

    plan = plan_pipeline(topology, preset="tiny", stages=3, data_node="campus-gw")
    print(plan.table())

Stage 0 sits on the data node (its shard never leaves it). Each next stage goes to the unused node with the
lowest path latency from the previous one (ties: more CPUs), so activations cross the cheapest links. Layers
are split so that each stage's compute is proportional to its node's CPUs, counting the LM head (vocab x
hidden MACs per token, as much as two tiny layers) on the last stage. Memory per stage = parameters x 16 bytes (fp32 weights, gradients and two AdamW moments)
plus activations of one micro-batch per layer x in-flight micro-batches; a stage that does not fit its
node's ``memory_gb`` is refused with the whole plan and the shortfall.

Re-planning: :class:`LinkConditions` compares the transfers a run's receivers timed (the fabric's
``arrivals``, minimum per link) with what the declared topology predicts for them; :func:`replan` keeps the data node and the layer split and re-chains
the other stages by latency x measured slowdown, so a link that turned out slow is avoided.

Int8 stages (``int8_tiers``, default the device tier): weight matrices are held frozen as int8 with one fp32
scale per row (edgeray.model.quant), 1 byte per weight instead of 16; the norms still train. The plan shows
each stage's weight format and the memory it saves.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgeray.errors import EdgerayError
from edgeray.fabric.links import expected_s
from edgeray.model.presets import PRESETS, ModelPreset
from edgeray.topology import Topology

BYTES_PER_PARAM_TRAINING = 16  # fp32 weight + grad + AdamW exp_avg + exp_avg_sq
INT8_TIERS = frozenset({"device"})


class PlanError(EdgerayError):
    """No placement of the stages fits the nodes; the message shows the plan and the shortfall."""


@dataclass(frozen=True)
class StagePlan:
    node: str
    region: str
    layers: tuple[int, int]
    params: int
    memory_bytes: int
    node_memory_bytes: int
    link_ms_to_next: float | None
    int8: bool = False
    fp32_memory_bytes: int = 0
    """What the stage would need with fp32 trainable weights (equal to memory_bytes unless int8)."""


@dataclass(frozen=True)
class PipelinePlan:
    preset: str
    stages: tuple[StagePlan, ...]

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.stages]

    @property
    def boundaries(self) -> tuple[int, ...]:
        return tuple(s.layers[0] for s in self.stages[1:])

    @property
    def int8_stages(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.stages) if s.int8)

    def table(self) -> str:
        lines = [
            f"{'stage':5} {'node':16} {'region':13} {'layers':8} {'params':>9} {'weights':7} "
            f"{'memory MiB':>11} {'saved MiB':>9} {'of MiB':>8} {'next ms':>8}"
        ]
        for i, s in enumerate(self.stages):
            nxt = "-" if s.link_ms_to_next is None else f"{s.link_ms_to_next:.2f}"
            saved = (s.fp32_memory_bytes - s.memory_bytes) / 2**20 if s.int8 else 0.0
            lines.append(
                f"{i:<5} {s.node:16} {s.region:13} {f'{s.layers[0]}-{s.layers[1] - 1}':8} {s.params:>9,} "
                f"{'int8' if s.int8 else 'fp32':7} {s.memory_bytes / 2**20:>11.1f} {saved:>9.1f} "
                f"{s.node_memory_bytes / 2**20:>8.0f} {nxt:>8}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class LinkConditions:
    """Measured / declared transfer time per node pair; pairs never measured count as declared (1.0).

    ``from_arrivals`` takes, per pair, the fastest of the messages of ``min_bytes`` or more (a late
    receiver only ever inflates a sample). Only pairs are judged, not regions: a slow node port and a slow
    wide-area link look alike from one pair, and blaming the region would steer away from healthy nodes.
    ``merged`` keeps what earlier windows measured on pairs the latest window did not use."""

    pairs: dict[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def from_arrivals(
        cls, topology: Topology, rows: Iterable[dict[str, Any]], *, min_bytes: int = 4096
    ) -> LinkConditions:
        by_pair: dict[tuple[str, str], list[float]] = defaultdict(list)
        for row in rows:
            src, dst = row["src"], row["dst"]
            if row["bytes"] < min_bytes or src == dst:
                continue
            route = topology.route(src, dst)
            by_pair[_key(src, dst)].append(row["seconds"] / max(expected_s(route.link, row["bytes"]), 1e-9))
        return cls({k: min(v) for k, v in by_pair.items()})

    def merged(self, newer: LinkConditions) -> LinkConditions:
        return LinkConditions({**self.pairs, **newer.pairs})

    def slowdown(self, topology: Topology, a: str, b: str) -> float:
        return self.pairs.get(_key(a, b), 1.0)

    def chain_ms(self, topology: Topology, nodes: list[str]) -> float:
        """Declared latency x measured slowdown, summed over consecutive stages."""
        return sum(
            topology.path_latency_ms(a, b) * self.slowdown(topology, a, b)
            for a, b in itertools.pairwise(nodes)
        )

    def describe(self, topology: Topology, nodes: list[str]) -> str:
        """One line per consecutive pair of ``nodes``: the measured slowdown."""
        return ", ".join(
            f"{a}->{b} x{self.slowdown(topology, a, b):.1f}" for a, b in itertools.pairwise(nodes)
        )


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _stage_params(preset: ModelPreset, start: int, stop: int) -> int:
    h, f, v = preset.hidden_size, preset.intermediate_size, preset.vocab_size
    head_dim = h // preset.num_attention_heads
    kv = preset.num_key_value_heads * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h  # q, o; k, v; gate, up, down; two norms
    params = per_layer * (stop - start)
    if start == 0:
        params += v * h  # embedding
    if stop == preset.num_hidden_layers:
        params += h + v * h  # final norm + untied head
    return params


def _stage_weight_memory(preset: ModelPreset, start: int, stop: int, int8: bool) -> int:
    """Bytes of a stage's weights and their training state: 16 per parameter in fp32; int8 stages hold
    each weight matrix as 1 byte per weight + a 4-byte scale per row (frozen), norms at 16 bytes."""
    params = _stage_params(preset, start, stop)
    if not int8:
        return params * BYTES_PER_PARAM_TRAINING
    h, f, v = preset.hidden_size, preset.intermediate_size, preset.vocab_size
    kv = preset.num_key_value_heads * (h // preset.num_attention_heads)
    rows = (h + kv + kv + h + f + f + h) * (stop - start)  # q, k, v, o, gate, up, down: one scale per row
    norms = 2 * h * (stop - start)
    if start == 0:
        rows += v  # embedding: one scale per token
    if stop == preset.num_hidden_layers:
        rows += v  # head
        norms += h
    return (params - norms) + rows * 4 + norms * BYTES_PER_PARAM_TRAINING


def _balance(p: ModelPreset, cpus: list[int]) -> list[tuple[int, int]]:
    """Layer ranges whose compute (MACs per token: a layer's parameters, plus the LM head on the last
    stage; the embedding is a lookup) is proportional to each node's CPUs; every stage gets >= 1 layer."""
    n, stages = p.num_hidden_layers, len(cpus)
    layer = _stage_params(p, 1, 2) if n > 2 else _stage_params(p, 0, 1) - p.vocab_size * p.hidden_size
    head = p.vocab_size * p.hidden_size
    total = n * layer + head
    bounds, start, done_cpus = [], 0, 0
    for i, c in enumerate(cpus):
        left = stages - i - 1
        if left == 0:
            bounds.append((start, n))
            break
        done_cpus += c
        target = total * done_cpus / sum(cpus)  # cumulative cost this stage should reach
        stop = round(target / layer)
        stop = max(start + 1, min(n - left, stop))
        bounds.append((start, stop))
        start = stop
    return bounds


def plan_pipeline(
    topology: Topology,
    *,
    preset: str = "tiny",
    stages: int = 2,
    data_node: str | None = None,
    micro_batch_size: int = 4,
    seq_len: int = 128,
    microbatches: int = 4,
    nodes: list[str] | None = None,
    exclude: frozenset[str] = frozenset(),
    layers: list[tuple[int, int]] | None = None,
    int8_tiers: frozenset[str] = INT8_TIERS,
    conditions: LinkConditions | None = None,
    extra_warmup: int = 1,
    schedule: str = "1f1b",
) -> PipelinePlan:
    """A plan for ``stages`` stages (or exactly on ``nodes``, in order); :class:`PlanError` if it cannot fit.

    Stages on nodes whose tier is in ``int8_tiers`` hold frozen int8 weights (empty: none). With measured
    ``conditions``, link costs are the declared latency x the measured slowdown."""
    conditions = conditions or LinkConditions()

    def link_ms(a: str, b: str) -> float:
        return topology.path_latency_ms(a, b) * conditions.slowdown(topology, a, b)

    p = PRESETS[preset]
    if not 1 <= stages <= p.num_hidden_layers:
        raise PlanError(f"stages must be in 1..{p.num_hidden_layers} for preset {preset!r}, got {stages}")
    if nodes is None:
        first = data_node or next(topology.iter_nodes()).name
        chosen = [topology.node(first).name]
        while len(chosen) < stages:
            free = [n for n in topology.nodes.values() if n.name not in chosen and n.name not in exclude]
            if not free:
                raise PlanError(
                    f"{stages} stages need {stages} nodes; topology {topology.name!r} has {len(topology.nodes)}"
                )
            chosen.append(min(free, key=lambda n: (link_ms(chosen[-1], n.name), -n.cpus, n.name)).name)
    else:
        chosen = [topology.node(n).name for n in nodes]
        stages = len(chosen)
    cpus = [topology.nodes[n].cpus for n in chosen]
    bounds = layers or _balance(p, cpus)  # data-parallel replicas must share one split

    def in_flight(i: int) -> int:
        """Micro-batches whose activations stage i holds at once (1F1B: its warm-up depth + 1)."""
        if schedule == "gpipe":
            return microbatches
        return min(stages - i + (extra_warmup if i < stages - 1 else 0), microbatches)

    act_per_layer = micro_batch_size * seq_len * (p.hidden_size * 8 + p.intermediate_size * 3) * 4
    plan = []
    for i, (node, (a, b)) in enumerate(zip(chosen, bounds, strict=True)):
        params = _stage_params(p, a, b)
        acts = act_per_layer * (b - a) * in_flight(i)
        if b == p.num_hidden_layers:
            acts += micro_batch_size * seq_len * p.vocab_size * 4 * 2  # logits and their gradient
        region = topology.nodes[node].region
        int8 = topology.regions[region].tier.value in int8_tiers
        nxt = link_ms(node, chosen[i + 1]) if i + 1 < len(chosen) else None
        plan.append(
            StagePlan(
                node,
                region,
                (a, b),
                params,
                _stage_weight_memory(p, a, b, int8) + acts,
                int(topology.nodes[node].memory_gb * 2**30),
                nxt,
                int8,
                _stage_weight_memory(p, a, b, False) + acts,
            )
        )
    result = PipelinePlan(preset, tuple(plan))
    short = [s for s in plan if s.memory_bytes > s.node_memory_bytes]
    if short:
        worst = ", ".join(
            f"{s.node} needs {s.memory_bytes / 2**20:.0f} MiB of {s.node_memory_bytes / 2**20:.0f} MiB "
            f"(short by {(s.memory_bytes - s.node_memory_bytes) / 2**20:.0f} MiB)"
            for s in short
        )
        raise PlanError(
            f"the plan does not fit: {worst}\n{result.table()}\n"
            "use more stages, a smaller preset or micro-batch, int8 weights on that tier (int8_tiers), "
            "or nodes with more memory_gb"
        )
    return result


def plan_replicas(topology: Topology, *, replicas: int, stages: int, **kwargs: Any) -> list[PipelinePlan]:
    """``replicas`` data-parallel pipelines on disjoint nodes: replica r's data node is the first node of
    the r-th region (then further nodes in topology order), its other stages the nearest unused nodes."""
    if replicas * stages > len(topology.nodes):
        raise PlanError(
            f"{replicas} replicas x {stages} stages need {replicas * stages} nodes; "
            f"topology {topology.name!r} has {len(topology.nodes)}"
        )
    firsts = [r.nodes[0].name for r in topology.regions.values()]
    firsts += [n.name for n in topology.iter_nodes() if n.name not in firsts]
    plans: list[PipelinePlan] = []
    used: set[str] = set()
    for _ in range(replicas):
        data_node = next(n for n in firsts if n not in used)
        layers = [s.layers for s in plans[0].stages] if plans else None
        plan = plan_pipeline(
            topology, stages=stages, data_node=data_node, exclude=frozenset(used), layers=layers, **kwargs
        )
        used |= set(plan.nodes)
        plans.append(plan)
    return plans


def replan(topology: Topology, plan: PipelinePlan, conditions: LinkConditions, **kwargs: Any) -> PipelinePlan:
    """``plan`` again under measured ``conditions``: same data node (stage 0) and layer split, the other
    stages re-chained. Equal to ``plan`` when the measurements change nothing."""
    return plan_pipeline(
        topology,
        preset=plan.preset,
        stages=len(plan.stages),
        data_node=plan.nodes[0],
        layers=[s.layers for s in plan.stages],
        conditions=conditions,
        **kwargs,
    )
