"""Collective groups of one run: names no other run can share, and no keys left behind.

    with RunGroups("pipe") as groups:                  # in the driver
        name = groups.name("pipe/r0")                  # "pipe/3f9c.../pipe/r0"
        ... actors call join([Membership(name, world, rank)]) ...
    # here every rendezvous key of the run is gone from the cluster's KV, however the run ended

A group's rank 0 publishes its rendezvous address in Ray's internal KV under the group's name (see
:mod:`edgeray.fabric.backend`). With fixed names, a run killed before its groups were destroyed left its
address behind and the next run on the cluster could read the dead one (a rendezvous timeout), and two
runs at once would have been wired into one group. A run prefix with a random part keeps every run's
groups apart; closing the :class:`RunGroups` deletes every key under it.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from types import TracebackType

from edgeray.fabric.backend import _KV_PREFIX, BACKEND


@dataclass(frozen=True)
class Membership:
    """One group an actor joins: its name, size and the actor's rank in it."""

    group: str
    world_size: int
    rank: int


class RunGroups:
    """The group namespace of one run (``kind``: "sync", "moe", "pipe", ...); use it as a context manager
    in the driver, or call :meth:`close` when the run ends."""

    def __init__(self, kind: str) -> None:
        self.prefix = f"{kind}/{uuid.uuid4().hex[:12]}/"
        self._generation = 0

    def name(self, group: str) -> str:
        return f"{self.prefix}{group}"

    def generation(self) -> str:
        """A fresh sub-prefix for re-formed groups (after churn, a re-plan): ``<prefix>g<n>/``."""
        self._generation += 1
        return f"{self.prefix}g{self._generation}/"

    def close(self) -> int:
        """Delete every rendezvous key of this run from the cluster's KV; returns how many there were."""
        import ray
        import ray.experimental.internal_kv as kv

        if not ray.is_initialized():
            return 0
        with contextlib.suppress(Exception):  # a cluster already gone has no keys to leave behind
            return int(kv._internal_kv_del(_KV_PREFIX + self.prefix, del_by_prefix=True))
        return 0

    def __enter__(self) -> RunGroups:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def join(memberships: list[Membership]) -> list[str]:
    """Join these groups (inside an actor; every member of a group calls at once); returns their names."""
    import ray.util.collective as col

    names = []
    for m in memberships:
        col.init_collective_group(m.world_size, m.rank, backend=BACKEND, group_name=m.group)  # type: ignore[arg-type]
        names.append(m.group)
    return names


def leave(names: list[str]) -> None:
    """Leave these groups (inside an actor); a group already gone is skipped."""
    import ray.util.collective as col

    for name in names:
        if col.is_group_initialized(name):
            col.destroy_collective_group(name)


def live_keys(prefix: str = "") -> list[str]:
    """Rendezvous keys in the cluster's KV under a run prefix (all runs: ``""``), for checks and tests."""
    import ray.experimental.internal_kv as kv

    return [k.decode().removeprefix(_KV_PREFIX) for k in kv._internal_kv_list(_KV_PREFIX + prefix)]
