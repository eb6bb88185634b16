"""Secure aggregation (edgeray.federated.secagg) against the plain sum: exact, private, dropout-tolerant,
tamper-evident."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeray.federated.secagg import (
    MOD,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    abort_probability,
    dequantize,
    levels_for,
    neighbour_graph,
    quantize,
    run_round,
    shamir_join,
    shamir_split,
)


def _inputs(params: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    top = levels_for(len(params.clients))
    return {c: rng.integers(0, top + 1, params.vector_len, dtype=np.uint32) for c in params.clients}


def _plain_sum(inputs: dict[int, np.ndarray], who) -> np.ndarray:
    total = np.zeros(next(iter(inputs.values())).shape, dtype=np.int64)
    for c in who:
        total += inputs[c]
    return (total % MOD).astype(np.uint32)


def _round(params, inputs, **drops):
    clients = {c: SecAggClient(c, params) for c in params.clients}
    server = SecAggServer(params)
    return run_round(server, clients, inputs, **drops), server, clients


@pytest.mark.parametrize("n, neighbours", [(2, None), (7, None), (20, None), (20, 19)])
def test_the_unmasked_sum_equals_the_plain_sum_exactly(n, neighbours):
    params = SecAggParams.make(3, range(n), 1000, neighbours=neighbours)
    inputs = _inputs(params)
    total, _, _ = _round(params, inputs)
    assert total.dtype == np.uint32 and np.array_equal(total, _plain_sum(inputs, range(n)))


def test_dropouts_after_masking_are_recovered_and_the_survivors_sum_is_exact():
    # 20 clients on a complete graph (19 neighbours), threshold 5: the 15 survivors rebuild the seeds of each
    # other and the mask keys of the 5 dropped, whose pair masks they had added
    params = SecAggParams.make(1, range(20), 5000, neighbours=19, threshold=5)
    inputs = _inputs(params, 1)
    dropped = {0, 4, 9, 13, 19}
    total, server, _ = _round(params, inputs, drop_after_masking=dropped)
    assert server.roster() == (set(range(20)) - dropped, dropped)
    assert np.array_equal(total, _plain_sum(inputs, set(range(20)) - dropped))
    # on the sparse default graph (8 neighbours for 20 clients), 30% of the clients dropping at random
    sparse = SecAggParams.make(2, range(20), 5000)
    assert sparse.neighbours == 10 and sparse.threshold >= 2
    late = set(np.random.default_rng(5).choice(20, 6, replace=False).tolist())
    total, _, _ = _round(sparse, inputs, drop_after_masking=late)
    assert np.array_equal(total, _plain_sum(inputs, set(range(20)) - late))
    # a client that vanished before sharing keys is simply not in the round's sum
    total, server, _ = _round(sparse, inputs, drop_before_sharing={3})
    assert 3 not in server.roster()[0] | server.roster()[1]
    assert np.array_equal(total, _plain_sum(inputs, set(range(20)) - {3}))


def test_up_to_n_minus_t_dropouts_recover_and_one_more_aborts_naming_the_shortfall():
    """Complete graph, n = 8, t = 3: a client's secrets have 8 holders (its 7 neighbours and itself), so up to
    n - t = 5 dropped clients leave every secret t holders; with 6 dropped, a dropped client's mask key has
    only 2 and the round aborts with no sum."""
    params = SecAggParams.make(0, range(8), 300, neighbours=7, threshold=3)
    inputs = _inputs(params, 2)
    total, _, _ = _round(params, inputs, drop_after_masking={0, 1, 2, 3, 4})
    assert np.array_equal(total, _plain_sum(inputs, {5, 6, 7}))
    with pytest.raises(
        SecAggAbort, match=r"round 0 aborted: .* fewer than threshold 3 shares .* 2 survivors"
    ):
        _round(params, inputs, drop_after_masking={0, 1, 2, 3, 4, 5})


def test_a_masked_input_is_indistinguishable_from_uniform_and_the_server_never_holds_an_update():
    """Chi-square of a masked vector's top byte over 256 bins (100,000 values): under uniformity its mean is
    255 and its sd 22.6, so 255 + 10 sd is never reached by chance; the input itself (values below
    levels_for(20), so the top byte is 0-12) is far past it, so the check can fail."""
    params = SecAggParams.make(0, range(20), 100_000)
    inputs = _inputs(params, 3)

    def chi2(v: np.ndarray) -> float:
        counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
        expected = v.size / 256
        return float(((counts - expected) ** 2 / expected).sum())

    bound = 255 + 10 * math.sqrt(2 * 255)
    assert chi2(inputs[0]) > bound
    clients = {c: SecAggClient(c, params) for c in params.clients}
    server = SecAggServer(params)
    adverts = server.collect_adverts(c.advertise() for c in clients.values())
    for cid, c in clients.items():
        server.collect_shares(cid, *c.share_keys(adverts[cid]))
    for cid, c in clients.items():
        c.receive(server.sealed_for(cid))
    for cid, c in clients.items():
        y = c.masked_input(inputs[cid])
        assert chi2(y) < bound, cid
        server.add_input(cid, y)
        held = [v for v in vars(server).values() if isinstance(v, np.ndarray)]
        assert not any(np.array_equal(h, inputs[d]) for h in held for d in inputs)
    survivors, dropped = server.roster()
    total = server.unmask(clients[c].unmask(survivors, dropped) for c in sorted(survivors))
    assert np.array_equal(total, _plain_sum(inputs, range(20)))


def test_a_tampered_share_is_detected_in_transit_and_at_unmasking():
    params = SecAggParams.make(7, range(6), 50, neighbours=5, threshold=3)
    inputs = _inputs(params, 4)
    clients = {c: SecAggClient(c, params) for c in params.clients}
    server = SecAggServer(params)
    adverts = server.collect_adverts(c.advertise() for c in clients.values())
    for cid, c in clients.items():
        server.collect_shares(cid, *c.share_keys(adverts[cid]))
    # the server flips one bit of the sealed shares client 2 sent client 4
    box = server._outbox[4]
    i = next(k for k, m in enumerate(box) if m.src == 2)
    ct = bytearray(box[i].ciphertext)
    ct[5] ^= 1
    box[i] = type(box[i])(box[i].src, box[i].dst, box[i].nonce, bytes(ct))
    for cid, c in clients.items():
        c.receive(server.sealed_for(cid))
    for cid, c in clients.items():
        server.add_input(cid, c.masked_input(inputs[cid]))
    survivors, dropped = server.roster()
    with pytest.raises(SecAggError, match="the shares client 2 sent client 4 failed authentication"):
        clients[4].unmask(survivors, dropped)
    # a neighbour that reveals a wrong share of a survivor's seed is caught by the seed's commitment
    reveals = [clients[c].unmask(survivors, dropped) for c in sorted(survivors) if c != 4]
    x, y = reveals[0].b_shares[1]
    reveals[0].b_shares[1] = (x, (y + 1) % (2**521 - 1))
    ordered = [reveals[0], *reveals[1:]]  # the wrong share is among the first t used for client 1
    with pytest.raises(SecAggError, match="client 1's rebuilt self-mask seed fails its commitment"):
        server.unmask(ordered)


def test_shamir_rebuilds_from_any_t_shares_and_the_graph_is_symmetric():
    secret = bytes(range(32))
    xs = [3, 5, 8, 13, 21]
    shares = list(zip(xs, shamir_split(secret, xs, 3), strict=True))
    for subset in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        assert shamir_join([shares[i] for i in subset]) == secret
    with pytest.raises(SecAggError, match="inconsistent shares"):  # two points of a degree-2 polynomial
        shamir_join(shares[:2])
    params = SecAggParams.make(0, range(100), 10)
    graph = neighbour_graph(params)
    assert all(len(v) == params.neighbours == 14 for v in graph.values())
    assert all(c in graph[j] for c, v in graph.items() for j in v)
    # the defaults: 2 ceil(log2 n) neighbours (plus the client itself: K = 15 ~ 2 log2 n + 1) and the largest
    # threshold with which a round losing 30% of its clients at random aborts with probability <= 1%
    assert params.threshold == 3 and abort_probability(100, 14, 3, 0.3) <= 0.01 < abort_probability(
        100, 14, 4, 0.3
    )


def test_quantised_updates_are_clipped_and_their_sum_decodes_within_one_level_per_client():
    rng = np.random.default_rng(0)
    n, clip = 10, 1.0
    updates = [rng.normal(size=2000) * s for s in np.linspace(0.001, 0.2, n)]  # the larger ones get clipped
    qs, factors = zip(*(quantize(u, clip, n, rng) for u in updates), strict=True)
    clipped = [u * f for u, f in zip(updates, factors, strict=True)]
    assert all(np.linalg.norm(c) <= clip + 1e-9 for c in clipped) and min(factors) < 1 == max(factors)
    total = _plain_sum(dict(enumerate(qs)), range(n))
    decoded = dequantize(total, clip, n, n)
    step = 2 * clip / levels_for(n)
    assert np.abs(decoded - np.sum(clipped, axis=0)).max() <= n * step
    # unbiased: a value a quarter of the way from level k to level k + 1 rounds up a quarter of the time
    top = levels_for(2)
    k = top // 2
    x = (k + 0.25) * 2 / top - 1
    q, _ = quantize(np.full(20_000, x), 1.0, 2, rng)
    assert set(np.unique(q).tolist()) == {k, k + 1}
    assert abs((q == k + 1).mean() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 20_000)


def test_bad_parameters_and_inputs_are_refused_by_name():
    with pytest.raises(SecAggError, match="needs at least 2"):
        SecAggParams.make(0, [1], 10)
    with pytest.raises(SecAggError, match=r"threshold = 9: must be in \[1, neighbours = 4\]"):
        SecAggParams.make(0, range(5), 10, threshold=9)
    params = SecAggParams.make(0, range(3), 10)
    with pytest.raises(SecAggError, match="client 5 is not among round 0's clients"):
        SecAggClient(5, params)
    c = SecAggClient(0, params)
    with pytest.raises(SecAggError, match=r"input is float64\[10\]; expected uint32\[10\]"):
        c.masked_input(np.zeros(10))


def test_the_benchmark_writes_its_results(tmp_path):
    """jobs/bench_federated.py --quick end to end (its speed targets are read from its output, not tested)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "jobs/bench_federated.py", "--quick", "--out", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "unmasked sum bit-exact" in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["dropout"] for r in summary["secagg"]] == [0.0, 0.1, 0.3]
    assert all(r["bit_exact"] for r in summary["secagg"]) and summary["secagg"][2]["dropped"] == 6
    assert (tmp_path / "secagg.png").stat().st_size > 10_000
