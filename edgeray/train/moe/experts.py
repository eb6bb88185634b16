"""The expert actor: expert ``index`` of every layer, serving the trunk's requests over the fabric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import torch
from torch import nn
from transformers import MixtralForCausalLM

from edgeray.fabric.backend import EdgeGroup, Fabric, install
from edgeray.fabric.groups import Membership
from edgeray.fabric.groups import join as join_groups
from edgeray.topology import load_topology
from edgeray.train.moe.config import MoEConfig, build_moe_model
from edgeray.train.moe.routing import expert_mlp
from edgeray.train.moe.wire import END, FORWARD, STEP, SYNC, Op, _busy, _group_name, _rows


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
        """Answer the trunk until it sends END: forward (keeping the graph when training), backward, step.
        Its work and the messages advance this expert's modelled clock (``clock_s``; see Fabric.clock)."""
        with self.fabric.working():
            tokens = self._serve()
        return {
            "tokens": tokens,
            "rows": _rows(self.fabric),
            "clock_s": self.fabric.clock,
            "busy": _busy(self.fabric),
        }

    def _serve(self) -> int:
        assert self.group is not None
        g = EdgeGroup.get(self.group)
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        tokens = 0
        while True:
            code, layer, n = (int(v) for v in g.recv_raw((3,), torch.int64, 0, op="header"))
            kind = Op(code)
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
        return tokens

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
