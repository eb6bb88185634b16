"""Inference chains across edge nodes, Petals / SWARM style: each stage of the model is served by several
replicas, every session is routed to the replicas with the best measured speed, and a replica that dies
mid-generation is replaced by another whose KV cache is rebuilt from the client's history.

    servers = [[StageServer.options(...).remote("tiny", 0, 0, 2, "campus-gw")],           # stage 0
               [StageServer.options(...).remote("tiny", 0, 2, 4, n) for n in ("metro-mec-1", "metro-mec-2")]]
    chain = InferenceChain(servers, topology, client_node="campus-gw")
    out = chain.generate([5, 17, 99], max_new_tokens=16, temperature=0.8, seed=1)
    out.tokens, out.route, out.failovers

Routing: a session picks, stage by stage, the replica whose expected time for the prompt is lowest:
the path latency from the previous hop's node (the topology) plus the prompt's tokens over the replica's
measured throughput (tokens per second of its own compute, an exponential moving average over every call;
a replica never measured goes first, so each is tried). The session keeps its replicas (their KV caches
hold it) until one dies.

Failover without Petals' known failure (a replacement server whose cache and positions are out of step
with the client): the client keeps, per stage, every input it sent that stage in this session; a
replacement replica gets that whole history in one call starting at position 0, so its cache is rebuilt to
exactly the positions the client has, and only then the current step. Each server checks that a call
starts at the position its cache has reached and refuses otherwise (:class:`ChainError`), so cache and
position can never drift apart silently. Only death is failover (edgeray.train.failures.kind): an
exception from a live server fails the generation with its traceback.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from edgeray.errors import EdgerayError
from edgeray.topology import Topology

WAIT_S = 120.0
EWMA = 0.5
"""Weight of the newest measurement in a replica's throughput estimate."""


class ChainError(EdgerayError):
    """A chain cannot serve: no live replica for a stage, or a call out of step with a server's cache."""


@ray.remote(num_cpus=0)
class StageServer:
    """Layers ``[start, stop)`` of a Llama (plus the embedding on the first stage, norm and head on the
    last) with a KV cache per session. ``delay_s``: extra seconds per call (to emulate a slower server)."""

    def __init__(
        self,
        preset: str,
        seed: int,
        start: int,
        stop: int,
        node: str,
        init_dir: str | None = None,
        delay_s: float = 0.0,
        torch_threads: int = 1,
    ) -> None:
        from edgeray.model.presets import build_model
        from edgeray.model.stages import LlamaStage

        torch.set_num_threads(torch_threads)
        if init_dir:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(init_dir, attn_implementation="eager")
        else:
            model = build_model(preset, seed=seed)
        self.stage = LlamaStage(model.eval(), start, stop)
        self.node, self.delay_s = node, delay_s
        self.sessions: dict[str, tuple[Any, int]] = {}

    def info(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "start": self.stage.start,
            "stop": self.stage.stop,
            "last": self.stage.is_last,
        }

    def ping(self) -> bool:
        return True

    @torch.no_grad()
    def forward(self, session: str, x: np.ndarray, start_pos: int) -> tuple[np.ndarray, float]:
        """Run ``x`` (token ids (1, T) on the first stage, hidden states (1, T, C) after) at positions
        ``start_pos ..`` of ``session``: returns the output (hidden states, or logits on the last stage) and
        this call's compute seconds. ``start_pos`` must be where this server's cache for the session ends
        (0 starts or restarts it)."""
        from transformers import DynamicCache

        t0 = time.perf_counter()
        cache, seen = self.sessions.get(session, (None, 0))
        if start_pos == 0:
            cache, seen = DynamicCache(), 0
        if start_pos != seen or cache is None:
            raise ChainError(
                f"session {session!r}: this server ({self.node}, layers {self.stage.start}-{self.stage.stop - 1}) "
                f"holds {seen} positions but the call starts at {start_pos}; send the history from 0"
            )
        tensor = torch.tensor(np.asarray(x))
        length = tensor.shape[1]
        mask = torch.ones(1, start_pos + length, dtype=torch.long)
        first = self.stage.is_first
        out = self.stage(
            attention_mask=mask,
            input_ids=tensor if first else None,
            hidden=None if first else tensor,
            past_key_values=cache,
        )
        self.sessions[session] = (cache, start_pos + length)
        if self.delay_s:
            time.sleep(self.delay_s)
        return out.numpy(), time.perf_counter() - t0

    def close(self, session: str) -> None:
        self.sessions.pop(session, None)


@dataclass
class _Replica:
    handle: Any
    node: str
    tokens_per_s: float | None = None  # measured (EWMA); None: never measured
    alive: bool = True


@dataclass
class Generation:
    tokens: list[int]
    logits: list[np.ndarray]
    """The last stage's logits for each generated token (what it was sampled from)."""
    route: list[list[str]]
    """The replica (node) of each stage, per generated token."""
    failovers: list[dict[str, Any]] = field(default_factory=list)
    """Each replacement: stage, dead node, new node, positions rebuilt, the generated token it happened at."""


