"""Data-parallel strategies: one class per strategy, one interface (base.Strategy), one registry.

    from edgeray.train.strategies import get, names
    get("diloco").params_type      # its typed hyperparameters

The runner (edgeray.train.sync.run_sync) looks a strategy up here by the name in SyncConfig and knows
nothing else about it. README.md in this package shows how to add one.
"""

from __future__ import annotations

from edgeray.train.strategies.base import Params, Strategy, StrategyError, SyncError
from edgeray.train.strategies.diloco import DiLoCo
from edgeray.train.strategies.easgd import EASGD
from edgeray.train.strategies.federated import Federated
from edgeray.train.strategies.gossip import Gossip
from edgeray.train.strategies.server import ParameterServer, StaleSynchronous
from edgeray.train.strategies.streaming_diloco import StreamingDiLoCo
from edgeray.train.strategies.synchronous import Hierarchical, Synchronous

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Make ``cls`` available by its ``name`` (usable as a class decorator)."""
    if not cls.name:
        raise StrategyError(f"{cls.__qualname__} has no name")
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise StrategyError(
            f"strategy {cls.name!r} is already registered by {_REGISTRY[cls.name].__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered strategy (a test's, a notebook's experiment)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> type[Strategy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StrategyError(f"strategy = {name!r}: valid strategies are {names()}") from None


def names() -> list[str]:
    return list(_REGISTRY)


for _cls in (
    Synchronous,
    Hierarchical,
    ParameterServer,
    StaleSynchronous,
    EASGD,
    Gossip,
    DiLoCo,
    StreamingDiLoCo,
    Federated,
):
    register(_cls)

__all__ = ["Params", "Strategy", "StrategyError", "SyncError", "get", "names", "register", "unregister"]
