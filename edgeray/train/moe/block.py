"""The MoE block that replaces Mixtral's sparse feed-forward: routes tokens and hands them to a dispatcher
(the experts in this process, or on the fabric)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralForCausalLM

from edgeray.train.moe.config import MoEConfig
from edgeray.train.moe.placement import ExpertPlan
from edgeray.train.moe.routing import Routing, expert_mlp, load_balancing_loss, route


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
