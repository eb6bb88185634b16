"""The test oracle of the vectorised engine: one SimPy process per node replaying the same sampled costs.

    result = simulate(topo, config, trace=True)
    clocks = replay(result)        # every node's clock after every round, by discrete-event simulation

Each node runs the round as the fabric's code does, message by message (edgeray.fabric.backend): it computes,
sends to its region's leader and waits for its bytes to land; a leader waits for every member's message,
then runs the ring (each step: send to the next leader, wait for its own send and the previous leader's
message) and sends the result to each member. A receiver posts each receive (a leader every member's at
once); its ready notice reaches the sender the link's one-way latency later. A message is an event that
fires its sampled transfer time after both the sender has sent it and the notice has arrived (gloo's
rendezvous); the sender itself is done its transfer time after it sent. SimPy is slow (a process per node:
fine at thousands of nodes, not for the benchmarks' sizes); its only job is to agree with
:func:`edgeray.sim.engine.run_round` to the last bit.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from edgeray.sim.engine import SimResult


def replay(result: SimResult) -> list[np.ndarray]:
    """Every node's clock after each round of ``result`` (simulated with ``trace=True``); NaN where a node
    sat the round out."""
    import simpy

    trace = result.trace
    if trace is None:
        raise ValueError("replay needs simulate(..., trace=True)")
    env = simpy.Environment()
    events: dict[tuple[Any, ...], Any] = {}
    finished: dict[tuple[int, int], float] = {}

    def event(key: tuple[Any, ...]) -> Any:
        if key not in events:
            events[key] = env.event()
        return events[key]

    def deliver(key: tuple[Any, ...], delay: float) -> Generator[Any, Any, None]:
        yield event(("ready", *key))
        yield env.timeout(delay)
        event(key).succeed()

    def notify(key: tuple[Any, ...], latency_s: float) -> Generator[Any, Any, None]:
        yield env.timeout(latency_s)
        event(("ready", *key)).succeed()

    def post(key: tuple[Any, ...], latency_ms: float) -> Any:
        """Post the receive of message ``key``; the returned event fires when its bytes have arrived."""
        env.process(notify(key, float(latency_ms) / 1e3))
        return event(key)

    def send(key: tuple[Any, ...], delay: float) -> Any:
        """Start a transfer; the returned event fires when the sender is done (its link carried it)."""
        env.process(deliver(key, delay))
        return env.timeout(delay)

    def node(i: int) -> Generator[Any, Any, None]:
        for r, (plan, costs) in enumerate(trace):
            if i not in set(plan.live.tolist()):
                continue
            if r and (r - 1, i) not in finished:  # back from churn: it joins at the round's start
                yield event(("start", r))
            yield env.timeout(costs.compute_s[i])
            red, bc, leaders = plan.reduce, plan.broadcast, plan.leaders.tolist()
            if i in leaders:
                members = np.flatnonzero(red.dst == i)
                yield simpy.AllOf(env, [post((r, "reduce", int(m)), red.latency_ms[m]) for m in members])
                rank, count = leaders.index(i), len(leaders)
                for s, (step, t) in enumerate(zip(plan.ring, costs.seconds[1:-1], strict=True)):
                    prev = (rank - 1) % count
                    theirs = post((r, "ring", s, prev), step.latency_ms[prev])
                    mine = send((r, "ring", s, rank), float(t[rank]))
                    yield simpy.AllOf(env, [mine, theirs])
                outs = np.flatnonzero(bc.src == i)
                yield simpy.AllOf(
                    env, [send((r, "bcast", int(m)), float(costs.seconds[-1][m])) for m in outs]
                )
            else:
                m = int(np.flatnonzero(red.src == i)[0])
                yield send((r, "reduce", m), float(costs.seconds[0][m]))
                b = int(np.flatnonzero(bc.dst == i)[0])
                yield post((r, "bcast", b), bc.latency_ms[b])
            finished[(r, i)] = env.now
            event(("done", r, i)).succeed()

    def starts() -> Generator[Any, Any, None]:
        """Round r starts when the last node of round r - 1 is done (the engine's ``start``)."""
        for r in range(1, len(trace)):
            yield simpy.AllOf(env, [event(("done", r - 1, j)) for j in trace[r - 1][0].live.tolist()])
            event(("start", r)).succeed()

    for i in range(result.nodes):
        env.process(node(i))
    env.process(starts())
    env.run()
    ends = []
    for r, (plan, _) in enumerate(trace):
        clocks = np.full(result.nodes, np.nan)
        for j in plan.live.tolist():
            clocks[j] = finished[(r, j)]
        ends.append(clocks)
    return ends
