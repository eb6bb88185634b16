"""The ONNX Runtime engine: an export of the model (edgeray.model.export_onnx; fp32, int8 or int4) with a
KV cache per request, for device- and micro-tier nodes that hold no vLLM.

    engine = OnnxEngine("exports/tiny-int8")     # a directory `edgeray export onnx` wrote
    await engine.start()
    async for delta in engine.stream(Request(prompt_ids=[1, 5, 9], max_tokens=16)): ...

It shares the torch engine's iteration-level batching (edgeray.serve.engines.BatchingEngine) and HTTP
surface (edgeray.serve.torch_api). A step prefills each new request alone (its whole prompt in one call)
and then decodes every running request in one batched call: the caches, of different lengths, are
left-padded to the longest and the padding is masked out, so each row attends only to its own tokens; each
request keeps only its real cache entries between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeray.model.export_onnx import ExportError, ExportInfo, io_names, load_info
from edgeray.serve.engines import BatchingEngine, EngineError, TokenLogprob, _Active, pick


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def is_export(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` is an ONNX export edgeray wrote (it holds the export manifest)."""
    from edgeray.model.export_onnx import MANIFEST

    return (Path(model_dir) / MANIFEST).exists()


RUNTIME_BYTES = 640 << 20
"""Resident memory of the onnx engine's server before its model: 589 MB RSS measured (psutil) for
``python -m edgeray.serve.torch_api --engine onnx`` serving the tiny int8 export on this machine (Python,
ONNX Runtime, torch and the tokenizer), rounded up."""

MAX_BATCH = 32
"""Requests one onnx engine decodes at once (the server's default)."""


@dataclass(frozen=True)
class MemoryNeed:
    """What one onnx replica needs resident, in bytes: runtime + weights (held twice: ONNX Runtime keeps the
    initializers and its pre-packed copies) + the KV cache of ``MAX_BATCH`` full-length requests."""

    runtime: int
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.runtime + 2 * self.weights + self.kv_cache

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"{self.total / mib:.0f} MiB (runtime {self.runtime / mib:.0f} + weights 2 x "
            f"{self.weights / mib:.1f} + KV cache {self.kv_cache / mib:.1f})"
        )


def memory_need(info: ExportInfo, max_model_len: int, max_batch: int = MAX_BATCH) -> MemoryNeed:
    kv = max_batch * max_model_len * info.layers * 2 * info.kv_heads * info.head_dim * 4
    return MemoryNeed(RUNTIME_BYTES, info.weight_bytes, kv)


class OnnxSession:
    """The exported decoder on ONNX Runtime's CPU execution provider: ``prefill`` and batched ``decode``."""

    def __init__(self, export_dir: str | Path, *, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(f"the onnx engine needs onnxruntime ({exc}): pip install onnxruntime") from exc
        try:
            self.info = load_info(export_dir)
        except ExportError as exc:
            raise EngineError(str(exc)) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(self.info.path, options, providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = io_names(self.info.layers)
        self.cache_names = self.inputs[3:]

    def run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed |= dict(zip(self.cache_names, past, strict=True))
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.info.kv_heads, 0, self.info.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.cache_names]

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the last prompt position (V,) and the prompt's cache (one (1, kv, T, d) per name)."""
        t = len(ids)
        logits, cache = self.run(
            np.asarray([ids], np.int64),
            np.ones((1, t), np.int64),
            np.arange(t, dtype=np.int64)[None],
            self.empty_cache(1),
        )
        return logits[0, -1], cache

    def decode(
        self, last: list[int], caches: list[list[np.ndarray]]
    ) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """One token for each row: ``last[i]`` continues ``caches[i]``. Returns logits (B, V) and each row's
        cache grown by one position (padding removed)."""
        lengths = [c[0].shape[2] for c in caches]
        longest = max(lengths)
        b = len(last)
        past = []
        for j in range(len(self.cache_names)):
            block = np.zeros((b, self.info.kv_heads, longest, self.info.head_dim), np.float32)
            for i, c in enumerate(caches):
                block[i, :, longest - lengths[i] :] = c[j][0]
            past.append(block)
        mask = np.zeros((b, longest + 1), np.int64)
        for i, n in enumerate(lengths):
            mask[i, longest - n :] = 1
        logits, present = self.run(
            np.asarray(last, np.int64)[:, None], mask, np.asarray(lengths, np.int64)[:, None], past
        )
        grown = [[p[i : i + 1, :, longest - n :] for p in present] for i, n in enumerate(lengths)]
        return logits[:, -1], grown


class OnnxEngine(BatchingEngine):
    """:class:`OnnxSession` behind the batching loop and the OpenAI surface of the torch engine."""

    name = "onnx"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_batch: int = 32,
        max_model_len: int | None = None,
        threads: int = 1,
        **_: Any,
    ) -> None:
        from transformers import AutoTokenizer

        self.onnx = OnnxSession(model_dir, threads=threads)
        super().__init__(
            tokenizer=AutoTokenizer.from_pretrained(model_dir),
            max_model_len=max_model_len or self.onnx.info.max_position_embeddings,
            max_batch=max_batch,
            threads=threads,
        )

    def _step(self, batch: list[_Active]) -> list[tuple[int, TokenLogprob | None]]:
        rows: dict[int, np.ndarray] = {}
        running = []
        for i, item in enumerate(batch):
            if item.state is None:  # new: the whole prompt in one call
                rows[i], item.state = self.onnx.prefill(item.ids)
            else:
                running.append(i)
        if running:
            logits, grown = self.onnx.decode(
                [batch[i].ids[-1] for i in running], [batch[i].state for i in running]
            )
            for k, i in enumerate(running):
                rows[i], batch[i].state = logits[k], grown[k]
        return [pick(torch.from_numpy(np.ascontiguousarray(rows[i])), item) for i, item in enumerate(batch)]
