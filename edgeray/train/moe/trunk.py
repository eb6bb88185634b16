"""The trunk actor: everything but the experts, on the data node; routes, dispatches, trains."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from edgeray.fabric.backend import Fabric, FabricError, install
from edgeray.fabric.groups import Membership
from edgeray.fabric.groups import join as join_groups
from edgeray.model.shards import read_shard, read_validation
from edgeray.topology import load_topology
from edgeray.train.moe.block import MoERouting, _Dispatcher, moe_loss
from edgeray.train.moe.config import MoEConfig
from edgeray.train.moe.experts import _load_or_build
from edgeray.train.moe.placement import ExpertPlan
from edgeray.train.moe.wire import END, STEP, SYNC, FabricExperts, _busy, _group_name, _rows


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

    def train_step(self, step: int, apply: bool = True, clock: float | None = None) -> dict[str, Any]:
        """Forward, backward (through the experts) and, with ``apply``, every optimizer's step. ``clock``:
        the modelled instant the step starts (see Fabric.clock; the experts follow through the messages);
        the result's ``clock_s`` is the trunk's at its end."""
        if clock is not None:
            self.fabric.clock = clock
        self.fabric.busy = 0.0  # work outside training steps (evaluation, generation) is not the step's
        with self.fabric.working():
            out = self._train_step(step, apply)
        return {**out, "clock_s": self.fabric.clock, "busy": _busy(self.fabric)}

    def _train_step(self, step: int, apply: bool) -> dict[str, Any]:
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
                    self.dispatcher.signal(SYNC, ranks, self.dispatcher.ranks[e])
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
