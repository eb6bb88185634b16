"""Int8 weights for device-tier pipeline stages: frozen, per-row absmax, dequantized on the fly.

    quantize_int8_(stage)                  # every Linear and Embedding of the stage, in place
    int8_state(stage)                      # {"layers.0.mlp.up_proj.weight": dequantized fp32, ...}

A device (a phone, a small Jetson) cannot hold a stage's training state: fp32 weights, gradients and two
AdamW moments are 16 bytes per parameter. Quantized, the stage keeps each weight matrix as int8 with one
fp32 scale per output row (1 byte per weight + 4 per row) and does not train it; the RMSNorm weights (a few
hundred values) stay fp32 and trainable. Gradients still flow through the stage to the stages before it:
``d(x W^T)/dx = grad W`` with the dequantized ``W``. Rows are scaled so that their largest magnitude maps
to 127 (symmetric, round to nearest); re-quantizing a dequantized matrix gives back the same int8 values.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 scale per row): ``q * scale`` approximates ``weight`` within scale / 2 per entry."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` stored as int8 rows + fp32 row scales (bias, if any, stays fp32, frozen)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = _quantize_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(), self.bias)


class Int8Embedding(nn.Module):
    """A frozen ``nn.Embedding`` stored as int8 rows + an fp32 scale per token; looks rows up, then scales."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        q, scale = _quantize_rows(embedding.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.padding_idx = embedding.padding_idx

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scale[ids]


QUANTIZED = (Int8Linear, Int8Embedding)


def quantize_int8_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Embedding`` inside ``module`` by its int8 version, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        elif isinstance(child, nn.Embedding):
            setattr(module, name, Int8Embedding(child))
        else:
            quantize_int8_(child)
    return module


def int8_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The dequantized fp32 ``<name>.weight`` (and ``.bias``) of every int8 submodule: what the stage
    computes with, under the names the original ``nn.Linear`` / ``nn.Embedding`` had."""
    out: dict[str, torch.Tensor] = {}
    for name, child in module.named_modules():
        if isinstance(child, QUANTIZED):
            out[f"{name}.weight"] = child.dequantized()
            if isinstance(child, Int8Linear) and child.bias is not None:
                out[f"{name}.bias"] = child.bias.clone()
    return out


def stage_weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights occupy (parameters and buffers), as stored."""
    tensors = [*module.parameters(), *module.buffers()]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
