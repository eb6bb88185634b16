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

Modules: ``config`` (MoEConfig, errors, the model), ``placement`` (the expert plan), ``routing`` (gating
maths), ``block`` (the MoE block), ``wire`` (the trunk <-> expert protocol), ``experts`` and ``trunk`` (the
actors), ``fleet`` (the driver's fleet), ``loop`` (train_moe).
"""

from __future__ import annotations

from edgeray.train.moe.block import EdgeMoeBlock, LocalExperts, MoERouting, moe_loss
from edgeray.train.moe.config import (
    GROUP,
    OVERFLOW,
    WAIT_S,
    ExpertsLost,
    MoEConfig,
    MoEError,
    build_moe_model,
)
from edgeray.train.moe.experts import ExpertWorker
from edgeray.train.moe.fleet import MoEFleet
from edgeray.train.moe.loop import train_moe
from edgeray.train.moe.placement import ExpertPlan, plan_experts
from edgeray.train.moe.routing import Routing, expert_mlp, load_balancing_loss, route
from edgeray.train.moe.trunk import TrunkWorker
from edgeray.train.moe.wire import BACKWARD, END, FORWARD, STEP, SYNC, FabricExperts, Op

__all__ = [
    "BACKWARD",
    "END",
    "FORWARD",
    "GROUP",
    "OVERFLOW",
    "STEP",
    "SYNC",
    "WAIT_S",
    "EdgeMoeBlock",
    "ExpertPlan",
    "ExpertWorker",
    "ExpertsLost",
    "FabricExperts",
    "LocalExperts",
    "MoEConfig",
    "MoEError",
    "MoEFleet",
    "MoERouting",
    "Op",
    "Routing",
    "TrunkWorker",
    "build_moe_model",
    "expert_mlp",
    "load_balancing_loss",
    "moe_loss",
    "plan_experts",
    "route",
    "train_moe",
]
