"""The interface every data-parallel strategy implements (see README.md in this package).

A strategy has two halves, both in its one class:

- the driver half, :meth:`Strategy.run`, drives a :class:`~edgeray.train.sync.Run`: it decides which
  workers compute, what moves between them and when, and advances the modelled clock. The run provides
  the shared machinery (workers, groups, churn, the failure policy, metrics, evaluation, the token
  budget); it knows no strategy by name.
- the worker half runs inside each :class:`~edgeray.train.sync.SyncWorker` actor: :meth:`setup_worker`
  for per-worker state, and ``op_<name>(worker, ...)`` methods the driver invokes with
  ``run.op(node, "<name>", ...)``; each returns the fabric ledger rows of the transfers it made.

Hyperparameters are a frozen dataclass subclassing :class:`Params`, declared as ``Strategy.params_type``;
``SyncConfig(strategy=..., params={...})`` validates a mapping against it and refuses unknown names.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from edgeray.errors import EdgerayError

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker


class SyncError(EdgerayError):
    """A data-parallel run that cannot go on (bad configuration, every worker gone, a collective that keeps
    failing)."""


class StrategyError(SyncError):
    """A strategy name or hyperparameter that cannot be honoured."""


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of every strategy's hyperparameters (a frozen dataclass: picklable, hashable, printable)."""

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when valid)."""
        return []

    @classmethod
    def build(cls, value: Params | Mapping[str, Any] | None, strategy: str) -> Params:
        """``value`` as this class: None gives the defaults; a mapping is checked for unknown names."""
        if value is None:
            params = cls()
        elif isinstance(value, cls):
            params = value
        elif isinstance(value, Mapping):
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise StrategyError(
                    f"{strategy}: unknown hyperparameters {unknown}; {strategy} takes {known or 'none'}"
                )
            params = cls(**value)
        else:
            raise StrategyError(
                f"{strategy}: params must be a mapping or {cls.__qualname__}, got {type(value).__name__}"
            )
        problems = params.problems()
        if problems:
            raise StrategyError(f"{strategy}: " + "; ".join(problems))
        return params


class Strategy:
    """One way to keep data-parallel workers in step. Subclass, set ``name`` (and ``params_type``), implement
    :meth:`run`, and register the class with :func:`edgeray.train.strategies.register`."""

    name: ClassVar[str] = ""
    params_type: ClassVar[type[Params]] = Params
    uses_server: ClassVar[bool] = False
    """Whether the run starts a server actor (on the node nearest to all workers, or the one given)."""
    joins_from: ClassVar[str] = "peer"
    """Where a joining worker gets its state: "peer" (nearest live worker) or "server"."""
    copies_optimizer_state: ClassVar[bool] = False
    """Whether a joining worker copies its donor's optimizer moments (strategies whose workers share one
    model trajectory); otherwise it copies the parameters only."""

    driver_state: ClassVar[tuple[str, ...]] = ()
    """Attributes of the driver half a checkpoint holds. A strategy that keeps its loop state in them (and
    skips its set-up when ``run.resumed``) can be resumed exactly; with none, its runs are not checkpointed
    and ``resume`` is refused by name."""

    def __init__(self, params: Params) -> None:
        self.params = params

    @classmethod
    def resumable(cls) -> bool:
        return bool(cls.driver_state)

    def state_dict(self) -> dict[str, Any]:
        """The driver state a checkpoint holds (pickled with the run's)."""
        return {k: getattr(self, k) for k in self.driver_state}

    def load_state_dict(self, state: dict[str, Any], run: Run) -> None:
        for k in self.driver_state:
            value = state[k]
            if isinstance(value, Events):
                value.run = run
            setattr(self, k, value)

    # ------------------------------------------------------------------ driver half
    def run(self, run: Run) -> None:
        """Train until ``run.tokens`` reaches ``run.budget`` (or no worker is left)."""
        raise NotImplementedError

    def summary(self, run: Run) -> dict[str, Any]:
        """Strategy-specific figures added to the run's summary.json."""
        return {}

    # ------------------------------------------------------------------ the model
    def prepare_model(self, model: Any, seed: int) -> tuple[Any, list[torch.nn.Parameter]]:
        """The model every worker trains and the driver evaluates, built from the run's (``seed``: for any
        random initialisation, the same in every process), and the parameters the strategy moves (flat, in
        order). Default: the model as it is, all its parameters."""
        return model, list(model.parameters())

    def export_model(self, model: Any) -> Any:
        """What the run's checkpoint/ saves of a model :meth:`prepare_model` made (a plain Hugging Face
        model). Default: the model itself."""
        return model

    # ------------------------------------------------------------------ worker half
    def setup_worker(self, worker: SyncWorker) -> None:
        """Create per-worker strategy state (in ``worker.extra``); called on every (re)start of a run."""

    def extra_state(self, worker: SyncWorker) -> list[torch.Tensor]:
        """Strategy state a joining worker copies from its donor (flat float tensors, fixed layout)."""
        return []

    def load_extra_state(self, worker: SyncWorker, parts: list[torch.Tensor]) -> None:
        """Install what :meth:`extra_state` sent (same layout)."""

    def worker_state(self, worker: SyncWorker) -> dict[str, Any]:
        """Per-worker strategy state a checkpoint holds (default: what a joining worker copies)."""
        return {"extra": self.extra_state(worker)}

    def load_worker_state(self, worker: SyncWorker, state: dict[str, Any]) -> None:
        self.load_extra_state(worker, state["extra"])


# ------------------------------------------------------------------------------------------- helpers
def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors as one float vector (a copy)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def unflat_(vec: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    """Copy ``vec`` back into the tensors, in order."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(vec[offset : offset + n].view_as(t))
        offset += n


def region_step(
    run: Run, members: list[Node], regions: dict[str, list[Node]]
) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """One local step of every member with its gradient averaged inside its region (DiLoCo's inner step):
    each member's compute() result and ledger rows. Raises what :meth:`Run.call` raises."""
    results = run.call([n.actor.compute.remote() for n in members], "compute")
    region_of = run.topology.nodes
    parts = run.call(
        [
            n.actor.allreduce_step.remote("region", 1.0 / len(regions[region_of[n.name].region]))
            for n in members
        ],
        "inner all-reduce",
    )
    return results, parts


class Events:
    """Modelled-time event queue of the asynchronous strategies. Each event carries the incarnation of its
    node, so events of a node that left and came back are recognisably stale."""

    def __init__(self, run: Run, kind: str = "start") -> None:
        self.run = run
        self.heap: list[tuple[float, int, str, str, int]] = []
        self.seq = 0
        for n in run.live():
            self.push(0.0, kind, n.name)

    def push(self, t: float, kind: str, node: str) -> None:
        heapq.heappush(self.heap, (t, self.seq, kind, node, self.run.nodes[node].inc))
        self.seq += 1

    def pop(self) -> tuple[float, str, str, int]:
        t, _, kind, node, inc = heapq.heappop(self.heap)
        return t, kind, node, inc

    def pop_live(self, on_join: Callable[[Node, float], None]) -> tuple[float, str, Node] | None:
        """The next event after applying the churn due by its time (``on_join`` hands a joining worker its
        state); None when its node has left since it was queued. Advances the run's clock to it."""
        t, kind, name, inc = self.pop()
        self.run.apply_churn(t, on_join, regroup_on_leave=False)
        n = self.run.nodes[name]
        if not n.alive or n.inc != inc:
            return None
        self.run.now = max(self.run.now, t)
        return t, kind, n

    def __bool__(self) -> bool:
        return bool(self.heap)

    def __getstate__(self) -> dict[str, Any]:
        return {"heap": self.heap, "seq": self.seq}  # the run is re-attached on resume
