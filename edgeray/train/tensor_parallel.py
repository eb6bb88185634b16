"""Megatron-style tensor parallelism for Llama models (Shoeybi et al. 2019, "Megatron-LM").

Every decoder layer's attention is split by heads and its MLP by intermediate channels across ``degree``
ranks: q/k/v and gate/up are column-parallel (each rank holds its heads' / channels' rows), o_proj and
down_proj are row-parallel (each rank holds the matching input columns and produces a partial sum). Around
each of the two blocks sit Megatron's two conjugate operators:

- ``f`` at the block's input: identity forward, all-reduce of the gradient backward;
- ``g`` at the block's output: all-reduce of the partial sums forward, identity backward;

so a step costs one all-reduce per block in forward and one in backward, and everything outside the blocks
(embeddings, norms, lm_head) is replicated: every rank sees the same activations and computes the same
gradients for those parameters. When the model has fewer key/value heads than ``degree`` (grouped-query
attention, e.g. the tiny preset's 2 for 4 ranks), each rank keeps a copy of the key/value head its query
heads read; the copies' gradients are partial and :func:`sync_replicated_grads` sums them (one all-reduce
per step over the rank group).

    comm = FabricComm(group_name)                  # in a TPWorker: the fabric group of the TP nodes
    model = shard_llama(build_model("tiny"), rank, degree, comm)
    loss = lm_loss(model, batch); loss.backward(); sync_replicated_grads(model)

The all-reduces go through the fabric (``FabricComm``: ring all-reduce on an EDGERAY group, charged to the
link model and the ledger) or any object with ``rank``, ``world_size`` and an in-place ``allreduce``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import ray
import torch
from torch import nn


class TPError(ValueError):
    """A model or degree that cannot be split (the message names the field and what is valid)."""


class Comm(Protocol):
    rank: int
    world_size: int

    def allreduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the group in place; every rank ends with the same values."""


