"""Export a causal LM edgeray writes (Llama presets, Mixtral MoE) to ONNX with a KV cache, optionally
quantised for the device tier (ONNX Runtime's CPU execution provider).

    from edgeray.model.export_onnx import export_onnx
    info = export_onnx("runs/x/checkpoint", "out/tiny-onnx", quant="int8")   # fp32 | int8 | int4
    info.path, info.weight_bytes, info.fp32_bytes

The graph is one step of a decoder with an explicit cache, so one model serves prefill and decode:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past.{i}.key / past.{i}.value (B, kv_heads, P, head_dim) float32 for every layer i (P may be 0)
    outputs  logits (B, T, vocab) float32, present.{i}.key / present.{i}.value (B, kv_heads, P+T, head_dim)

It is traced from :class:`CachedDecoder`, which recomputes the transformers model's forward from the same
modules (embedding, RMSNorms, projections, MLP, router) with the cache as plain tensors, so the graph
holds only operators ONNX Runtime runs everywhere; the tests check it against transformers' own forward.
Mixtral's sparse block is computed densely (every expert, weighted by its routing weight, zero when not in
the token's top-k): the same sum for the few experts edgeray's presets have, and a static graph.

Quantisation (ONNX Runtime's own tools):

- ``int8``: dynamic int8 (``quantize_dynamic``): int8 weights for every MatMul and the embedding Gather,
  activations quantised per call;
- ``int4``: weight-only 4-bit blocks (``MatMulNBitsQuantizer``, block 32) for the MatMuls, and int8 for
  the embedding.

Each export writes ``model.onnx``, the tokenizer, the source ``config.json`` and ``onnx_export.json``
(format, sizes, the I/O names above) into ``out``, atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeray.atomic import write_dir_atomic
from edgeray.errors import EdgerayError

QUANTS = ("fp32", "int8", "int4")
OPSET = 17
MANIFEST = "onnx_export.json"


class ExportError(EdgerayError):
    """The checkpoint cannot be exported (not a causal LM edgeray writes, missing package, bad option)."""


@dataclass(frozen=True)
class ExportInfo:
    path: str
    """``model.onnx`` inside the export directory."""
    quant: str
    architecture: str
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    weight_bytes: int
    """Bytes of the model file(s) on disk."""
    fp32_bytes: int
    """Bytes of the same model's parameters in float32 (the torch checkpoint's size)."""
    eos_token_id: int | None
    pad_token_id: int | None


class CachedDecoder(nn.Module):
    """One decoder step of a transformers Llama or Mixtral with the KV cache as explicit tensors."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        cfg: Any = model.config
        self.arch = type(model).__name__
        if self.arch not in ("LlamaForCausalLM", "MixtralForCausalLM"):
            raise ExportError(f"{self.arch}: export supports LlamaForCausalLM and MixtralForCausalLM")
        self.model: Any = model
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.layers = int(cfg.num_hidden_layers)
        rotary = model.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.top_k = int(getattr(cfg, "num_experts_per_tok", 0))

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.rope_scaling)[:, None], (emb.sin() * self.rope_scaling)[:, None]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _moe(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = torch.softmax(F.linear(flat, mlp.gate.weight).float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(1, idx, top).to(flat.dtype)  # (N, E): 0 outside the top-k
        out = torch.zeros_like(flat)
        for e in range(dense.shape[1]):
            gate, up = F.linear(flat, mlp.experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(mlp.experts.act_fn(gate) * up, mlp.experts.down_proj[e])
            out = out + y * dense[:, e : e + 1]
        return out.reshape(shape)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m: Any = self.model.model
        h = m.embed_tokens(input_ids)  # (B, T, C)
        b, t = input_ids.shape[0], input_ids.shape[1]
        s = attention_mask.shape[1]  # P + T
        q_pos = torch.arange(t, device=h.device) + (s - t)
        allowed = torch.arange(s, device=h.device)[None, :] <= q_pos[:, None]  # (T, S) causal
        allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
        bias = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        cos, sin = self._rope(position_ids)
        group = self.heads // self.kv_heads
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, kv, S, d)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            kk = k[:, :, None].expand(b, self.kv_heads, group, s, self.head_dim).reshape(b, self.heads, s, -1)
            vv = v[:, :, None].expand(b, self.kv_heads, group, s, self.head_dim).reshape(b, self.heads, s, -1)
            scores = torch.matmul(q, kk.transpose(2, 3)) * attn.scaling + bias
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out = torch.matmul(probs, vv).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
            h = h + attn.o_proj(out)
            x = layer.post_attention_layernorm(h)
            h = h + (self._moe(layer.mlp, x) if self.arch == "MixtralForCausalLM" else layer.mlp(x))
        logits = self.model.lm_head(m.norm(h))
        return (logits, *presents)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph."""
    past = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _load(checkpoint: Path) -> tuple[Any, Any]:
    if not (checkpoint / "config.json").exists():
        raise ExportError(f"{checkpoint}: not a checkpoint directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{checkpoint}: cannot load the checkpoint: {exc}") from exc
    return model, tokenizer


def _onnx_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".onnx", ".data"))


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantisers log every node at INFO on the root logger (importing its 4-bit quantiser
    even sets the root logger to INFO and adds a handler): silence them and put the root logger back."""
    root = logging.getLogger()
    saved, handlers = root.level, list(root.handlers)
    try:
        with contextlib.suppress(ImportError):
            import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
        root.setLevel(logging.ERROR)
        yield
    finally:
        root.setLevel(saved)
        root.handlers[:] = handlers


def _quantize(fp32: Path, out: Path, quant: str) -> None:
    with _quiet_quantizer():
        _quantize_now(fp32, out, quant)


def _quantize_now(fp32: Path, out: Path, quant: str) -> None:
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise ExportError(
            f"quantised export needs onnxruntime ({exc}): pip install 'edgeray[device]'"
        ) from exc
    if quant == "int8":
        quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"])
        return
    # int4: 4-bit weight blocks for the MatMuls, then int8 for the embedding (a Gather)
    model = onnx.load(str(fp32))
    q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
    q.process()
    mid = out.with_name("int4-matmul.onnx")
    q.model.save_model_to_file(str(mid), use_external_data_format=False)
    quantize_dynamic(mid, out, weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
    mid.unlink()


def export_onnx(checkpoint: str | Path, out: str | Path, *, quant: str = "fp32") -> ExportInfo:
    """Export ``checkpoint`` (a transformers directory edgeray wrote) to ``out``; see the module doc."""
    if quant not in QUANTS:
        raise ExportError(f"quant {quant!r}: valid formats are {list(QUANTS)}")
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx package ({exc}): pip install 'edgeray[device]'"
        ) from exc
    checkpoint, out = Path(checkpoint), Path(out)
    model, tokenizer = _load(checkpoint)
    decoder = CachedDecoder(model).eval()
    cfg = model.config
    inputs, outputs = io_names(decoder.layers)
    ids = torch.tensor([[1, 5, 9], [3, 4, 7]])
    mask = torch.ones(2, 5, dtype=torch.long)
    pos = torch.tensor([[2, 3, 4], [2, 3, 4]])
    past = [torch.zeros(2, decoder.kv_heads, 2, decoder.head_dim) for _ in range(2 * decoder.layers)]
    dynamic: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    dynamic |= {n: {0: "batch", 2: "past"} for n in inputs[3:]}
    dynamic |= {n: {0: "batch", 2: "total"} for n in outputs[1:]}
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent) as scratch:
            target = tmp / "model.onnx" if quant == "fp32" else Path(scratch) / "fp32.onnx"
            with torch.no_grad():
                torch.onnx.export(
                    decoder,
                    (ids, mask, pos, *past),
                    str(target),
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_axes=dynamic,
                    opset_version=OPSET,
                    dynamo=False,
                    do_constant_folding=True,
                )
            if quant != "fp32":
                _quantize(target, tmp / "model.onnx", quant)
        tokenizer.save_pretrained(tmp)
        cfg.to_json_file(tmp / "config.json")
        info = _info(out, quant, decoder, cfg, tokenizer, _onnx_bytes(tmp), fp32_bytes)
        (tmp / MANIFEST).write_text(json.dumps(asdict(info), indent=2) + "\n")

    write_dir_atomic(out, fill)
    return load_info(out)


def _info(
    out: Path, quant: str, decoder: CachedDecoder, cfg: Any, tokenizer: Any, weight_bytes: int, fp32: int
) -> ExportInfo:
    return ExportInfo(
        path=str(out / "model.onnx"),
        quant=quant,
        architecture=decoder.arch,
        layers=decoder.layers,
        kv_heads=decoder.kv_heads,
        head_dim=decoder.head_dim,
        vocab_size=int(cfg.vocab_size),
        max_position_embeddings=int(cfg.max_position_embeddings),
        weight_bytes=weight_bytes,
        fp32_bytes=fp32,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_info(export_dir: str | Path) -> ExportInfo:
    """The manifest of an export directory (raises :class:`ExportError` when it is not one)."""
    path = Path(export_dir) / MANIFEST
    if not path.exists():
        raise ExportError(
            f"{export_dir}: not an ONNX export of edgeray (no {MANIFEST}); run `edgeray export onnx`"
        )
    data = json.loads(path.read_text())
    data["path"] = str(Path(export_dir) / "model.onnx")
    return ExportInfo(**data)


def size_ratio(info: ExportInfo) -> float:
    """fp32 parameter bytes / bytes on disk."""
    return info.fp32_bytes / max(1, info.weight_bytes)


__all__ = ["QUANTS", "CachedDecoder", "ExportError", "ExportInfo", "export_onnx", "io_names", "load_info"]
