"""Client-level differential privacy for federated rounds (DP-FedAvg): clipping, Gaussian noise on the sum,
and a maintained privacy accountant.

    dp = DPConfig(clip=1.0, target_epsilon=8.0).resolve(population=1000, sample_rate=0.05, rounds=100)
    acc = Accountant()
    for each round:
        clipped, factor = clip_update(update, dp.clip)                 # on each client
        noisy_sum = total + rng.normal(0, noise_std(dp), total.shape)  # once per round (or spread: client_noise_std)
        acc.step(dp.noise_multiplier, sample_rate)
        acc.epsilon(dp.delta)                                          # (epsilon, delta) so far

A round samples each of the ``population`` clients with probability ``q`` (Poisson sampling), each clips its
update to L2 norm ``clip`` (C), and the sum gets Gaussian noise of standard deviation z C: the Poisson-
subsampled Gaussian mechanism, composed over rounds by the RDP accountant of dp-accounting
(``dp_accounting.rdp.RdpAccountant``, default orders). :meth:`Accountant.history` is the run's own
(z, q, rounds) record, from which anyone can recompute the epsilon (the tests do, from scratch).

With secure aggregation no party may see the un-noised sum, so the noise is spread over the clients
(:func:`client_noise_std`): each adds N(0, (z C)^2 / m) with m the fewest clients a round may end with (its
threshold), so the sum carries at least (z C)^2 of variance whenever the round completes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeray.errors import EdgerayError


class DPError(EdgerayError):
    """Privacy parameters that cannot be honoured."""


@dataclass(frozen=True)
class DPConfig:
    clip: float = 1.0
    """C: each client's update is scaled to L2 norm at most C."""
    noise_multiplier: float | None = None
    """z: the noise on the sum has standard deviation z C. Give it or ``target_epsilon``."""
    target_epsilon: float | None = None
    """Turned into the smallest z whose epsilon after every planned round is at most this."""
    delta: float | None = None
    """Default 1 / population (the issue's bound: delta <= 1/N)."""

    def problems(self, population: int | None = None) -> list[str]:
        out = []
        if not (self.clip > 0 and math.isfinite(self.clip)):
            out.append(f"clip = {self.clip}: must be > 0")
        if self.noise_multiplier is None and self.target_epsilon is None:
            out.append("noise_multiplier / target_epsilon: DP on needs one of them")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            out.append("noise_multiplier and target_epsilon: give one, not both")
        if self.noise_multiplier is not None and not (
            self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)
        ):
            out.append(
                f"noise_multiplier = {self.noise_multiplier}: must be > 0 (0 is no privacy: turn DP off)"
            )
        if self.target_epsilon is not None and not (
            self.target_epsilon > 0 and math.isfinite(self.target_epsilon)
        ):
            out.append(f"target_epsilon = {self.target_epsilon}: must be > 0")
        if self.delta is not None and not 0 < self.delta < 1:
            out.append(f"delta = {self.delta}: must be in (0, 1)")
        if population is not None and self.delta is not None and self.delta > 1 / population:
            out.append(f"delta = {self.delta}: must be <= 1/population = {1 / population:.3g}")
        return out

    def resolve(self, population: int, sample_rate: float, rounds: int) -> DPConfig:
        """Validated, with ``delta`` and ``noise_multiplier`` filled in for a run of ``rounds`` rounds that
        samples each of ``population`` clients with probability ``sample_rate``."""
        out = self.problems(population)
        if population < 1:
            out.append(f"population = {population}: must be >= 1")
        if not 0 < sample_rate <= 1:
            out.append(f"sample_rate = {sample_rate}: must be in (0, 1]")
        if rounds < 1:
            out.append(f"rounds = {rounds}: must be >= 1")
        if out:
            raise DPError("dp: " + "; ".join(out))
        delta = self.delta if self.delta is not None else 1 / population
        z = self.noise_multiplier
        if z is None:
            assert self.target_epsilon is not None
            z = noise_multiplier_for(self.target_epsilon, delta, sample_rate, rounds)
        return replace(self, noise_multiplier=z, delta=delta)


