"""The device tier without a cluster: ONNX export against transformers, quantised agreement and size, the
onnx engine (batched decoding with a KV cache, logprobs) through the official openai client, the memory-fit
refusal and the `edgeray export onnx` command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeray.model.bundled import bundled_model
from edgeray.model.export_onnx import ExportError, export_onnx, load_info, size_ratio
from edgeray.serve.engine_server import EngineServer
from edgeray.serve.engines import EngineError, Request, TorchEngine
from edgeray.serve.onnx_engine import OnnxEngine, OnnxSession, memory_need

from .conftest import collect_streams

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def model_dir(edgeray_home):
    return bundled_model()


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    return {q: export_onnx(model_dir, root / q, quant=q) for q in ("fp32", "int8", "int4")}


def _windows(model_dir: Path, n: int = 40, length: int = 64) -> torch.Tensor:
    """Held-out-style rows of the bundled model's corpus: ``n`` windows, every fifth one."""
    from edgeray.model.shards import _windows as windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [w["input_ids"] for w in windows(tok, length)]
    return torch.tensor(rows[::5][:n])


def _job(name: str) -> Any:
    """A job script of jobs/ as a module, to run its ``main`` in this process."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _onnx_logits(path: str, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past=None):
    s = OnnxSession(Path(path).parent)
    return s.run(ids, mask, pos, past if past is not None else s.empty_cache(ids.shape[0]))


def test_fp32_export_equals_transformers_with_padding_and_cache(model_dir, exports):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # Left padding in one row, a cache continued by two tokens: the reference is the full forward.
    ids = torch.tensor([[0, 0, 5, 9, 11, 40], [3, 4, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    more = torch.tensor([[17, 3], [18, 4]])
    full_ids = torch.cat([ids, more], 1)
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
    full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos).logits.numpy()
    path = exports["fp32"].path
    logits, cache = _onnx_logits(path, ids.numpy(), mask.numpy(), pos.numpy())
    real = mask.bool().numpy()
    np.testing.assert_allclose(logits[real], ref[:, :6][real], atol=1e-4)
    logits2, cache2 = _onnx_logits(path, more.numpy(), full_mask.numpy(), full_pos[:, 6:].numpy(), cache)
    np.testing.assert_allclose(logits2, ref[:, 6:], atol=1e-4)
    assert cache2[0].shape == (2, 2, 8, 32)  # (batch, kv heads, past + new, head dim)


def test_mixtral_export_equals_transformers(tmp_path):
    from edgeray.model.presets import save_pretrained
    from edgeray.model.tokenizer import train_tokenizer
    from edgeray.train.moe.config import MoEConfig, build_moe_model

    model = build_moe_model(MoEConfig(experts=4, top_k=2, expert_intermediate=64)).eval()
    save_pretrained(model, train_tokenizer(), tmp_path / "moe")
    info = export_onnx(tmp_path / "moe", tmp_path / "moe-onnx")
    assert info.architecture == "MixtralForCausalLM"
    ids = torch.randint(3, 4000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    pos = np.tile(np.arange(12), (2, 1))
    logits, _ = _onnx_logits(info.path, ids.numpy(), np.ones((2, 12), np.int64), pos)
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_quantised_exports_are_smaller_and_agree_on_a_fixed_set(model_dir, exports):
    """Greedy agreement with fp32, teacher-forced: at every position of 40 fixed 64-token windows of the
    bundled model's corpus, does the quantised model pick fp32's next token? (Measured: int8 0.978, int4
    0.945.)"""
    rows = _windows(model_dir).numpy()
    mask = np.ones(rows.shape, np.int64)
    pos = np.tile(np.arange(rows.shape[1]), (rows.shape[0], 1))
    picks = {q: _onnx_logits(e.path, rows, mask, pos)[0].argmax(-1) for q, e in exports.items()}
    agreement = {q: float((picks[q] == picks["fp32"]).mean()) for q in ("int8", "int4")}
    assert agreement["int8"] >= 0.95, agreement
    assert agreement["int4"] >= 0.90, agreement
    assert size_ratio(exports["int8"]) >= 3.5 and size_ratio(exports["int4"]) > size_ratio(exports["int8"])
    assert 0.95 < size_ratio(exports["fp32"]) <= 1.0  # fp32 on disk is the parameters plus the graph


def test_onnx_engine_greedy_equals_the_torch_engine_and_batches_exactly(model_dir, exports):
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["The for statement", "A class definition is", "Exceptions"]
    reqs = [Request(tok(p)["input_ids"], max_tokens=6 + 3 * i, logprobs=2) for i, p in enumerate(prompts)]

    torch_out = collect_streams(TorchEngine(model_dir), reqs)
    batched = collect_streams(
        OnnxEngine(Path(exports["fp32"].path).parent), reqs
    )  # prompts of different lengths
    for t, o in zip(torch_out, batched, strict=True):
        assert [d.token_ids for d in o] == [d.token_ids for d in t]
        assert [d.text for d in o] == [d.text for d in t]
        for dt, do in zip(t, o, strict=True):
            assert dt.logprobs and do.logprobs
            assert do.logprobs[0].logprob == pytest.approx(dt.logprobs[0].logprob, abs=1e-4)
            assert [i for i, _ in do.logprobs[0].top] == [i for i, _ in dt.logprobs[0].top]
    # int8, one request at a time, equals int8 batched: batching does not change any row.
    int8 = Path(exports["int8"].path).parent
    together = collect_streams(OnnxEngine(int8), reqs)
    alone = [collect_streams(OnnxEngine(int8), [r])[0] for r in reqs]
    assert [[d.token_ids for d in x] for x in together] == [[d.token_ids for d in x] for x in alone]


def test_onnx_engine_through_the_openai_client(exports):
    import openai

    async def go() -> None:
        server = await EngineServer.start(
            Path(exports["int8"].path).parent, engine="onnx", host="127.0.0.1", api_key="k", timeout_s=120
        )
        try:
            assert server.engine == "onnx" and "logprobs" in server.accepted["completions"]
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0, timeout=60)
            done = await client.completions.create(
                model="edgeray-tiny", prompt="The for statement", max_tokens=8, temperature=0, logprobs=2
            )
            lp = done.choices[0].logprobs
            assert done.usage.completion_tokens == 8 and len(lp.token_logprobs) == 8
            assert "".join(lp.tokens) == done.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
            assert all(v <= 0 for v in lp.token_logprobs)
            pieces = [
                c
                async for c in await client.completions.create(
                    model="edgeray-tiny", prompt="The for statement", max_tokens=8, temperature=0,
                    stream=True, logprobs=0, stream_options={"include_usage": True},
                )
            ]  # fmt: skip
            assert "".join(c.choices[0].text for c in pieces if c.choices) == done.choices[0].text
            streamed = [v for c in pieces if c.choices for v in c.choices[0].logprobs.token_logprobs]
            assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)
            chat = await client.chat.completions.create(
                model="edgeray-tiny", messages=[{"role": "user", "content": "What is a class?"}],
                max_tokens=4, temperature=0, logprobs=True, top_logprobs=1,
            )  # fmt: skip
            assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
            with pytest.raises(openai.BadRequestError, match="logprobs"):
                await client.completions.create(model="edgeray-tiny", prompt="x", logprobs=6)
            with pytest.raises(openai.BadRequestError, match="top_logprobs"):
                await client.chat.completions.create(
                    model="edgeray-tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2
                )
        finally:
            await server.shutdown()

    asyncio.run(go())


def test_onnx_engine_refuses_a_checkpoint_and_a_missing_export(model_dir, tmp_path):
    with pytest.raises(EngineError, match="edgeray export onnx"):
        asyncio.run(EngineServer.start(model_dir, engine="onnx", api_key="k"))
    with pytest.raises(EngineError, match="not an ONNX export"):
        OnnxEngine(tmp_path)


def _topology(tmp_path: Path, phone_gb: float) -> Path:
    doc = {
        "name": "phones",
        "regions": [
            {
                "name": "cell",
                "tier": "device",
                "nodes": [{"name": "phone-1", "cpus": 1, "memory_gb": phone_gb}],
            },
            {"name": "dc", "tier": "cloud", "nodes": [{"name": "dc-1", "cpus": 4, "memory_gb": 8}]},
        ],
        "links": [{"between": ["cell", "dc"], "latency_ms": 20}],
    }
    path = tmp_path / f"phones-{phone_gb}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_memory_fit_is_checked_before_placement(model_dir, exports, tmp_path):
    from edgeray.serve.app import app

    onnx_dir = str(Path(exports["int8"].path).parent)
    need = memory_need(load_info(onnx_dir), 512)
    assert need.total == need.runtime + 2 * exports["int8"].weight_bytes + 32 * 512 * 4 * 2 * 2 * 32 * 4
    args = {"auth": "open", "tier_engines": "device:onnx", "onnx_model": onnx_dir, "engine": "torch"}
    with pytest.raises(ValueError) as refused:
        app({**args, "topology": str(_topology(tmp_path, 0.25))})
    message = str(refused.value)
    assert "region 'cell'" in message and "phone-1" in message and "memory_gb 0.25" in message
    assert f"{need.total / 2**20:.0f} MiB" in message
    app({**args, "topology": str(_topology(tmp_path, 1.0))})  # fits: the application builds


def test_deploy_export_is_made_once_per_checkpoint_and_format(model_dir):
    from edgeray.serve.app import deploy_export

    first = deploy_export(str(model_dir), "int8")
    stamp = (first / "model.onnx").stat().st_mtime_ns
    assert deploy_export(str(model_dir), "int8") == first
    assert (first / "model.onnx").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert load_info(first).quant == "int8"


def test_export_command(model_dir, tmp_path):
    from click.testing import CliRunner

    from edgeray.cli import main

    out = subprocess.run(  # as a user types it
        [str(BIN / "edgeray"), "export", "onnx", str(model_dir), str(tmp_path / "x"), "--int4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "int4" in out.stdout and load_info(tmp_path / "x").quant == "int4"
    for args, message in [  # the same command in this process: the mistakes, each named
        (("export", "onnx", str(tmp_path / "nothing"), str(tmp_path / "y")), "no config.json"),
        (("export", "onnx", str(model_dir), str(tmp_path / "y"), "--int8", "--int4"), "exclude each other"),
        (("export", "onnx", str(model_dir)), "usage: edgeray export onnx"),
        (("export", "launcher", "local", str(tmp_path / "y")), "for `export onnx`"),
    ]:
        bad = CliRunner().invoke(main, list(args))
        assert bad.exit_code == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "y").exists()
    with pytest.raises(ExportError, match="valid formats"):
        export_onnx(model_dir, tmp_path / "z", quant="int3")


def test_the_device_benchmark_writes_its_summary_and_plot(model_dir, tmp_path):
    bench_device = _job("bench_device")
    assert bench_device.main(["--out", str(tmp_path), "--quick"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tiny,) = summary["results"]
    rows = {r["engine"]: r for r in tiny["rows"]}
    assert set(rows) == {
        "torch engine",
        "transformers generate (KV cache)",
        "onnx fp32",
        "onnx int8",
        "onnx int4",
    }
    assert (
        rows["onnx fp32"]["agreement_free_running"] == 1.0
    )  # fp32 decodes exactly what the torch engine does
    assert rows["onnx int8"]["size_ratio_vs_fp32"] >= 3.5 and all(r["tokens"] > 0 for r in rows.values())
    assert (tmp_path / "device.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- cascade
PROMPTS = ["The for statement", "A class definition", "Exceptions are", "The with statement",
           "Built-in functions", "Modules can import", "zq xv", "Generators yield"]  # fmt: skip


def test_the_cascade_escalates_exactly_the_answers_under_the_threshold(model_dir, exports):
    """A real front door over two real engine servers: int4 ONNX on campus (micro: the small tier) and the
    torch engine on metro. Each answer is judged by the small model's own confidence (the default signal,
    min_margin: the smallest gap between a token's best and second-best log-probability), measured here by
    asking that engine directly."""
    import aiohttp

    from edgeray.serve.config import ServeConfig
    from edgeray.serve.frontdoor import FrontDoor, answer_confidence
    from edgeray.serve.routing import Replica, Router
    from edgeray.serve.torch_api import ACCEPTED
    from edgeray.topology import load_topology, resolve_topology_path

    topo = load_topology(resolve_topology_path("local"))

    async def go() -> None:
        small = await EngineServer.start(Path(exports["int4"].path).parent, engine="onnx", api_key="s")
        large = await EngineServer.start(model_dir, engine="torch", api_key="s")
        doors: list[FrontDoor] = []
        try:
            async with aiohttp.ClientSession() as http:

                async def ask(url: str, body: dict, headers: dict | None = None) -> tuple[dict, dict]:
                    head = {"Authorization": "Bearer s", **(headers or {})}
                    async with http.post(f"{url}/v1/completions", json=body, headers=head) as r:
                        assert r.status == 200, await r.text()
                        return await r.json(), dict(r.headers)

                bodies = [
                    {"model": "edgeray-tiny", "prompt": p, "max_tokens": 8, "temperature": 0} for p in PROMPTS
                ]
                direct_small = [(await ask(small.url, {**b, "logprobs": 2}))[0] for b in bodies]
                direct_large = [(await ask(large.url, b))[0] for b in bodies]
                conf = [answer_confidence("completions", a) for a in direct_small]
                threshold = sorted(conf)[len(conf) // 2]  # half escalate, half do not

                async def door(slow_large: bool) -> str:
                    router = Router(topo, ttft_guess_ms=5)
                    for rid, region, server in (("a", "campus", small), ("b", "metro", large)):
                        router.replicas[rid] = Replica(
                            rid, region, f"{region}-1", server.url, server.engine, 8, ACCEPTED
                        )
                    if slow_large:  # metro's first tokens take 10 s: no escalation fits a 2 s budget
                        for _ in range(5):
                            router.latency["metro"].observe(10_000.0)
                    cfg = ServeConfig(
                        auth="open", port=_free_port(), cascade_threshold=threshold, localhost=False
                    )
                    d = FrontDoor(cfg, router, [], "s")
                    doors.append(d)
                    return (await d.start("127.0.0.1"))[0]

                base = await door(slow_large=False)
                budget = {"x-edgeray-region": "campus", "x-edgeray-budget-ms": "60000"}
                for b, c, s_ans, l_ans in zip(bodies, conf, direct_small, direct_large, strict=True):
                    got, headers = await ask(base, b, budget)
                    assert float(headers["x-edgeray-confidence"]) == pytest.approx(c, abs=1e-4)
                    if c < threshold:
                        assert headers["x-edgeray-region"] == "metro" and headers[
                            "x-edgeray-cascade"
                        ].startswith("large")
                        assert got["choices"][0]["text"] == l_ans["choices"][0]["text"]
                    else:
                        assert headers["x-edgeray-region"] == "campus" and headers[
                            "x-edgeray-cascade"
                        ].startswith("small")
                        assert got["choices"][0]["text"] == s_ans["choices"][0]["text"]
                        assert got["choices"][0]["logprobs"] is None  # the caller did not ask for them
                # A caller that asks for one alternative per token gets one (the probe asked for two).
                confident = next(b for b, c in zip(bodies, conf, strict=True) if c >= threshold)
                got, headers = await ask(base, {**confident, "logprobs": 1}, budget)
                assert headers["x-edgeray-region"] == "campus"
                assert all(len(t) == 1 for t in got["choices"][0]["logprobs"]["top_logprobs"])
                # A stream skips the cascade (it needs the whole answer) and says so.
                stream_body = {**bodies[0], "stream": True}
                async with http.post(f"{base}/v1/completions", json=stream_body, headers=budget) as r:
                    assert r.status == 200 and r.headers["x-edgeray-cascade"] == "off: stream"
                    assert (await r.read()).endswith(b"data: [DONE]\n\n")
                # Budgets: when no larger tier can answer in time, the small answer stays, saying why.
                slow = await door(slow_large=True)
                low = next(b for b, c in zip(bodies, conf, strict=True) if c < threshold)
                got, headers = await ask(slow, low, {"x-edgeray-budget-ms": "2000"})
                assert headers["x-edgeray-region"] == "campus"
                assert (
                    "escalation impossible" in headers["x-edgeray-cascade"]
                    and "budget" in headers["x-edgeray-cascade"]
                )
        finally:
            for d in doors:
                await d.close()
            await small.shutdown()
            await large.shutdown()

    asyncio.run(go())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_cascade_benchmark_writes_its_summary_and_the_front_door_agrees_with_it(model_dir, tmp_path):
    bench_cascade = _job("bench_cascade")
    assert bench_cascade.main(["--out", str(tmp_path), "--quick"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["results"]) == {"onnx int4 / min_margin", "onnx int4 / mean_logprob"}
    for res in summary["results"].values():
        rows = res["rows"]
        assert rows[0]["escalated"] == 0 and rows[-1]["escalated"] == 1 and rows[-1]["agreement"] == 1.0
        assert res["chosen"]["escalated"] <= 0.3 and res["validated"]["matches_prediction"]
    assert (tmp_path / "cascade.png").stat().st_size > 10_000


def test_cascade_config_errors_name_the_field():
    from edgeray.serve.config import ServeConfig

    for bad, message in [
        ({"cascade_threshold": 0.5, "cascade_signal": "mean_logprob"}, "mean log-probability is <= 0"),
        ({"cascade_threshold": -0.1}, "a margin is >= 0"),
        (
            {"cascade_threshold": 0.1, "cascade_signal": "vibes"},
            "valid signals are ['min_margin', 'mean_logprob']",
        ),
        ({"cascade_tiers": "device,moon"}, "give one or more of ['device', 'micro', 'regional', 'cloud']"),
    ]:
        with pytest.raises(ValueError) as err:
            ServeConfig(**bad)
        assert message in str(err.value), str(err.value)
    assert ServeConfig(cascade_tiers="device, micro").cascade_tiers == ["device", "micro"]


# ---------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("scores", ["magnitude", "activation"])
def test_pruned_llama_equals_the_original_with_the_pruned_parts_zeroed(model_dir, scores):
    from edgeray.model.prune import masked_reference, prune_llama

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = _windows(model_dir, 8)[:, :32]
    pruned, report = prune_llama(model, mlp_keep=0.5, heads_keep=0.5, scores=scores, calibration=ids)
    assert report.intermediate == (512, 256) and report.heads == (4, 2)
    assert pruned.config.num_key_value_heads == 2 and pruned.config.head_dim == 32
    # every key/value group keeps one of its two query heads
    assert all([h // 2 for h in kept] == [0, 1] for kept in report.kept_heads)
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
        want = masked_reference(model, report)(input_ids=ids).logits
        original = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - original).abs().max() > 1e-2  # it did remove something
    assert report.params[1] < report.params[0] == sum(p.numel() for p in model.parameters())


def test_a_pruned_checkpoint_exports_and_serves(model_dir, tmp_path):
    from edgeray.model.presets import save_pretrained
    from edgeray.model.prune import prune_llama

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pruned, _ = prune_llama(model, mlp_keep=0.25, heads_keep=0.5)
    path = save_pretrained(pruned, AutoTokenizer.from_pretrained(model_dir), tmp_path / "pruned")
    info = export_onnx(path, tmp_path / "onnx", quant="int8")
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad():
        ref = pruned(input_ids=ids).logits.numpy()
    logits, _ = _onnx_logits(info.path, ids.numpy(), np.ones((1, 5), np.int64), np.arange(5)[None])
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.8  # int8 of the pruned model
    with pytest.raises(ValueError, match="mlp_keep 0: give a fraction"):
        prune_llama(model, mlp_keep=0)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_llama(model, scores="activation")
