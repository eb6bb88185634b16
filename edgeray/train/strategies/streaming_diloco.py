"""Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping communication"), written only
against the strategy interface.

DiLoCo synchronises the whole model every ``h`` inner steps; Streaming DiLoCo cuts the model into
``fragments`` and synchronises one fragment at a time on a staggered schedule (fragment p every ``h`` inner
steps, offset by p x h / fragments), so each outer all-reduce moves 1 / fragments of the model and the
inter-region peak bandwidth drops by that factor. The outer all-reduce of a fragment overlaps the next
``overlap`` inner steps: the workers keep training while it is in flight, and when it lands the fragment is
merged, ``mix`` x local + (1 - mix) x global. Pseudo-gradients cross regions quantized (``codec``, 4-bit
blockwise by default).

Inside a region, inner steps all-reduce gradients as DiLoCo does (regions are the DiLoCo "workers"). Every
region runs every inner step; the modelled clock of a region waits for a fragment's all-reduce only where
the all-reduce (which needs every region to have reached its step) ends later than ``overlap`` inner steps
after it began.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
import torch

from edgeray.fabric.backend import FabricError
from edgeray.fabric.collectives import hierarchical_allreduce
from edgeray.train.strategies.base import Params, Strategy, flat, region_step
from edgeray.train.strategies.diloco import outer_problems

if TYPE_CHECKING:
    from edgeray.train.sync import Node, Run, SyncWorker


@dataclass(frozen=True)
class StreamingParams(Params):
    h: int = 30
    """Inner steps between two synchronisations of the same fragment."""
    fragments: int = 4
    """Parts of the model synchronised in turn (contiguous parameter tensors of about equal size)."""
    overlap: int = 1
    """Inner steps an outer all-reduce overlaps before its fragment is merged (0: merge at once)."""
    mix: float = 0.5
    """Merge: local fragment <- mix x local + (1 - mix) x the new global fragment."""
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    """Nesterov momentum of the outer SGD (0 = plain SGD)."""
    codec: str = "int4"
    """Codec on the inter-region hops of the outer all-reduce (see edgeray.fabric.codecs)."""

    def problems(self) -> list[str]:
        out = outer_problems(self.h, self.outer_lr, self.outer_momentum, self.codec)
        if not 1 <= self.fragments <= self.h:
            out.append(f"fragments = {self.fragments}: must be in [1, h = {self.h}]")
        if not 0 <= self.overlap < self.h:
            out.append(
                f"overlap = {self.overlap}: must be in [0, h = {self.h}) so a fragment's merge lands before "
                "its next all-reduce starts"
            )
        if not 0 <= self.mix < 1:
            out.append(f"mix = {self.mix}: must be in [0, 1)")
        return out


def fragment_slices(sizes: list[int], fragments: int) -> list[slice]:
    """Contiguous runs of parameter tensors (``sizes``: their numel, in order) of about equal numel, as
    slices of the flat parameter vector: each boundary falls at the tensor edge nearest to k / fragments of
    the total. At most ``fragments`` of them (fewer only when there are fewer tensors), none empty."""
    ends = list(itertools.accumulate(sizes))  # flat offset after each tensor
    total = ends[-1]
    count = min(fragments, len(sizes))
    cuts: list[int] = []  # indices into ends
    for k in range(1, count):
        lo = cuts[-1] + 1 if cuts else 0
        hi = len(sizes) - 1 - (count - 1 - k)  # leave a tensor for every later fragment
        cuts.append(min(range(lo, hi), key=lambda i: abs(ends[i] - total * k / count)))
    edges = [0, *(ends[i] for i in cuts), total]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


class StreamingDiLoCo(Strategy):
    name = "streaming-diloco"
    params_type = StreamingParams
    copies_optimizer_state = True
    driver_state = ("offsets_", "clock", "in_flight", "step")

    def _p(self) -> StreamingParams:
        assert isinstance(self.params, StreamingParams)
        return self.params

    def offsets(self, fragments: int) -> list[int]:
        """Inner step (mod h) at which each fragment is synchronised."""
        h = self._p().h
        return [(h - f * h // fragments) % h for f in range(fragments)]

    # ------------------------------------------------------------------ driver
    def run(self, run: Run) -> None:
        p = self._p()
        if not run.resumed:
            run.regroup()
            run.maybe_eval()
            fragments = int(run.call([run.live()[0].actor.op.remote("fragments")], "fragment layout")[0])
            self.offsets_ = self.offsets(fragments)
            self.clock: dict[str, float] = {}  # modelled time each region has reached
            self.in_flight: dict[int, tuple[int, float]] = {}  # fragment -> (step its merge is due, end time)
            self.step = 0
        offsets, clock, in_flight = self.offsets_, self.clock, self.in_flight

        def on_join(n: Node, at: float) -> None:
            run.fetch_from_peer(n, at)

        while run.tokens < run.budget:
            run.apply_churn(run.now, on_join, regroup_on_leave=True)
            live = run.live()
            regions: dict[str, list[Node]] = {}
            for n in live:
                regions.setdefault(run.topology.nodes[n.name].region, []).append(n)
            if len(live) * run.tokens_per_step > run.budget - run.tokens:
                break  # never past the token budget
            try:
                results, parts = region_step(run, live, regions)
            except (ray.exceptions.RayError, FabricError) as exc:
                run.lost(exc, "streaming DiLoCo inner step")
                run.regroup()
                continue
            self.step += 1
            step = self.step
            by_node = dict(zip([n.name for n in live], zip(results, parts, strict=True), strict=True))
            for r, members in regions.items():
                comm = run.account([by_node[n.name][1] for n in members])
                clock[r] = clock.get(r, run.now) + max(run.compute_s(n.name) for n in members) + comm
                for n in members:
                    n.steps += 1
                    n.tokens += by_node[n.name][0]["tokens"]
                    run.tokens += by_node[n.name][0]["tokens"]
                run.record(
                    "inner",
                    None,
                    region=r,
                    step=step,
                    loss=float(np.mean([by_node[n.name][0]["loss"] for n in members])),
                )
            # merges due now: a region cannot go past this step before its fragment's all-reduce has landed
            for f, (due, end) in sorted(in_flight.items()):
                if due <= step:
                    self._merge(run, live, f)
                    for r in clock:
                        clock[r] = max(clock[r], end)
                    del in_flight[f]
            # fragments whose turn it is: all-reduce the pseudo-gradient, merge `overlap` steps later
            for f, offset in enumerate(offsets):
                if step % p.h != offset:
                    continue
                begin = max(clock.values())  # every region has reached this step
                try:
                    parts = run.call(
                        [n.actor.op.remote("outer", f, 1.0 / len(live)) for n in live], "outer all-reduce"
                    )
                except (ray.exceptions.RayError, FabricError) as exc:
                    run.lost(exc, "streaming DiLoCo outer all-reduce")
                    run.regroup()
                    continue  # this fragment syncs at its next turn
                comm = run.account(parts)
                inter = sum(r["bytes"] for rows in parts for r in rows if r["link_class"] == "inter-region")
                run.record("outer", None, fragment=f, step=step, comm_s=comm, outer_inter_region_bytes=inter)
                if p.overlap == 0:
                    self._merge(run, live, f)
                    for r in clock:
                        clock[r] = max(clock[r], begin + comm)
                else:
                    in_flight[f] = (step + p.overlap, begin + comm)
            run.now = max(clock.values())
            run.maybe_eval()
        for f in sorted(in_flight):  # the run ends with every fragment merged
            self._merge(run, run.live(), f)
            run.now = max(run.now, in_flight[f][1])

    def _merge(self, run: Run, live: list[Node], fragment: int) -> None:
        run.call([n.actor.op.remote("merge", fragment) for n in live], "fragment merge")

    def summary(self, run: Run) -> dict[str, Any]:
        outer = [m for m in run.metrics if m["event"] == "outer"]
        return {
            "outer_syncs": len(outer),
            "fragments": len({m["fragment"] for m in outer}),
            "peak_outer_inter_region_bytes": max((m["outer_inter_region_bytes"] for m in outer), default=0),
        }

    # ------------------------------------------------------------------ worker side
    def setup_worker(self, worker: SyncWorker) -> None:
        """The global copy of each fragment, its outer Nesterov SGD, and the fragments' slices."""
        p = self._p()
        slices = fragment_slices([q.numel() for q in worker.params], p.fragments)
        vec = flat(worker.params)
        outers = [torch.nn.Parameter(vec[s].clone()) for s in slices]
        worker.extra["slices"] = slices
        worker.extra["outer"] = outers
        worker.extra["outer_opt"] = [
            torch.optim.SGD([o], lr=p.outer_lr, momentum=p.outer_momentum, nesterov=p.outer_momentum > 0)
            for o in outers
        ]

    def op_fragments(self, worker: SyncWorker) -> int:
        return len(worker.extra["slices"])

    def op_outer(self, worker: SyncWorker, fragment: int, weight: float) -> list[dict[str, Any]]:
        """All-reduce this fragment's weighted pseudo-gradient (global - local) over every worker and take
        the outer step on the global fragment; the local one keeps training until :meth:`op_merge`."""
        assert worker.plan is not None
        s = worker.extra["slices"][fragment]
        outer, opt = worker.extra["outer"][fragment], worker.extra["outer_opt"][fragment]
        delta = (outer.detach() - flat(worker.params)[s]) * weight
        hierarchical_allreduce(
            delta, worker.plan, worker.node, codec=self._p().codec, key=f"fragment{fragment}"
        )
        outer.grad = delta
        opt.step()
        return worker.rows()

    def op_merge(self, worker: SyncWorker, fragment: int) -> None:
        """local fragment <- mix x local + (1 - mix) x global."""
        s, mix = worker.extra["slices"][fragment], self._p().mix
        vec = flat(worker.params)
        vec[s] = mix * vec[s] + (1 - mix) * worker.extra["outer"][fragment].detach()
        offset = 0
        for q in worker.params:
            n = q.numel()
            if offset < s.stop and offset + n > s.start:
                q.data.copy_(vec[offset : offset + n].view_as(q))
            offset += n

    def extra_state(self, worker: SyncWorker) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for outer, opt in zip(worker.extra["outer"], worker.extra["outer_opt"], strict=True):
            buf = opt.state.get(outer, {}).get("momentum_buffer")
            out += [
                outer.detach().clone(),
                buf.reshape(-1).clone() if buf is not None else torch.zeros_like(outer),
            ]
        return out

    def load_extra_state(self, worker: SyncWorker, parts: list[torch.Tensor]) -> None:
        for i, (outer, opt) in enumerate(zip(worker.extra["outer"], worker.extra["outer_opt"], strict=True)):
            outer.data.copy_(parts[2 * i])
            if self._p().outer_momentum > 0 and bool(parts[2 * i + 1].abs().sum() > 0):
                opt.state[outer] = {"momentum_buffer": parts[2 * i + 1].clone()}
