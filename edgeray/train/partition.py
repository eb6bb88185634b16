"""Partition planner: how a region's nodes share one model (unsplit, a layer split, a tensor split or, for a
mixture-of-experts model, an expert placement), chosen by modelled step time and memory fit.

    profile = ComputeProfile.measure("small", rows=16, seq_len=128)      # this machine's compute, 1 thread
    choice = choose_partition(topology, ["campus-gw", "campus-jetson"], preset="small", rows=16,
                              seq_len=128, microbatches=4, profile=profile)
    print(choice.table())      # every alternative: modelled step time, compute / link parts, memory per node
    choice.best                # the fastest alternative that fits

The model, per training step of ``rows`` x ``seq_len`` tokens (every node runs one thread of the profiled
speed, per token and per call, times its ``slowdown``; transfers by the link model's mean time, times the
measured slowdown of the pair when ``conditions`` are given). What it leaves out: per-message host costs
(Python, gloo) and nodes emulated on one shared machine slowing each other; see the README's
bench_partition figures for where that shows.

- **unsplit** on one node: its compute.
- **layer split** over k nodes (the pipeline's 1F1B, ``microbatches`` m, receives posted ahead so transfers
  overlap compute): the first micro-batch's forward and the last one's backward cross every stage and link
  once, the other m - 1 micro-batches pass at the pace of the slowest stage or link:
  ``sum(S_i) + 2 sum(mu_l) + (m - 1) max(S_i, mu_l) + max(update_i)``, with S_i stage i's compute per
  micro-batch, mu_l one activation message on link l and update_i its optimizer step; every cut of the
  layers is tried and the fastest that fits kept.
- **mixed**: a layer split whose stages may each be a tensor split of 2 or 4 nodes of one region; such a
  stage's S_i is its ranks' compute plus its all-reduces and its leader sharing the input and gradient.
- **tensor split** of degree d over d nodes (edgeray.train.tensor_parallel: attention heads and MLP channels
  split, embedding and LM head replicated): each rank's compute (its share of every layer, measured at that
  degree: smaller matrices run less efficiently) at the slowest rank's speed, plus 4 all-reduces per layer
  (forward and backward of attention and MLP) of the step's activations (rows x seq_len x hidden fp32),
  each a ring of 2(d - 1) messages of 1/d of them (d = 2: one exchange each way); both ends of every
  message post at once, so each also waits one latency for gloo's ready notice
  (edgeray.fabric.links.departure), which a pipeline's receives, posted ahead, do not.
- **expert placement**: only for mixture-of-experts models (edgeray.train.moe); the dense presets have no
  experts, which the table says.

Memory per node: fp32 weights with gradients and two AdamW moments (16 bytes a parameter) plus the
activations held (the pipeline's in-flight micro-batches; a tensor rank's share of the whole batch). An
alternative that does not fit a node's ``memory_gb`` stays in the table, marked, and is never chosen.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeray.errors import EdgerayError
from edgeray.fabric.links import expected_s
from edgeray.model.presets import PRESETS, ModelPreset, build_model
from edgeray.topology import Topology
from edgeray.train.planner import (
    BYTES_PER_PARAM_TRAINING,
    LinkConditions,
    _stage_params,
    plan_pipeline,
)


class PartitionError(EdgerayError):
    """No alternative fits, or the nodes / settings cannot be planned; the message says which and why."""


@dataclass(frozen=True)
class ComputeProfile:
    """Forward + backward cost at reference speed (one thread, node slowdown 1): seconds per token plus
    fixed seconds per call (a micro-batch's pass: Python and kernel launches, whatever its size)."""

    preset: str
    layer_s: Mapping[int, float]
    """One decoder layer, per token, by tensor-parallel degree (1 = unsplit; d = one rank's share)."""
    head_s: float
    """Final norm, LM head and cross-entropy, per token (never split)."""
    embed_s: float
    source: str = "measured"
    layer_call_s: Mapping[int, float] = field(default_factory=dict)
    """One decoder layer, per call, by degree (absent: 0)."""
    head_call_s: float = 0.0
    update_s: float = 0.0
    """The optimizer step (AdamW), per parameter."""

    def stage_s(self, tokens: int, layers: int, *, head: bool, embed: bool, degree: int = 1) -> float:
        """One pass (forward + backward) of ``layers`` layers (and the head / embedding) over ``tokens``."""
        t = layers * (self.layer_call_s.get(degree, 0.0) + tokens * self.layer(degree))
        if head:
            t += self.head_call_s + tokens * self.head_s
        if embed:
            t += tokens * self.embed_s
        return t

    @classmethod
    def measure(
        cls,
        preset: str,
        *,
        rows: int = 8,
        seq_len: int = 128,
        degrees: Sequence[int] = (1, 2, 4),
        repeats: int = 3,
        seed: int = 0,
    ) -> ComputeProfile:
        """Time the whole model, one rank of each tensor-parallel degree (all-reduces replaced by nothing)
        and the head alone, in this process on one thread (best of ``repeats`` after a warm-up), on
        ``rows`` x ``seq_len`` and on a quarter of the rows: the two sizes give the cost per token (slope)
        and per call (intercept). A layer's share is (whole - head - embedding) / layers."""
        from edgeray.train.tensor_parallel import TPError, check_degree, shard_llama

        p = PRESETS[preset]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            gen = torch.Generator().manual_seed(0)
            sizes = sorted({max(1, rows // 4), rows})
            batches = [torch.randint(0, p.vocab_size, (r, seq_len + 1), generator=gen) for r in sizes]
            tokens = [r * seq_len for r in sizes]
            heads, embeds = zip(
                *(_time_head_and_embedding(preset, b, repeats, seed) for b in batches), strict=True
            )
            head_tok, head_call = _fit(tokens, heads)
            embed_tok, _ = _fit(tokens, embeds)
            update = _time_update(preset, batches[0], repeats, seed) / _stage_params(
                p, 0, p.num_hidden_layers
            )
            layer_s: dict[int, float] = {}
            layer_call: dict[int, float] = {}
            for degree in degrees:
                try:
                    check_degree(p.config(), degree)
                except TPError:
                    continue
                model = build_model(preset, seed=seed)
                if degree > 1:
                    model = shard_llama(model, 0, degree, _NoComm(degree))
                wholes = [_best(lambda m=model, b=b: _step(m, b), repeats) for b in batches]
                tok, call = _fit(tokens, wholes)
                n = p.num_hidden_layers
                layer_s[degree] = max(tok - head_tok - embed_tok, 1e-12) / n
                layer_call[degree] = max(call - head_call, 0.0) / n
            return cls(
                preset, layer_s, head_tok, embed_tok, f"measured ({'/'.join(map(str, sizes))}x{seq_len}, 1 thread)",
                layer_call, head_call, update,
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)

    @classmethod
    def analytic(
        cls, preset: str, *, seconds_per_mac: float = 1e-9, degrees: Sequence[int] = (1, 2, 4)
    ) -> ComputeProfile:
        """Multiply-accumulates per token, forward + backward = 3x forward, a layer split d ways costs 1/d:
        deterministic, for tests and for planning without a profile."""
        p = PRESETS[preset]
        layer = _stage_params(p, 1, 2) if p.num_hidden_layers > 2 else _layer_params(p)
        return cls(
            preset,
            {d: 3 * layer * seconds_per_mac / d for d in degrees},
            3 * p.vocab_size * p.hidden_size * seconds_per_mac,
            0.0,
            "analytic",
        )

    def layer(self, degree: int = 1) -> float:
        try:
            return self.layer_s[degree]
        except KeyError:
            raise PartitionError(
                f"the compute profile of {self.preset} has no tensor-parallel degree {degree}; it has "
                f"{sorted(self.layer_s)}"
            ) from None


def _layer_params(p: ModelPreset) -> int:
    return _stage_params(p, 0, 1) - p.vocab_size * p.hidden_size


class _NoComm:
    """A tensor-parallel group of one process standing in for ``world_size`` ranks: all-reduces do nothing
    (profiling one rank's compute)."""

    def __init__(self, world_size: int) -> None:
        self.rank, self.world_size = 0, world_size

    def allreduce(self, tensor: torch.Tensor) -> None:
        return None


def _step(model: torch.nn.Module, batch: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch[:, :-1]).logits
    torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    ).backward()


def _fit(tokens: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """(seconds per token, seconds per call) through two sizes; one size: all per token."""
    if len(tokens) == 1:
        return seconds[0] / tokens[0], 0.0
    (t0, t1), (s0, s1) = tokens, seconds
    slope = max((s1 - s0) / (t1 - t0), 0.0)
    return slope, max(s1 - slope * t1, 0.0)


def _best(fn: object, repeats: int) -> float:
    assert callable(fn)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _time_update(preset: str, batch: torch.Tensor, repeats: int, seed: int) -> float:
    model = build_model(preset, seed=seed)
    _step(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return _best(optimizer.step, repeats)


def _time_head_and_embedding(
    preset: str, batch: torch.Tensor, repeats: int, seed: int
) -> tuple[float, float]:
    model = build_model(preset, seed=seed)
    ids, labels = batch[:, :-1], batch[:, 1:]
    hidden = torch.randn(*ids.shape, model.config.hidden_size, requires_grad=True)

    def head() -> None:
        logits = model.lm_head(model.model.norm(hidden))
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()

    def embed() -> None:
        model.model.embed_tokens(ids).sum().backward()

    return _best(head, repeats), _best(embed, repeats)


def mixed_name(degrees: Sequence[int]) -> str:
    """The name of a pipeline whose stages have these tensor-parallel degrees."""
    return "mixed (" + " | ".join(f"tensor x{d}" if d > 1 else "1 node" for d in degrees) + ")"


@dataclass(frozen=True)
class Alternative:
    """One way to run the step on some of the nodes, with its modelled time and memory."""

    kind: str
    """"unsplit", "layer", "tensor", "mixed" (a layer split whose stages may be tensor-parallel groups) or
    "expert"."""
    nodes: tuple[str, ...]
    modelled_s: float | None
    """None: not applicable (see ``note``)."""
    compute_s: float = 0.0
    """The part of ``modelled_s`` spent computing on the critical path."""
    comm_s: float = 0.0
    """The part of ``modelled_s`` spent on links (not hidden behind compute)."""
    memory_bytes: tuple[int, ...] = ()
    node_memory_bytes: tuple[int, ...] = ()
    boundaries: tuple[int, ...] = ()
    """Layer split: where each stage after the first starts."""
    degree: int = 1
    """Tensor split: the degree."""
    note: str = ""
    stage_degrees: tuple[int, ...] = ()
    """Layer split / mixed: each stage's tensor-parallel degree (1: one node)."""
    busy_s: tuple[int | float, ...] = ()
    """Each node's modelled compute in the step (what the energy model bills at ``busy_w``)."""

    def joules(self, topology: Topology) -> float | None:
        """Modelled energy of one step (edgeray.energy): every node up for ``modelled_s`` at ``idle_w``,
        busy for its ``busy_s`` at ``busy_w``. None where the alternative does not apply."""
        if self.modelled_s is None:
            return None
        from edgeray.energy import node_joules

        busy = self.busy_s or (0.0,) * len(self.nodes)
        return sum(
            node_joules(topology.nodes[n], b, self.modelled_s) for n, b in zip(self.nodes, busy, strict=True)
        )

    @property
    def fits(self) -> bool:
        return self.modelled_s is not None and all(
            m <= cap for m, cap in zip(self.memory_bytes, self.node_memory_bytes, strict=True)
        )

    @property
    def name(self) -> str:
        if self.kind == "layer":
            return f"layer split x{len(self.nodes)}"
        if self.kind == "mixed":
            return mixed_name(self.stage_degrees)
        if self.kind == "tensor":
            return f"tensor split x{self.degree}"
        if self.kind == "unsplit":
            return f"unsplit on {self.nodes[0]}"
        return "expert placement"


@dataclass(frozen=True)
class PartitionChoice:
    """Every alternative considered and the chosen one (the fastest that fits)."""

    alternatives: tuple[Alternative, ...]
    best: Alternative | None
    """None only inside the refusal's message (nothing fits)."""
    settings: str = ""
    profile_source: str = ""
    conditions: dict[tuple[str, str], float] = field(default_factory=dict)
    joules: dict[Alternative, float] = field(default_factory=dict)
    """Modelled joules per step of each alternative that applies."""
    prefer: str = "time"
    energy_slack: float = 1.0

    def get(self, name: str) -> Alternative:
        for a in self.alternatives:
            if a.name == name:
                return a
        raise KeyError(f"no alternative {name!r}; there are {[a.name for a in self.alternatives]}")

    def table(self) -> str:
        """plan.txt: the settings, each alternative with modelled time, its parts and memory, and why the
        chosen one won."""
        lines = [
            f"partition of {self.settings}",
            f"compute profile: {self.profile_source}",
        ]
        if self.conditions:
            lines.append(
                "measured links: "
                + ", ".join(
                    f"{a}<->{b} x{s:.2f} of declared" for (a, b), s in sorted(self.conditions.items())
                )
            )
        lines.append(
            f"{'alternative':28} {'nodes':40} {'modelled s':>10} {'compute s':>9} {'links s':>8} {'J/step':>8} "
            f"{'memory MiB per node (of)':28} note"
        )
        for a in sorted(self.alternatives, key=lambda a: (a.modelled_s is None, a.modelled_s or 0.0)):
            mem = ", ".join(
                f"{m / 2**20:.0f} ({c / 2**20:.0f})"
                for m, c in zip(a.memory_bytes, a.node_memory_bytes, strict=True)
            )
            t = "-" if a.modelled_s is None else f"{a.modelled_s:.4f}"
            note = a.note
            if a.modelled_s is not None and not a.fits:
                note = ("does not fit; " + note).rstrip("; ")
            mark = "*" if a == self.best else " "
            j = self.joules.get(a)
            joules = "-" if j is None else f"{j:.2f}"
            lines.append(
                f"{mark}{a.name:27} {','.join(a.nodes):40} {t:>10} {a.compute_s:9.4f} {a.comm_s:8.4f} {joules:>8} "
                f"{mem:28} {note}"
            )
        if self.best is None or self.best.modelled_s is None:
            return "\n".join([*lines, "chosen: none (no alternative fits)"])
        runner_up = [  # unsplit on another node of the same speed is not an alternative worth naming
            a for a in self.alternatives
            if a.fits and a != self.best and not (a.kind == self.best.kind == "unsplit")
        ]  # fmt: skip
        why = f"chosen: {self.best.name} ({self.best.modelled_s:.4f} s modelled)"
        if self.prefer == "energy":
            fastest = min((a for a in self.alternatives if a.fits), key=lambda a: a.modelled_s or 0.0)
            why += (
                f", the fewest joules per step ({self.joules[self.best]:.2f} J) among those within "
                f"{self.energy_slack:.2f}x of the fastest ({fastest.name}, {fastest.modelled_s:.4f} s, "
                f"{self.joules[fastest]:.2f} J)"
            )
            lines.append(why)
            return "\n".join(lines)
        if runner_up:
            nxt = min(runner_up, key=lambda a: a.modelled_s or 0.0)
            assert nxt.modelled_s is not None
            why += f", {nxt.modelled_s / self.best.modelled_s:.2f}x faster than the next, {nxt.name}"
        lines.append(why)
        return "\n".join(lines)


def _pair_s(topology: Topology, conditions: LinkConditions, a: str, b: str, nbytes: int) -> float:
    return expected_s(topology.link(a, b), nbytes) * conditions.slowdown(topology, a, b)


def _step_s(topology: Topology, conditions: LinkConditions, a: str, b: str, nbytes: int) -> float:
    """One collective step from ``a`` to ``b``: ``b``'s ready notice crosses the link, then the bytes."""
    notice = topology.link(b, a).latency_ms / 1e3 * conditions.slowdown(topology, b, a)
    return notice + _pair_s(topology, conditions, a, b, nbytes)


def _speed(topology: Topology, node: str) -> float:
    return topology.nodes[node].slowdown


def _stage_groups(
    topology: Topology, nodes: Sequence[str], p: ModelPreset
) -> list[tuple[tuple[str, ...], ...]]:
    """Every way to cut a prefix of ``nodes`` (in order) into pipeline stages of one node or a
    tensor-parallel group (2 or 4 nodes of one region, a degree the model splits by)."""
    from edgeray.train.tensor_parallel import TPError, check_degree

    def ok(group: Sequence[str]) -> bool:
        if len(group) == 1:
            return True
        if len({topology.nodes[n].region for n in group}) > 1:
            return False
        try:
            check_degree(p.config(), len(group))
        except TPError:
            return False
        return True

    out: list[tuple[tuple[str, ...], ...]] = []

    def extend(done: tuple[tuple[str, ...], ...], i: int) -> None:
        if done:
            out.append(done)
        for size in (1, 2, 4):
            group = tuple(nodes[i : i + size])
            if len(group) == size and ok(group):
                extend((*done, group), i + size)

    extend((), 0)
    return out


def _allreduce_s(topology: Topology, conditions: LinkConditions, group: Sequence[str], nbytes: int) -> float:
    """One all-reduce of ``nbytes`` over ``group`` as edgeray.train.tensor_parallel.FabricComm does it."""
    d = len(group)
    if d == 1:
        return 0.0
    if d == 2:
        return _step_s(topology, conditions, group[0], group[1], nbytes)
    ring = list(zip(group, [*group[1:], group[0]], strict=True))
    return 2 * (d - 1) * max(_step_s(topology, conditions, a, b, nbytes // d) for a, b in ring)


def _best_chain(
    topology: Topology,
    conditions: LinkConditions,
    profile: ComputeProfile,
    p: ModelPreset,
    groups: tuple[tuple[str, ...], ...],
    kind: str,
    rows: int,
    seq_len: int,
    microbatches: int,
) -> Alternative:
    """The pipeline over ``groups`` (a stage per group; a group of several nodes is a tensor-parallel
    stage) with the layer split of lowest modelled time among those that fit (every split is tried)."""
    m, k, n = microbatches, len(groups), p.num_hidden_layers
    tok_micro = rows * seq_len // m
    act = tok_micro * p.hidden_size * 4
    leaders = [g[0] for g in groups]
    mu = [_pair_s(topology, conditions, a, b, act) for a, b in itertools.pairwise(leaders)]
    best: Alternative | None = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = list(itertools.pairwise((0, *cuts, n)))
        s_i, update, memory, caps, busy = [], 0.0, [], [], []
        for i, (group, (a, b)) in enumerate(zip(groups, bounds, strict=True)):
            d, layers = len(group), b - a
            speed = max(_speed(topology, node) for node in group)
            compute = profile.stage_s(tok_micro, layers, head=b == n, embed=a == 0, degree=d) * speed
            if d > 1:  # 4 all-reduces per layer, and the leader shares the stage's input and its gradient
                compute += 4 * layers * _allreduce_s(topology, conditions, group, act)
                compute += 2 * max(_pair_s(topology, conditions, group[0], peer, act) for peer in group[1:])
            s_i.append(compute)
            params = _stage_params(p, a, b)
            edge = (p.vocab_size * p.hidden_size if a == 0 else 0) + (
                p.vocab_size * p.hidden_size + p.hidden_size if b == n else 0
            )
            rank_params = (params - edge) // d + edge
            update = max(update, profile.update_s * rank_params * speed)
            busy += [
                m * compute + profile.update_s * rank_params * speed
            ] * d  # every micro-batch, its update
            in_flight = min(k - i + (1 if i < k - 1 else 0), m)
            acts = tok_micro * (p.hidden_size * 8 + p.intermediate_size * 3) * 4 * layers * in_flight // d
            if b == n:
                acts += tok_micro * p.vocab_size * 4 * 2
            memory += [rank_params * BYTES_PER_PARAM_TRAINING + acts] * d
            caps += [int(topology.nodes[node].memory_gb * 2**30) for node in group]
        pace = max(*s_i, *mu)
        t = sum(s_i) + 2 * sum(mu) + (m - 1) * pace + update
        hidden = 2 * sum(mu) + (m - 1) * max(0.0, pace - max(s_i))
        alt = Alternative(
            kind,
            tuple(node for g in groups for node in g),
            t,
            t - hidden,
            hidden,
            tuple(memory),
            tuple(caps),
            boundaries=cuts,
            degree=max(len(g) for g in groups),
            stage_degrees=tuple(len(g) for g in groups),
            busy_s=tuple(busy),
        )
        if best is None or (alt.fits, -t) > (best.fits, -(best.modelled_s or 0.0)):
            best = alt
    assert best is not None
    return best


def choose_partition(
    topology: Topology,
    nodes: Sequence[str],
    *,
    preset: str,
    rows: int,
    seq_len: int,
    microbatches: int = 4,
    profile: ComputeProfile | None = None,
    conditions: LinkConditions | None = None,
    kinds: Sequence[str] = ("unsplit", "layer", "tensor", "mixed", "expert"),
    prefer: str = "time",
    energy_slack: float = 1.10,
) -> PartitionChoice:
    """Model every way ``nodes`` (the first holds the data) can run one step of ``rows`` x ``seq_len``
    tokens and choose the fastest that fits; see the module docstring for the model.

    ``prefer="energy"``: among the alternatives that fit and are modelled within ``energy_slack`` times the
    fastest's step time, the one of fewest modelled joules per step (edgeray.energy's power model: every
    node of the alternative up for the step at ``idle_w``, busy for its compute at ``busy_w``)."""
    if prefer not in ("time", "energy"):
        raise PartitionError(f"prefer={prefer!r}: valid values are 'time' and 'energy'")
    if not energy_slack >= 1.0:
        raise PartitionError(
            f"energy_slack={energy_slack!r}: must be >= 1 (a factor on the fastest step time)"
        )
    if preset not in PRESETS:
        raise PartitionError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
    nodes = [topology.node(n).name for n in nodes]  # raises with the valid names
    if len(set(nodes)) != len(nodes) or not nodes:
        raise PartitionError(f"nodes must be distinct and at least one, got {nodes}")
    if rows % microbatches:
        raise PartitionError(f"rows {rows} must split into microbatches {microbatches}")
    p = PRESETS[preset]
    profile = profile or ComputeProfile.analytic(preset)
    conditions = conditions or LinkConditions()
    tokens = rows * seq_len
    alts: list[Alternative] = []

    def rank_params(degree: int) -> int:
        return (
            _layer_params(p) * p.num_hidden_layers // degree
            + 2 * p.vocab_size * p.hidden_size
            + p.hidden_size
        )

    def whole_model_memory(degree: int) -> int:
        params = rank_params(degree)
        acts = tokens * (p.hidden_size * 8 + p.intermediate_size * 3) * 4 * p.num_hidden_layers // degree
        logits = tokens * p.vocab_size * 4 * 2
        return params * BYTES_PER_PARAM_TRAINING + acts + logits

    def cap(n: str) -> int:
        return int(topology.nodes[n].memory_gb * 2**30)

    if "unsplit" in kinds:
        for n in nodes:
            t = profile.stage_s(tokens, p.num_hidden_layers, head=True, embed=True)
            t = (t + profile.update_s * rank_params(1)) * _speed(topology, n)
            alts.append(
                Alternative("unsplit", (n,), t, t, 0.0, (whole_model_memory(1),), (cap(n),), busy_s=(t,))
            )

    if "layer" in kinds or "mixed" in kinds:
        for groups in _stage_groups(topology, nodes, p):
            kind = "mixed" if any(len(g) > 1 for g in groups) else "layer"
            if kind in kinds and 2 <= len(groups) <= p.num_hidden_layers:
                alts.append(
                    _best_chain(topology, conditions, profile, p, groups, kind, rows, seq_len, microbatches)
                )

    if "tensor" in kinds:
        from edgeray.train.tensor_parallel import TPError, check_degree

        for d in (2, 4, 8):
            if d > len(nodes):
                break
            group = nodes[:d]
            try:
                check_degree(p.config(), d)
                profile.layer(d)
            except (TPError, PartitionError) as exc:
                alts.append(
                    Alternative("tensor", tuple(group), None, degree=d, note=str(exc).splitlines()[0])
                )
                continue
            regions = {topology.nodes[n].region for n in group}
            if len(regions) > 1:
                alts.append(
                    Alternative(
                        "tensor",
                        tuple(group),
                        None,
                        degree=d,
                        note=f"spans regions {sorted(regions)}: a tensor split stays inside one region",
                    )
                )
                continue
            compute = profile.stage_s(tokens, p.num_hidden_layers, head=True, embed=True, degree=d)
            compute += profile.update_s * rank_params(d)
            compute *= max(_speed(topology, n) for n in group)
            act = tokens * p.hidden_size * 4
            comm = 4 * p.num_hidden_layers * _allreduce_s(topology, conditions, group, act)
            mem = whole_model_memory(d)
            alts.append(
                Alternative(
                    "tensor",
                    tuple(group),
                    compute + comm,
                    compute,
                    comm,
                    tuple(mem for _ in group),
                    tuple(cap(n) for n in group),
                    degree=d,
                    busy_s=tuple(compute for _ in group),
                )
            )

    if "expert" in kinds:
        alts.append(
            Alternative(
                "expert",
                tuple(nodes),
                None,
                note=f"{preset} is a dense model (no experts); expert placement applies to mixture-of-experts "
                "models (edgeray.train.moe places experts by its own planner)",
            )
        )

    fitting = [a for a in alts if a.fits]
    settings = (
        f"{preset} over {', '.join(nodes)}: {rows} x {seq_len} tokens a step, {microbatches} micro-batches "
        "in a layer split"
    )
    if not fitting:
        table = PartitionChoice(tuple(alts), None, settings, profile.source).table()
        raise PartitionError(
            f"no alternative fits the nodes' memory:\n{table}\nuse a smaller preset or batch, more nodes, or "
            "nodes with more memory_gb"
        )
    best = min(fitting, key=lambda a: (a.modelled_s, len(a.nodes)))
    joules = {a: j for a in alts if (j := a.joules(topology)) is not None}
    if prefer == "energy":
        assert best.modelled_s is not None
        near = [a for a in fitting if (a.modelled_s or 0.0) <= energy_slack * best.modelled_s]
        best = min(near, key=lambda a: (joules[a], a.modelled_s))
    return PartitionChoice(
        tuple(alts), best, settings, profile.source, dict(conditions.pairs), joules, prefer, energy_slack
    )


REPARTITION_GAIN = 1.25
"""Move to another layout only when the model says it is at least this much faster (no flapping on noise)."""


@dataclass(frozen=True)
class Partitioner:
    """The planner bound to one run: chooses the layout at the start and, from the links the run measured,
    whether to move to another (see :func:`edgeray.train.run.train`'s ``partitioner``)."""

    topology: Topology
    nodes: tuple[str, ...]
    """The data node first, then the other nodes the run may use (one region's, for a tensor split)."""
    preset: str
    rows: int
    seq_len: int
    microbatches: int
    profile: ComputeProfile
    kinds: tuple[str, ...] = ("unsplit", "layer", "tensor")
    prefer: str = "time"
    """"energy": the fewest modelled joules per step within ``energy_slack`` of the fastest (see
    :func:`choose_partition`)."""
    energy_slack: float = 1.10

    def choose(self, conditions: LinkConditions | None = None) -> PartitionChoice:
        return choose_partition(
            self.topology, self.nodes, preset=self.preset, rows=self.rows, seq_len=self.seq_len,
            microbatches=self.microbatches, profile=self.profile, conditions=conditions, kinds=self.kinds,
            prefer=self.prefer, energy_slack=self.energy_slack,
        )  # fmt: skip

    def current(self, plan: Any, config: Any) -> str:
        """The alternative's name of a running layout (a plan and its PipelineConfig)."""
        if config.tp and max(config.tp) > 1:
            if len(plan.nodes) > 1:
                return mixed_name(config.tp)
            return f"tensor split x{max(config.tp)}"
        if len(plan.nodes) > 1:
            return f"layer split x{len(plan.nodes)}"
        return f"unsplit on {plan.nodes[0]}"

    def layout(self, alt: Alternative, config: Any) -> tuple[Any, Any]:
        """The pipeline plan and config that run ``alt`` (weights and optimizer state carry over through a
        checkpoint: they are stored by the whole model's names)."""
        from dataclasses import replace

        def plan(nodes: list[str], layers: list[tuple[int, int]] | None = None) -> Any:
            return plan_pipeline(
                self.topology, nodes=nodes, preset=self.preset, micro_batch_size=self.rows // self.microbatches,
                seq_len=self.seq_len, microbatches=self.microbatches, int8_tiers=frozenset(), layers=layers,
            )  # fmt: skip

        if alt.kind in ("layer", "mixed"):
            n = PRESETS[self.preset].num_hidden_layers
            layers = list(itertools.pairwise((0, *alt.boundaries, n)))
            leaders, i = [], 0
            for d in alt.stage_degrees:
                leaders.append(alt.nodes[i])
                i += d
            chain = plan(leaders, layers)
            tp = alt.stage_degrees if alt.kind == "mixed" else ()
            return chain, replace(config, boundaries=chain.boundaries, tp=tp)
        one = plan([alt.nodes[0]])
        return one, replace(config, boundaries=(), tp=(alt.degree,) if alt.kind == "tensor" else ())

    def better(self, running: str, conditions: LinkConditions) -> PartitionChoice | None:
        """The new choice if, under ``conditions``, another layout is modelled ``REPARTITION_GAIN`` x faster
        than the running one; else None."""
        choice = self.choose(conditions)
        assert choice.best is not None
        now = choice.get(running).modelled_s
        if choice.best.name == running or now is None or choice.best.modelled_s is None:
            return None
        return choice if choice.best.modelled_s * REPARTITION_GAIN <= now else None