def _event(z: float, q: float) -> Any:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(z)
    return gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def _fresh() -> Any:
    import logging

    from dp_accounting.rdp import rdp_privacy_accountant

    # it logs a warning for every fractional order whose series does not converge, then leaves that order
    # out of the minimum (the other orders bound epsilon): a note per call, not a problem
    logging.getLogger("absl").setLevel(logging.ERROR)

    return rdp_privacy_accountant.RdpAccountant()


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest noise multiplier z (to 1e-4 relative) whose epsilon after ``rounds`` rounds is at most
    ``target_epsilon`` (dp-accounting's calibration, Brent's method on the RDP accountant)."""
    import dp_accounting
    from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

    def make(z: float) -> Any:
        return dp_accounting.SelfComposedDpEvent(_event(z, sample_rate), rounds)

    try:
        z = dp_accounting.calibrate_dp_mechanism(
            _fresh, make, target_epsilon, delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-5,
        )  # fmt: skip
    except (NoBracketIntervalFoundError, ValueError) as exc:  # no bracket reaches the target, or bad input
        raise DPError(
            f"dp: no noise multiplier reaches epsilon {target_epsilon} at delta {delta:.3g} over {rounds} rounds "
            f"sampling {sample_rate:.3g} of the clients ({exc}); raise target_epsilon or lower the rounds"
        ) from exc
    z = float(z)
    while Accountant([(z, sample_rate, rounds)]).epsilon(delta) > target_epsilon:
        z *= 1 + 1e-4  # Brent stops within its tolerance on either side: step onto the safe one
    return z


class Accountant:
    """The run's privacy spent so far: its (z, q, rounds) history, composed with dp-accounting's RDP accountant.
    RDP adds up over rounds, so each distinct (z, q) costs one RDP evaluation however many rounds used it."""

    def __init__(self, history: list[tuple[float, float, int]] | None = None) -> None:
        self._history: list[tuple[float, float, int]] = []
        for z, q, n in history or []:
            self.step(z, q, n)

    def step(self, noise_multiplier: float, sample_rate: float, rounds: int = 1) -> None:
        if not noise_multiplier > 0:
            raise DPError(f"dp: noise_multiplier = {noise_multiplier}: must be > 0")
        if not 0 < sample_rate <= 1 or rounds < 1:
            raise DPError(
                f"dp: sample_rate = {sample_rate} (must be in (0, 1]), rounds = {rounds} (must be >= 1)"
            )
        if self._history and self._history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self._history[-1]
            self._history[-1] = (z, q, n + rounds)
        else:
            self._history.append((noise_multiplier, sample_rate, rounds))

    def epsilon(self, delta: float) -> float:
        if not self._history:
            return 0.0
        import dp_accounting

        acc = _fresh()
        for z, q, n in self._history:
            acc.compose(dp_accounting.SelfComposedDpEvent(_event(z, q), n))
        return float(acc.get_epsilon(delta))

    def history(self) -> list[tuple[float, float, int]]:
        return list(self._history)


def clip_update(update: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """``update`` scaled to L2 norm at most ``clip``: (clipped, the factor applied, <= 1)."""
    norm = float(np.linalg.norm(update))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return update * factor, factor


def noise_std(config: DPConfig) -> float:
    """Standard deviation of the Gaussian noise on the sum: z C."""
    if config.noise_multiplier is None:
        raise DPError("dp: resolve the config first (noise_multiplier is not set)")
    return config.noise_multiplier * config.clip


def client_noise_std(config: DPConfig, min_clients: int) -> float:
    """Each client's share of the noise when it is spread over the clients (secure aggregation): the sum of
    ``min_clients`` or more such draws has standard deviation at least z C."""
    if min_clients < 1:
        raise DPError(f"dp: min_clients = {min_clients}: must be >= 1")
    return noise_std(config) / math.sqrt(min_clients)
