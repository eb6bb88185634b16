"""Autoscaling driven by p95 latency: each region's replicas report their recent p95 time to first token.

Used as ``autoscaling_config.policy.policy_function = "edgeray.serve.autoscale:p95_latency_policy"``.
Each replica's ``record_autoscaling_stats`` returns ``p95_ttft_ms`` (over its last requests) and its
``target_p95_ms``. The policy scales the deployment by the worst replica's p95 / target: above target ->
more replicas (proportionally, at least one more), well below (under half) -> one fewer; Serve's wrapper
then applies min/max replicas and the up/down-scale delays. With no latency reported yet it keeps the
current size: requests reach replicas over HTTP, not through Serve handles, so Serve's ongoing-request
counts say nothing here.
"""

from __future__ import annotations

import math
from typing import Any


def desired_replicas(current: int, p95_ms: list[float], target_ms: float) -> int:
    """Replicas needed so that the worst replica's p95 meets ``target_ms`` (pure, for tests)."""
    if not p95_ms or target_ms <= 0:
        return current
    worst = max(p95_ms)
    if worst > target_ms:
        return max(current + 1, math.ceil(current * worst / target_ms))
    if worst < target_ms / 2 and current > 1:
        return current - 1
    return current


def p95_latency_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    metrics = ctx.aggregated_metrics or {}
    p95 = [float(v) for v in (metrics.get("p95_ttft_ms") or {}).values() if v and v > 0]
    targets = [float(v) for v in (metrics.get("target_p95_ms") or {}).values() if v and v > 0]
    current = max(int(ctx.current_num_replicas), 1)
    if p95 and targets:
        return desired_replicas(current, p95, min(targets)), {"p95_ttft_ms": max(p95)}
    # No latency measured yet (traffic reaches replicas over HTTP, so Serve's own request counts stay at 0):
    # keep the current size.
    return current, {}