class InferenceChain:
    """Client side of a chain: routing, the session's history per stage, failover with cache rebuild."""

    def __init__(
        self, servers: list[list[Any]], topology: Topology, *, client_node: str, timeout_s: float = WAIT_S
    ) -> None:
        if not servers or any(not s for s in servers):
            raise ChainError(f"every stage needs at least one replica, got {[len(s) for s in servers]}")
        infos = [ray.get([h.info.remote() for h in stage], timeout=timeout_s) for stage in servers]
        for k, stage in enumerate(infos):
            served = {(i["start"], i["stop"]) for i in stage}
            if len(served) != 1:
                raise ChainError(f"stage {k}'s replicas serve different layers: {sorted(served)}")
        spans = [(s[0]["start"], s[0]["stop"]) for s in infos]
        if (
            spans[0][0] != 0
            or any(a[1] != b[0] for a, b in itertools.pairwise(spans))
            or not infos[-1][0]["last"]
        ):
            raise ChainError(
                f"the stages' layers {spans} do not chain from layer 0 to the model's last layer without gaps"
            )
        self.topology, self.client_node, self.timeout_s = topology, topology.node(client_node).name, timeout_s
        self.stages = [
            [_Replica(h, i["node"]) for h, i in zip(stage, info, strict=True)]
            for stage, info in zip(servers, infos, strict=True)
        ]
        self._sessions = 0

    def _expected_s(self, replica: _Replica, prev_node: str, tokens: int) -> float:
        latency = self.topology.path_latency_ms(prev_node, replica.node) / 1e3
        if replica.tokens_per_s is None:
            return -1.0  # never measured: try it first
        return latency + tokens / replica.tokens_per_s

    def _pick(self, k: int, prev_node: str, tokens: int, exclude: frozenset[str] = frozenset()) -> _Replica:
        alive = [r for r in self.stages[k] if r.alive and r.node not in exclude]
        if not alive:
            raise ChainError(
                f"stage {k} has no live replica left (replicas on {[r.node for r in self.stages[k]]}, "
                f"dead: {[r.node for r in self.stages[k] if not r.alive]})"
            )
        return min(alive, key=lambda r: (self._expected_s(r, prev_node, tokens), r.node))

    def route(self, tokens: int) -> list[str]:
        """The nodes a new session of ``tokens`` prompt tokens would use, stage by stage."""
        prev, out = self.client_node, []
        for k in range(len(self.stages)):
            prev = self._pick(k, prev, tokens).node
            out.append(prev)
        return out

    def _call(self, replica: _Replica, session: str, x: np.ndarray, start: int) -> np.ndarray:
        """One call; measures the replica's throughput. Raises Ray's error on death, WorkerFailed on a bug."""
        from edgeray.train.failures import WorkerFailed, kind

        try:
            out, seconds = ray.get(replica.handle.forward.remote(session, x, start), timeout=self.timeout_s)
        except ray.exceptions.RayError as exc:
            if kind(exc) == "bug":
                raise WorkerFailed.from_ray(exc, f"stage server on {replica.node}") from exc
            raise
        rate = x.shape[1] / max(seconds, 1e-9)
        replica.tokens_per_s = rate if replica.tokens_per_s is None else (
            EWMA * rate + (1 - EWMA) * replica.tokens_per_s
        )  # fmt: skip
        return out

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        on_token: Callable[[int, int, list[str]], None] | None = None,
    ) -> Generation:
        """Greedy (``temperature`` 0) or seeded sampling; the same arguments give the same tokens whichever
        replicas serve them, and whether or not one dies on the way. ``on_token(step, token, nodes)`` is
        called as each token is chosen (streaming), with the nodes that served it."""
        if not prompt:
            raise ChainError("the prompt must hold at least one token")
        self._sessions += 1
        session = f"s{self._sessions}-{time.time_ns()}"
        gen = torch.Generator().manual_seed(seed)
        chosen = []
        prev = self.client_node
        for k in range(len(self.stages)):
            chosen.append(self._pick(k, prev, len(prompt)))
            prev = chosen[-1].node
        history: list[list[np.ndarray]] = [[] for _ in self.stages]  # inputs sent to each stage
        out = Generation([], [], [])
        x: np.ndarray = np.asarray([prompt], dtype=np.int64)
        pos = 0
        try:
            for step in range(max_new_tokens):
                for k in range(len(self.stages)):
                    x_in = x
                    while True:
                        try:
                            y = self._call(chosen[k], session, x_in, pos)
                            break
                        except ray.exceptions.RayError:  # death (a bug raised WorkerFailed above)
                            chosen[k] = self._failover(k, chosen, session, history[k], step, out)
                    history[k].append(x_in)
                    x = y
                logits = x[0, -1]
                out.logits.append(logits)
                out.route.append([r.node for r in chosen])
                pos += history[0][-1].shape[1]
                if temperature > 0:
                    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, -1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    token = int(np.argmax(logits))
                out.tokens.append(token)
                if on_token is not None:
                    on_token(step, token, out.route[-1])
                x = np.asarray([[token]], dtype=np.int64)
        finally:
            for r in chosen:
                if r.alive:
                    r.handle.close.remote(session)
        return out

    def _failover(
        self,
        k: int,
        chosen: list[_Replica],
        session: str,
        history: list[np.ndarray],
        step: int,
        out: Generation,
    ) -> _Replica:
        """Mark stage ``k``'s replica dead, pick another and rebuild its cache from ``history``."""
        dead = chosen[k]
        dead.alive = False
        prev = chosen[k - 1].node if k else self.client_node
        positions = sum(h.shape[1] for h in history)
        new = self._pick(k, prev, max(positions, 1))
        if history:
            past = np.concatenate(history, axis=1)
            self._call(new, session, past, 0)  # the whole history from position 0: cache == client's view
        out.failovers.append(
            {
                "stage": k,
                "dead": dead.node,
                "replacement": new.node,
                "rebuilt_positions": positions,
                "token": step,
            }
        )
        return new