class FabricComm:
    """A TP group over the edge fabric: the ring all-reduce of an EDGERAY group, or for two ranks one
    exchange (each rank ends with the same bits, which the replicated activations need)."""

    def __init__(self, group_name: str) -> None:
        from edgeray.fabric.backend import EdgeGroup

        self.group = EdgeGroup.get(group_name)
        self.rank, self.world_size = self.group.rank, self.group.world_size
        self.wall_s = 0.0
        """Wall seconds spent in all-reduces (waiting for the peer included), for the step breakdown."""

    def allreduce(self, tensor: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self._allreduce(tensor)
        self.wall_s += time.perf_counter() - t0

    def _allreduce(self, tensor: torch.Tensor) -> None:
        if self.world_size == 2:  # one message each way instead of the ring's two: same bytes, half the
            # per-message cost (latency, Python, gloo); a + b == b + a in IEEE arithmetic, so both ranks
            # still end with the same bits
            peer = 1 - self.rank
            flows = [(self.group.nodes[0], self.group.nodes[1]), (self.group.nodes[1], self.group.nodes[0])]
            tensor += self.group.pair_exchange(tensor, peer, "allreduce", flows)
        else:
            self.group.ring_allreduce(tensor, "none", "tp")


class _CopyToTP(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        ctx.comm.allreduce(grad)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's ``g``: all-reduce of the partial sums forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Comm) -> torch.Tensor:
        out = x.contiguous().clone()
        comm.allreduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class TPBlock(nn.Module):
    """A column-then-row-parallel block (a Llama attention or MLP shard) between ``f`` and ``g``. Attention
    returns ``(output, weights)``: the weights (if any) are this rank's heads only."""

    def __init__(self, inner: nn.Module, comm: Comm) -> None:
        super().__init__()
        self.inner = inner
        self.comm = comm

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        x = _CopyToTP.apply(hidden_states, self.comm)
        out = self.inner(x, *args, **kwargs)
        if isinstance(out, tuple):
            return (_ReduceFromTP.apply(out[0], self.comm), *out[1:])
        return _ReduceFromTP.apply(out, self.comm)


@dataclass(frozen=True)
class Layout:
    """Which rows (``dim`` 0) or columns (``dim`` 1) of a full parameter one rank holds; ``index`` None:
    the whole parameter (replicated). ``shared``: other ranks hold copies of the same slice whose gradients
    are partial (key/value heads when there are fewer than ranks)."""

    dim: int | None
    index: tuple[int, ...] | None
    shared: bool = False


def _heads(config: Any) -> tuple[int, int, int]:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def check_degree(config: Any, degree: int) -> None:
    """Refuse a degree the model cannot be split by, naming the field and the valid degrees."""
    heads, kv, _ = _heads(config)
    inter = config.intermediate_size
    valid = [
        d for d in range(1, heads + 1) if heads % d == 0 and inter % d == 0 and (kv % d == 0 or d % kv == 0)
    ]
    if degree not in valid:
        raise TPError(
            f"tensor-parallel degree {degree}: the model has num_attention_heads={heads}, "
            f"num_key_value_heads={kv}, intermediate_size={inter}; valid degrees: {valid}"
        )


def _rows(start: int, count: int, width: int) -> tuple[int, ...]:
    return tuple(range(start * width, (start + count) * width))


def layouts(config: Any, rank: int, degree: int) -> dict[str, Layout]:
    """Per parameter name (as in the unsplit model's ``named_parameters``), what rank ``rank`` of ``degree``
    holds. Names not listed are replicated."""
    check_degree(config, degree)
    heads, kv, hd = _heads(config)
    q_per = heads // degree
    q0 = rank * q_per
    if kv >= degree:
        kv_per, kv0, shared = kv // degree, rank * (kv // degree), False
    else:  # fewer key/value heads than ranks: the one this rank's query heads read, copied
        kv_per, kv0, shared = 1, q0 // (heads // kv), True
    inter = config.intermediate_size // degree
    out: dict[str, Layout] = {}
    bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        q, k = Layout(0, _rows(q0, q_per, hd)), Layout(0, _rows(kv0, kv_per, hd), shared)
        out[f"{a}.q_proj.weight"], out[f"{a}.k_proj.weight"], out[f"{a}.v_proj.weight"] = q, k, k
        out[f"{a}.o_proj.weight"] = Layout(1, _rows(q0, q_per, hd))
        if bias:
            out[f"{a}.q_proj.bias"], out[f"{a}.k_proj.bias"], out[f"{a}.v_proj.bias"] = q, k, k
        ch = Layout(0, _rows(rank, 1, inter))
        out[f"{m}.gate_proj.weight"] = out[f"{m}.up_proj.weight"] = ch
        out[f"{m}.down_proj.weight"] = Layout(1, ch.index)
        if mlp_bias:
            out[f"{m}.gate_proj.bias"] = out[f"{m}.up_proj.bias"] = ch
    return out


def _slice_linear(linear: nn.Linear, dim: int, index: tuple[int, ...], keep_bias: bool) -> nn.Linear:
    idx = torch.tensor(index)
    weight = linear.weight.detach().index_select(dim, idx).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None and keep_bias)
    new.weight = nn.Parameter(weight)
    if new.bias is not None:
        assert linear.bias is not None
        bias = linear.bias.detach()
        new.bias = nn.Parameter((bias.index_select(0, idx) if dim == 0 else bias).clone())
    return new


def shard_llama(model: Any, rank: int, degree: int, comm: Comm) -> Any:
    """Split ``model`` (a transformers LlamaForCausalLM, whole) in place into rank ``rank`` of ``degree``.
    A row-parallel layer's bias is kept on rank 0 only (added once to the summed output)."""
    config = model.config
    if comm.world_size != degree or comm.rank != rank:
        raise TPError(
            f"rank {rank} of {degree} on a group where this is rank {comm.rank} of {comm.world_size}"
        )
    lay = layouts(config, rank, degree)
    for i, layer in enumerate(model.model.layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            spec = lay[f"{a}.{name}.weight"]
            assert spec.dim is not None and spec.index is not None
            setattr(
                attn,
                name,
                _slice_linear(getattr(attn, name), spec.dim, spec.index, spec.dim == 0 or rank == 0),
            )
        attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features
        for name in ("gate_proj", "up_proj", "down_proj"):
            spec = lay[f"{m}.{name}.weight"]
            assert spec.dim is not None and spec.index is not None
            setattr(
                mlp, name, _slice_linear(getattr(mlp, name), spec.dim, spec.index, spec.dim == 0 or rank == 0)
            )
        layer.self_attn = TPBlock(attn, comm)
        layer.mlp = TPBlock(mlp, comm)
    model.tp = (rank, degree, comm)
    return model


def unsplit_name(name: str) -> str:
    """A sharded model's parameter name as in the unsplit model (drops the TPBlock's ``inner.``)."""
    return name.replace(".self_attn.inner.", ".self_attn.").replace(".mlp.inner.", ".mlp.")


def sync_replicated_grads(model: Any) -> None:
    """Sum the partial gradients of copied key/value heads over the ranks that hold them (one all-reduce
    over the group, each copy in its head's slot); a no-op when every rank has its own heads."""
    rank, degree, comm = model.tp
    lay = layouts(model.config, rank, degree)
    shared = [
        (p, lay[unsplit_name(n)])
        for n, p in model.named_parameters()
        if unsplit_name(n) in lay and lay[unsplit_name(n)].shared
    ]
    if not shared:
        return
    _, kv, hd = _heads(model.config)
    slots = []
    for p, spec in shared:
        assert spec.index is not None
        full = torch.zeros((kv * hd, *p.shape[1:]), dtype=p.dtype)
        if p.grad is not None:
            full[list(spec.index)] = p.grad
        slots.append(full.view(-1))
    buf = torch.cat(slots)
    comm.allreduce(buf)
    offset = 0
    for (p, spec), full in zip(shared, slots, strict=True):
        n = full.numel()
        summed = buf[offset : offset + n].view(kv * hd, *p.shape[1:])
        p.grad = summed[list(spec.index or ())].clone()
        offset += n


def shard_state(
    full: dict[str, torch.Tensor], config: Any, rank: int, degree: int
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of a whole model's tensors (parameters or gradients), by unsplit name."""
    lay = layouts(config, rank, degree)
    out = {}
    for name, t in full.items():
        spec = lay.get(name)
        if spec is None or spec.index is None:
            out[name] = t
        else:
            assert spec.dim is not None
            out[name] = t.index_select(spec.dim, torch.tensor(spec.index))
    return out


def gather_state(parts: list[dict[str, torch.Tensor]], config: Any, degree: int) -> dict[str, torch.Tensor]:
    """The whole model's tensors from every rank's part (by unsplit name; ``parts[r]`` from rank r). A
    row-parallel bias held by rank 0 only is taken from there. Replicated tensors and copied heads must be
    equal across ranks (this is checked: a mismatch raises TPError naming the tensor)."""
    out: dict[str, torch.Tensor] = {}
    for rank, part in enumerate(parts):
        lay = layouts(config, rank, degree)
        for name, t in part.items():
            spec = lay.get(name)
            if spec is None or spec.index is None:
                if name in out and not torch.equal(out[name], t):
                    raise TPError(f"{name}: replicated tensor differs between ranks 0 and {rank}")
                out.setdefault(name, t.clone())
                continue
            assert spec.dim is not None
            if name not in out:
                shape = list(t.shape)
                shape[spec.dim] = _full_size(config, name, t.shape[spec.dim], degree)
                out[name] = torch.full(shape, float("nan"), dtype=t.dtype)
            target = out[name].narrow(spec.dim, spec.index[0], len(spec.index))
            if spec.shared and not torch.isnan(target).all() and not torch.equal(target, t):
                raise TPError(f"{name}: copies of a key/value head differ between ranks")
            target.copy_(t)
    return out


def _full_size(config: Any, name: str, local: int, degree: int) -> int:
    heads, kv, hd = _heads(config)
    if ".k_proj." in name or ".v_proj." in name:
        return kv * hd
    if ".q_proj." in name or ".o_proj." in name:
        return heads * hd
    return local * degree


# ---------------------------------------------------------------------- on a cluster
WAIT_S = 300.0


@ray.remote(num_cpus=0)  # started in a Reservation slot that declares its CPUs
class TPWorker:
    """One tensor-parallel rank on one node: the model's shard, its optimizer, and the group's all-reduces
    over the fabric (charged to the link model, the ledger and the node's modelled clock)."""

    def __init__(
        self,
        topology_path: str,
        node: str,
        *,
        preset: str,
        seed: int,
        lr: float,
        optimizer: str,
        torch_threads: int,
        timeout_s: float,
        time_scale: float = 0.0,
    ) -> None:
        from edgeray.fabric.backend import Fabric, install
        from edgeray.model.presets import build_model
        from edgeray.topology import load_topology

        torch.set_num_threads(torch_threads)
        self.node = node
        self.fabric = Fabric.from_topology(
            load_topology(topology_path), node=node, seed=seed, timeout_s=timeout_s, time_scale=time_scale
        )
        install(self.fabric)
        self.model = build_model(preset, seed=seed)
        self.lr, self.optimizer_name = lr, optimizer
        self.optimizer: torch.optim.Optimizer | None = None

    def join(self, group: str, degree: int, rank: int) -> str:
        from edgeray.fabric.groups import Membership, join

        join([Membership(group, degree, rank)])
        self.comm = FabricComm(group)
        self.model = shard_llama(self.model, rank, degree, self.comm)
        from edgeray.train.sync import make_optimizer

        self.optimizer = make_optimizer(self.optimizer_name, self.model.parameters(), self.lr)
        return self.node

    def _forward_backward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        with self.fabric.working():
            logits = self.model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            loss.backward()
            sync_replicated_grads(self.model)
        return loss, logits

    def gradients(self, batch: np.ndarray) -> dict[str, Any]:
        """Forward and backward on ``batch`` (N, T + 1) without a step: the loss, the logits and this
        rank's gradients by unsplit parameter name."""
        loss, logits = self._forward_backward(torch.from_numpy(np.array(batch)))
        grads = {
            unsplit_name(n): p.grad.detach().numpy()
            for n, p in self.model.named_parameters()
            if p.grad is not None
        }
        return {"loss": float(loss), "logits": logits.detach().numpy(), "grads": grads}

    def train_step(self, batch: np.ndarray) -> dict[str, Any]:
        """One optimizer step on ``batch``; every rank reports the same loss."""
        assert self.optimizer is not None, "join a group first"
        t0, in_comm = time.perf_counter(), self.comm.wall_s
        loss, _ = self._forward_backward(torch.from_numpy(np.array(batch)))
        with self.fabric.working():
            self.optimizer.step()
        in_comm = self.comm.wall_s - in_comm
        return {
            "loss": float(loss),
            "clock": self.fabric.clock,
            "wall_s": time.perf_counter() - t0,
            "allreduce_wall_s": in_comm,
        }

    def state(self) -> dict[str, np.ndarray]:
        return {unsplit_name(n): p.detach().numpy() for n, p in self.model.named_parameters()}

    def rows(self) -> list[dict[str, Any]]:
        rows = self.fabric.ledger.rows()
        self.fabric.ledger.clear()
        return rows


class TensorParallel:
    """A tensor-parallel group of ``nodes`` (one rank per node, all in one region), as a context manager in
    the driver: it reserves a CPU slot on each node, starts the ranks, joins them in a group unique to this
    run, and on exit ends the actors and removes the group's rendezvous keys.

        with TensorParallel(topology, ["campus-gw", "campus-jetson"]) as tp:
            tp.train_step(batch)              # batch (N, T + 1) int64, the same on every rank
    """

    def __init__(
        self,
        topology: Any,
        nodes: list[str],
        *,
        preset: str = "tiny",
        seed: int = 0,
        lr: float = 3e-3,
        optimizer: str = "adamw",
        torch_threads: int = 1,
        timeout_s: float = 120.0,
        time_scale: float = 0.0,
    ) -> None:
        """``time_scale``: link emulation, as the pipeline's (0 = account only, 1 = every all-reduce takes
        at least its modelled time in real time)."""
        from edgeray.fabric.groups import RunGroups
        from edgeray.model.presets import PRESETS
        from edgeray.placement import reserve

        unknown = [n for n in nodes if n not in topology.nodes]
        if unknown:
            raise TPError(f"tensor-parallel nodes {unknown} are not in topology {topology.name!r}")
        if len(set(nodes)) != len(nodes):
            raise TPError(f"tensor-parallel nodes {nodes}: one rank per node, a node is repeated")
        regions = {n: topology.nodes[n].region for n in nodes}
        if len(set(regions.values())) > 1:
            raise TPError(
                f"tensor-parallel nodes {regions} span regions: a TP group all-reduces twice per block and "
                "step, which only a region's links carry; use pipeline or data parallelism across regions"
            )
        if optimizer not in ("adamw", "sgd"):
            raise TPError(f"optimizer {optimizer!r}: valid optimizers are 'adamw' and 'sgd'")
        if preset not in PRESETS:
            raise TPError(f"preset {preset!r}: valid presets are {sorted(PRESETS)}")
        self._config = PRESETS[preset].config()
        check_degree(self._config, len(nodes))
        self.nodes, self.degree = list(nodes), len(nodes)
        self.groups = RunGroups("tp")
        self.reservation = reserve(
            [(n, torch_threads) for n in nodes], what=f"tensor-parallel {self.groups.prefix}"
        )
        try:
            self.ranks = [
                self.reservation.pin(TPWorker, i).remote(
                    str(topology.path), n, preset=preset, seed=seed, lr=lr, optimizer=optimizer, torch_threads=torch_threads,
                    timeout_s=timeout_s, time_scale=time_scale,
                )
                for i, n in enumerate(nodes)
            ]  # fmt: skip
            group = self.groups.name("tp")
            self._get([r.join.remote(group, self.degree, i) for i, r in enumerate(self.ranks)])
        except BaseException:
            self.close()
            raise

    def _get(self, refs: list[Any]) -> list[Any]:
        return ray.get(refs, timeout=WAIT_S)

    def gradients(self, batch: np.ndarray) -> dict[str, Any]:
        """Loss, logits (rank 0's; every rank's are checked equal) and the whole model's gradients gathered
        from the ranks, by parameter name."""
        outs = self._get([r.gradients.remote(batch) for r in self.ranks])
        for i, o in enumerate(outs[1:], 1):
            if not np.array_equal(o["logits"], outs[0]["logits"]):
                raise TPError(f"rank {i}'s logits differ from rank 0's: the group's all-reduce is not exact")
        config = self._config
        grads = gather_state(
            [{k: torch.from_numpy(np.array(v)) for k, v in o["grads"].items()} for o in outs],
            config,
            self.degree,
        )
        return {"loss": outs[0]["loss"], "logits": outs[0]["logits"], "grads": grads}

    def train_step(self, batch: np.ndarray) -> dict[str, Any]:
        """One step on every rank: the loss, the group's modelled clock, and per rank its wall time and
        the part of it spent in all-reduces (waiting for the peer included)."""
        outs = self._get([r.train_step.remote(batch) for r in self.ranks])
        return {
            "loss": outs[0]["loss"],
            "clock": max(o["clock"] for o in outs),
            "rank_wall_s": [o["wall_s"] for o in outs],
            "rank_allreduce_wall_s": [o["allreduce_wall_s"] for o in outs],
        }

    def state(self) -> dict[str, torch.Tensor]:
        parts = self._get([r.state.remote() for r in self.ranks])
        return gather_state(
            [{k: torch.from_numpy(np.array(v)) for k, v in p.items()} for p in parts],
            self._config,
            self.degree,
        )

    def rows(self) -> list[dict[str, Any]]:
        return [row for rows in self._get([r.rows.remote() for r in self.ranks]) for row in rows]

    def close(self) -> None:
        for r in getattr(self, "ranks", []):
            with contextlib.suppress(Exception):
                ray.kill(r, no_restart=True)
        if hasattr(self, "reservation"):
            self.reservation.close()
        self.groups.close()

    def __enter__(self) -> TensorParallel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
