"""The wire protocol between the trunk and the expert actors: an int64 header, then hidden states."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from typing import Any

import torch

from edgeray.fabric.backend import EdgeGroup, Fabric, FabricError
from edgeray.train.moe.block import _Dispatcher
from edgeray.train.moe.config import GROUP


class Op(enum.IntEnum):
    """What a header tells an expert actor. The wire protocol: the trunk sends a header, int64
    ``[op, arg, count]``, then for FORWARD / BACKWARD ``count`` hidden states of layer ``arg`` (float32),
    answered by as many outputs / input gradients; STEP: an optimizer step (then the weights go to the
    standbys); SYNC: a standby takes the weights rank ``arg`` sends; END: the session is over."""

    FORWARD = 0
    BACKWARD = 1
    STEP = 2
    END = 3
    SYNC = 4


FORWARD, BACKWARD, STEP, END, SYNC = Op.FORWARD, Op.BACKWARD, Op.STEP, Op.END, Op.SYNC


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

    def exchange(self, kind: Op, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        g = EdgeGroup.get(self.group)
        header = torch.tensor([int(kind), layer, x.shape[0]], dtype=torch.int64)
        op = "dispatch" if kind == FORWARD else "grad-out"
        rank = self.ranks[expert]
        g.send_raw(header, rank, op="header")()
        g.send_raw(x.detach().float().contiguous(), rank, op=op)()
        back = "combine" if kind == FORWARD else "grad-in"
        return g.recv_raw((x.shape[0], self.hidden), torch.float32, rank, op=back)

    def signal(self, kind: Op, ranks: Iterable[int], arg: int = -1) -> None:
        """Send a control header (step, sync from rank ``arg``, end) to these ranks; a dead one is skipped."""
        g = EdgeGroup.get(self.group)
        for rank in ranks:
            with contextlib.suppress(FabricError):
                g.send_raw(torch.tensor([int(kind), arg, 0], dtype=torch.int64), rank, op="header")()


def _rows(fabric: Fabric) -> list[dict[str, Any]]:
    rows = fabric.ledger.rows()
    fabric.ledger.clear()
    return rows


def _busy(fabric: Fabric) -> dict[str, float]:
    """This node's modelled work since the last call, by node name (what edgeray.energy bills as busy)."""
    busy, fabric.busy = fabric.busy, 0.0
    return {fabric.node: busy}


def _group_name(prefix: str) -> str:
    return f"{prefix}{GROUP}"
