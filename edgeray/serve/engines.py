"""edgeray's own inference engines: torch (the fallback where vLLM cannot be imported) and, through the same
batching loop, ONNX Runtime (edgeray.serve.onnx_engine, the device tier).

    engine = TorchEngine("runs/x/checkpoint")       # any causal LM edgeray writes (Llama, Mixtral MoE)
    await engine.start()
    async for delta in engine.stream(Request(prompt_ids=[1, 5, 9], max_tokens=16)):
        print(delta.text, delta.finish_reason)
    await engine.shutdown()

``TorchEngine`` batches dynamically at the iteration level: every decode step runs one forward over every
active request (left-padded, positions from the mask), so a request that arrives mid-generation joins the
next step instead of waiting for the batch to drain. It recomputes the prefix each step (no KV cache): for
the tiny models edgeray trains that is a few milliseconds, and it keeps batching exact and simple.
``BatchingEngine`` is that loop without the model: an engine supplies ``_step`` (one token per request).
With vLLM installed, replicas run vLLM's own OpenAI server instead (edgeray.serve.engine_server).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgeray.errors import EdgerayError

ENGINES = ("auto", "vllm", "torch", "onnx")
"""``auto``: vLLM when it imports, else torch. ``onnx``: ONNX Runtime on an export of the model
(edgeray.serve.onnx_engine), for device- and micro-tier nodes."""


class EngineError(EdgerayError):
    """The engine cannot start or serve (missing package, bad checkpoint, invalid request)."""


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each token's log-probability and the k most likely tokens'."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits, before temperature / top-p, as
    vLLM reports them) and the ``k`` most likely tokens at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Delta:
    """New output since the previous delta: token ids, their text, and why generation ended (or None)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. CUDA-linked torchvision on CPU)
        return False
    return True


class Engine:
    """The interface: ``start``, ``stream`` (async iterator of :class:`Delta`), ``shutdown``, ``tokenizer``."""

    name = "base"
    tokenizer: Any
    max_model_len: int

    async def start(self) -> None:
        raise NotImplementedError

    def stream(self, request: Request) -> AsyncIterator[Delta]:
        raise NotImplementedError

    async def shutdown(self) -> None:
        return None


@dataclass
class _Active:
    request: Request
    ids: list[int]
    queue: asyncio.Queue[Delta | Exception]
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    state: Any = None
    """The engine's own per-request state (the ONNX engine's KV cache)."""


TINY_TEMPERATURE = torch.finfo(torch.float32).tiny
"""Temperatures below this are 0 in float32 logits arithmetic: greedy, their limit."""


def pick(row: torch.Tensor, item: _Active) -> tuple[int, TokenLogprob | None]:
    """The next token from one row of logits (V,): greedy at temperature 0, else sampled from the
    temperature- and top-p-shaped distribution with the request's generator; and its log-probability when
    the request asks for them."""
    r = item.request
    row = row.float()
    if r.temperature < TINY_TEMPERATURE:
        token = int(row.argmax())
    else:
        # Shifted so the best logit is 0: a tiny temperature sends the others to -inf, never inf - inf = nan.
        probs = torch.softmax((row - row.max()) / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < r.top_p
            keep[0] = True  # the most likely token always stays, however small top_p is
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        token = int(torch.multinomial(probs, 1, generator=item.generator))
    if r.logprobs is None:
        return token, None
    logp = torch.log_softmax(row, dim=-1)
    top: list[tuple[int, float]] = []
    if r.logprobs > 0:
        values, ids = logp.topk(r.logprobs)
        top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return token, TokenLogprob(token, float(logp[token]), top)


class BatchingEngine(Engine):
    """Iteration-level dynamic batching on the event loop: each step hands every active request to
    :meth:`_step` (run on a worker thread) and streams the token it returns for each."""

    def __init__(self, *, tokenizer: Any, max_model_len: int, max_batch: int = 32, threads: int = 1) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.threads = threads
        self.eos = self.tokenizer.eos_token_id
        self._pending: list[_Active] = []
        self._active: list[_Active] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        torch.set_num_threads(self.threads)
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._run())

    def check(self) -> None:
        """Raise ``EngineError`` unless the batching loop is running."""
        if self._loop_task is None or self._loop_task.done():
            raise EngineError(f"{self.name} engine loop is not running")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def stream(self, request: Request) -> AsyncIterator[Delta]:
        if self._wake is None:
            raise EngineError("engine not started")
        gen = None
        if request.temperature > 0:
            gen = torch.Generator().manual_seed(request.seed if request.seed is not None else time.time_ns())
        item = _Active(request, list(request.prompt_ids), asyncio.Queue(), gen)
        self._pending.append(item)
        self._wake.set()
        try:
            while True:
                out = await item.queue.get()
                if isinstance(out, Exception):
                    raise out
                yield out
                if out.finish_reason is not None:
                    return
        finally:  # a caller that hangs up (or stops at a stop string) frees its batch slot
            if item in self._pending:
                self._pending.remove(item)
            if item in self._active:
                self._active.remove(item)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._active and not self._pending:
                self._wake.clear()
                await self._wake.wait()
            room = self.max_batch - len(self._active)
            self._active += self._pending[:room]
            del self._pending[:room]
            batch = list(self._active)
            try:
                picked = await asyncio.to_thread(self._step, batch)
            except Exception as exc:  # a failed step fails its requests, never the engine
                for item in batch:
                    item.queue.put_nowait(EngineError(f"generation failed: {exc}"))
                self._active = [a for a in self._active if a not in batch]
                continue
            for item, (token, logprob) in zip(batch, picked, strict=True):
                item.generated.append(token)
                item.ids.append(token)
                text = self.tokenizer.decode(item.generated, skip_special_tokens=True)
                finish = None
                if token == self.eos or token in item.request.stop_token_ids:
                    finish = "stop"
                elif len(item.generated) >= item.request.max_tokens or len(item.ids) >= self.max_model_len:
                    finish = "length"
                lps = None if logprob is None else [logprob]
                item.queue.put_nowait(Delta([token], text[len(item.text) :], finish, lps))
                item.text = text
                if finish is not None and item in self._active:
                    self._active.remove(item)

    def _step(self, batch: list[_Active]) -> list[tuple[int, TokenLogprob | None]]:
        """The next token of every request in ``batch`` (each item's ``ids`` holds prompt + generated)."""
        raise NotImplementedError


class TorchEngine(BatchingEngine):
    """transformers model, batched at the iteration level; each step recomputes every prefix (no cache)."""

    name = "torch"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_batch: int = 32,
        max_model_len: int | None = None,
        threads: int = 1,
        **_: Any,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
        super().__init__(
            tokenizer=AutoTokenizer.from_pretrained(model_dir),
            max_model_len=max_model_len or int(self.model.config.max_position_embeddings),
            max_batch=max_batch,
            threads=threads,
        )

    @torch.inference_mode()
    def _step(self, batch: list[_Active]) -> list[tuple[int, TokenLogprob | None]]:
        width = max(len(a.ids) for a in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(a.ids)) + a.ids for a in batch])
        mask = torch.tensor([[0] * (width - len(a.ids)) + [1] * len(a.ids) for a in batch])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :]
        return [pick(row, item) for row, item in zip(logits, batch, strict=True)]
