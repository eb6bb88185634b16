"""Inference chains (edgeray.serve.chain): a 2-stage tiny Llama served by stage replicas on the shared local
cluster; the tokens and logits are the single-process model's, whichever replica serves and when one dies."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from edgeray.model.presets import build_model
from edgeray.placement import pin
from edgeray.serve.chain import ChainError, InferenceChain, StageServer, _Replica

from .conftest import assert_clean

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROMPT = [5, 17, 99, 3, 250, 7]


def server(node: str, start: int, stop: int, **kw):
    return pin(StageServer, node=node).remote("tiny", 0, start, stop, node, **kw)


@pytest.fixture(scope="module")
def servers(local_cluster):
    topo, _ = local_cluster
    made = {
        "s0": server("campus-gw", 0, 2),
        "a": server("metro-mec-1", 2, 4),
        "b": server("metro-mec-2", 2, 4),
    }
    ray.get([h.ping.remote() for h in made.values()], timeout=120)
    yield topo, made
    for h in made.values():
        ray.kill(h, no_restart=True)
    assert_clean()


def reference(max_new_tokens: int, temperature: float, seed: int) -> tuple[list[int], list[np.ndarray]]:
    """The whole model in this process, no cache: every step recomputes the full sequence."""
    model = build_model("tiny", seed=0).eval()
    gen = torch.Generator().manual_seed(seed)
    ids, tokens, logits = list(PROMPT), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            last = model(input_ids=torch.tensor([ids])).logits[0, -1]
            logits.append(last.numpy())
            if temperature > 0:
                token = int(
                    torch.multinomial(torch.softmax(last.double() / temperature, -1), 1, generator=gen)
                )
            else:
                token = int(last.argmax())
            tokens.append(token)
            ids.append(token)
    return tokens, logits


@pytest.mark.timeout(300)
def test_a_chain_generates_the_whole_models_tokens_and_logits(servers):
    topo, s = servers
    chain = InferenceChain([[s["s0"]], [s["a"], s["b"]]], topo, client_node="campus-gw")
    for temperature, seed in ((0.0, 0), (1.0, 3)):
        out = chain.generate(PROMPT, 12, temperature=temperature, seed=seed)
        tokens, logits = reference(12, temperature, seed)
        assert out.tokens == tokens
        assert len(set(tokens)) > 1 or temperature == 0  # sampling walks through different tokens
        for mine, ref in zip(out.logits, logits, strict=True):
            np.testing.assert_allclose(mine, ref, atol=1e-4)
        assert out.failovers == [] and {r[0] for r in out.route} == {"campus-gw"}


@pytest.mark.timeout(300)
def test_sessions_go_to_the_replica_measured_fastest(servers):
    """Two replicas of stage 1, one 0.3 s slower per call: each is tried once, then sessions go to the fast
    one. With equal measured speed the nearer one (lower path latency from the previous hop) wins."""
    topo, s = servers
    slow = server("cloud-1", 2, 4, delay_s=0.3)
    try:
        chain = InferenceChain([[s["s0"]], [slow, s["b"]]], topo, client_node="campus-gw")
        first = chain.generate(PROMPT, 2).route[0][1]
        second = chain.generate(PROMPT, 2).route[0][1]
        assert {first, second} == {"cloud-1", "metro-mec-2"}  # each tried once
        for _ in range(2):
            assert chain.generate(PROMPT, 3).route[0][1] == "metro-mec-2"
        assert chain.route(len(PROMPT)) == ["campus-gw", "metro-mec-2"]
        replicas = chain.stages[1]
        assert replicas[0].tokens_per_s < replicas[1].tokens_per_s
    finally:
        ray.kill(slow, no_restart=True)
    near = InferenceChain([[s["s0"]], [s["a"], s["b"]]], topo, client_node="campus-gw")
    a, b = near.stages[1]
    a.tokens_per_s = b.tokens_per_s = 1000.0
    a.node, b.node = "cloud-1", "metro-mec-2"  # the policy alone: cloud is 10 ms from campus, metro 2.5
    assert near._pick(1, "campus-gw", 6).node == "metro-mec-2"
    assert isinstance(a, _Replica)


@pytest.mark.timeout(300)
def test_a_replica_killed_mid_generation_is_replaced_and_the_tokens_do_not_change(servers):
    """Stage 1's replica is killed after the 5th token: the client picks the other, rebuilds its cache from
    the session's history (prompt + 4 tokens, from position 0) and the generation goes on with the tokens
    and logits of an uninterrupted run. A stage whose last replica is dead is refused by name."""
    topo, s = servers
    victim = server("cloud-1", 2, 4)
    spare = server("cloud-2", 2, 4)
    try:
        chain = InferenceChain([[s["s0"]], [victim, spare]], topo, client_node="campus-gw")
        chain.stages[1][1].tokens_per_s = 1.0  # measured slow: the session starts on the victim
        handles = {"cloud-1": victim, "cloud-2": spare}

        def kill(step, token, nodes):
            if step == 4:
                ray.kill(handles[nodes[1]], no_restart=True)

        out = chain.generate(PROMPT, 12, temperature=1.0, seed=5, on_token=kill)
        tokens, logits = reference(12, 1.0, 5)
        assert out.tokens == tokens
        for mine, ref in zip(out.logits, logits, strict=True):
            np.testing.assert_allclose(mine, ref, atol=1e-4)
        assert out.failovers == [
            {"stage": 1, "dead": "cloud-1", "replacement": "cloud-2", "rebuilt_positions": len(PROMPT) + 4,
             "token": 5}
        ]  # fmt: skip
        assert [r[1] for r in out.route] == ["cloud-1"] * 5 + ["cloud-2"] * 7
        ray.kill(spare, no_restart=True)
        with pytest.raises(
            ChainError, match=r"stage 1 has no live replica left .*dead: \['cloud-1', 'cloud-2'\]"
        ):
            chain.generate(PROMPT, 3)
    finally:
        for h in (victim, spare):
            ray.kill(h, no_restart=True)


@pytest.mark.timeout(120)
def test_a_call_out_of_step_with_the_cache_and_a_broken_chain_are_refused(servers):
    topo, s = servers
    x = np.zeros((1, 2, 128), dtype=np.float32)
    with pytest.raises(ray.exceptions.RayTaskError, match="holds 0 positions but the call starts at 3"):
        ray.get(s["a"].forward.remote("fresh", x, 3), timeout=60)
    with pytest.raises(ChainError, match="do not chain from layer 0"):
        InferenceChain([[s["a"]], [s["b"]]], topo, client_node="campus-gw")
    with pytest.raises(ChainError, match="do not chain from layer 0"):
        InferenceChain([[s["s0"]]], topo, client_node="campus-gw")
    with pytest.raises(
        ChainError, match=r"stage 1's replicas serve different layers: \[\(0, 2\), \(2, 4\)\]"
    ):
        InferenceChain([[s["s0"]], [s["a"], s["s0"]]], topo, client_node="campus-gw")
