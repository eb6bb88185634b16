"""Routing maths: Mixtral top-k gating with a locality penalty and capacity, the load-balancing loss, one
expert's SwiGLU."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgeray.train.moe.config import MoEError


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
