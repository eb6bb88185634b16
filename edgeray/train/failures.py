"""One failure policy for every training runtime (sync strategies, MoE, pipeline).

Only death is churn: an actor that died (ActorDiedError / ActorUnavailableError, its node lost), or one that
stopped answering for longer than the run's bound, is a node that left, and the run goes on without it
(or restarts from a checkpoint, where a strategy needs every member). A peer that died inside a collective
surfaces in the survivors as a FabricError within the fabric timeout; that is a reason to look for the dead,
not a death itself: when nobody is found dead, the FabricError is a bug and fails the run.

An exception raised by a live actor is a bug in the code or the data, never churn: the run stops at once
with :class:`WorkerFailed`, whose message holds that actor's traceback, and the run directory keeps what was
written so far.

    try:
        results = ray.get(refs, timeout=WAIT_S)
    except ray.exceptions.RayError as exc:
        if kind(exc) == "bug":
            raise WorkerFailed.from_ray(exc, "compute") from exc
        ...look for the dead (dead_actors), re-form, retry...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import ray

from edgeray.errors import EdgerayError
from edgeray.fabric.backend import FabricError

Kind = Literal["death", "suspect", "bug"]


class WorkerFailed(EdgerayError):
    """An actor that is alive raised an exception: the run stops, naming the call and showing the
    actor's traceback."""

    @classmethod
    def from_ray(cls, exc: BaseException, what: str) -> WorkerFailed:
        return cls(f"{what}: a live actor raised an exception; this is a bug, not churn:\n{exc}")


def kind(exc: BaseException) -> Kind:
    """``death``: the actor is gone. ``suspect``: a peer may have died (a FabricError from a collective, a
    bounded wait that ran out); check who is alive. ``bug``: anything else a live actor raised."""
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.NodeDiedError):
        return "death"
    if isinstance(exc, FabricError | ray.exceptions.GetTimeoutError):
        return "suspect"
    if isinstance(exc, ray.exceptions.RayTaskError):
        return "bug"
    if isinstance(exc, ray.exceptions.RayError):  # object lost with its owner, worker crashed, ...
        return "death"
    return "bug"


def dead_actors(actors: Sequence[Any], timeout_s: float) -> list[int]:
    """Indices of ``actors`` that are dead, or did not answer ``ping`` within ``timeout_s`` (pinged all at
    once). An actor whose ping raised is alive but broken: :class:`WorkerFailed`."""
    refs = [a.ping.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    dead = []
    for i, ref in enumerate(refs):
        if ref not in done:
            dead.append(i)  # unresponsive past the bound: it is treated as gone (and killed by the caller)
            continue
        try:
            ray.get(ref, timeout=1)
        except ray.exceptions.RayError as exc:
            if kind(exc) == "bug":
                raise WorkerFailed.from_ray(exc, "ping") from exc
            dead.append(i)
    return dead
