"""Structured pruning of a Llama for small-memory nodes: whole MLP channels and whole attention heads go, so
the result is a smaller dense Llama every engine serves (torch, vLLM, the ONNX export).

    pruned, report = prune_llama(model, mlp_keep=0.5, heads_keep=0.5, scores="activation", calibration=ids)

- MLP channel ``j`` of a layer (row ``j`` of ``gate_proj`` and ``up_proj``, column ``j`` of ``down_proj``)
  scores ``|gate_j| * |up_j| * |down_j|`` (``magnitude``: weight norms) or ``E|act(gate_j x) * up_j x| *
  |down_j|`` (``activation``: its mean output magnitude on calibration tokens, times how far it reaches).
- Query head ``h`` scores ``|q_h| * |o_h|`` (its rows of ``q_proj``, its columns of ``o_proj``) or, with
  activations, the mean norm of its attention output times ``|o_h|``. Heads are kept per key/value group (the
  same number in every group), so grouped-query attention keeps its layout and the key/value projections
  are untouched.
- Every layer keeps the same counts (a Llama config has one ``intermediate_size`` and one head count):
  ``round(keep x size)``, the best-scoring ones in each layer.

The pruned model equals the original with the removed channels' and heads' contributions zeroed (the
tests check exactly that); a short fine-tune (``jobs/train_sync.py --init-from``) recovers the loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SCORES = ("magnitude", "activation")


@dataclass(frozen=True)
class PruneReport:
    intermediate: tuple[int, int]
    """(before, after) MLP channels per layer."""
    heads: tuple[int, int]
    """(before, after) query heads per layer."""
    params: tuple[int, int]
    kept_channels: list[list[int]]
    kept_heads: list[list[int]]


def _head_slices(head: int, head_dim: int) -> slice:
    return slice(head * head_dim, (head + 1) * head_dim)


@torch.no_grad()
def _activation_stats(model: Any, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: mean |MLP channel output| (I,) and mean norm of each query head's attention output (H,)."""
    cfg = model.config
    heads, head_dim = (
        cfg.num_attention_heads,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    )
    mlp_stats: list[torch.Tensor] = []
    head_stats: list[torch.Tensor] = []
    hooks = []
    for layer in model.model.layers:

        def mlp_hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
            mlp_stats.append(args[0].abs().reshape(-1, args[0].shape[-1]).mean(0))  # input of down_proj

        def o_hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = args[0].reshape(-1, heads, head_dim)  # input of o_proj: heads side by side
            head_stats.append(x.norm(dim=-1).mean(0))

        hooks.append(layer.mlp.down_proj.register_forward_hook(mlp_hook))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(o_hook))
    try:
        model(input_ids=calibration)
    finally:
        for h in hooks:
            h.remove()
    return mlp_stats, head_stats


@torch.no_grad()
def prune_llama(
    model: Any,
    *,
    mlp_keep: float = 0.5,
    heads_keep: float = 1.0,
    scores: str = "magnitude",
    calibration: torch.Tensor | None = None,
) -> tuple[Any, PruneReport]:
    """A pruned copy of ``model`` (a transformers ``LlamaForCausalLM``; the original is not changed)."""
    if type(model).__name__ != "LlamaForCausalLM":
        raise ValueError(f"{type(model).__name__}: structured pruning supports LlamaForCausalLM")
    if scores not in SCORES:
        raise ValueError(f"scores {scores!r}: valid scores are {list(SCORES)}")
    if scores == "activation" and calibration is None:
        raise ValueError("scores='activation' needs calibration token ids (B, T)")
    for name, keep in (("mlp_keep", mlp_keep), ("heads_keep", heads_keep)):
        if not 0 < keep <= 1:
            raise ValueError(f"{name} {keep}: give a fraction in (0, 1]")
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv
    keep_group = max(1, round(group * heads_keep))
    inter = cfg.intermediate_size
    keep_inter = max(1, round(inter * mlp_keep))
    model.eval()
    acts = (
        _activation_stats(model, calibration) if calibration is not None and scores == "activation" else None
    )
    kept_channels: list[list[int]] = []
    kept_heads: list[list[int]] = []
    for i, layer in enumerate(model.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        reach = mlp.down_proj.weight.norm(dim=0)  # (I,)
        if acts is None:
            channel = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * reach
        else:
            channel = acts[0][i] * reach
        kept_channels.append(sorted(channel.topk(keep_inter).indices.tolist()))
        o_norm = torch.stack([attn.o_proj.weight[:, _head_slices(h, head_dim)].norm() for h in range(heads)])
        if acts is None:
            q_norm = torch.stack([attn.q_proj.weight[_head_slices(h, head_dim)].norm() for h in range(heads)])
            head = q_norm * o_norm
        else:
            head = acts[1][i] * o_norm
        chosen = []
        for g in range(kv):  # the same number of query heads in every key/value group
            members = torch.arange(g * group, (g + 1) * group)
            chosen += sorted(members[head[members].topk(keep_group).indices].tolist())
        kept_heads.append(chosen)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.intermediate_size = keep_inter
    new_cfg.num_attention_heads = kv * keep_group
    new_cfg.head_dim = head_dim
    pruned = type(model)(new_cfg).eval()
    sd = model.state_dict()
    new = pruned.state_dict()
    for key in new:
        if ".layers." not in key:
            new[key].copy_(sd[key])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        ch = torch.tensor(kept_channels[i])
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept_heads[i]])
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.k_proj.weight",
                     "self_attn.v_proj.weight"):  # fmt: skip
            new[p + name].copy_(sd[p + name])
        new[p + "mlp.gate_proj.weight"].copy_(sd[p + "mlp.gate_proj.weight"][ch])
        new[p + "mlp.up_proj.weight"].copy_(sd[p + "mlp.up_proj.weight"][ch])
        new[p + "mlp.down_proj.weight"].copy_(sd[p + "mlp.down_proj.weight"][:, ch])
        new[p + "self_attn.q_proj.weight"].copy_(sd[p + "self_attn.q_proj.weight"][rows])
        new[p + "self_attn.o_proj.weight"].copy_(sd[p + "self_attn.o_proj.weight"][:, rows])
        for name in ("self_attn.q_proj.bias", "self_attn.o_proj.bias", "mlp.gate_proj.bias"):
            if p + name in new:
                raise ValueError("pruning models with attention or MLP biases is not supported")
    pruned.load_state_dict(new)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    report = PruneReport((inter, keep_inter), (heads, kv * keep_group), (count(model), count(pruned)),
                         kept_channels, kept_heads)  # fmt: skip
    return pruned, report


@torch.no_grad()
def masked_reference(model: Any, report: PruneReport) -> Any:
    """The original model with every removed channel's and head's contribution zeroed (in ``down_proj`` and
    ``o_proj``): what the pruned model must compute. A copy; for tests and checks."""
    ref = copy.deepcopy(model).eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for i, layer in enumerate(ref.model.layers):
        drop = sorted(set(range(cfg.intermediate_size)) - set(report.kept_channels[i]))
        layer.mlp.down_proj.weight[:, drop] = 0
        for h in set(range(cfg.num_attention_heads)) - set(report.kept_heads[i]):
            layer.self_attn.o_proj.weight[:, _head_slices(h, head_dim)] = 0
    return ref
