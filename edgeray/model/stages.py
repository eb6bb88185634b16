"""Split a Llama into pipeline stages whose chained outputs and gradients equal the whole model's.

    stages = split_llama(model, [2])          # stage 0: embedding + layers[:2]; stage 1: layers[2:] + norm + head
    h = stages[0](input_ids=ids, attention_mask=mask)                 # (B, T, C) hidden states
    logits = stages[1](hidden=h, attention_mask=mask)                 # (B, T, V)

Each stage rebuilds what the layers need from the 2-D attention mask alone: position ids (from the mask, so
left padding works), the rotary cos/sin, and the 4-D causal mask through transformers' own
``create_causal_mask`` (the function the full model uses), so no state crosses stages but hidden states.
Stages share the original modules (no copies); move or wrap them as needed.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: (B, T) -> (B, T), 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LlamaStage(nn.Module):
    """Layers ``[start, stop)`` of a Llama, plus the embedding (first stage) and norm + head (last)."""

    def __init__(self, model: LlamaForCausalLM, start: int, stop: int) -> None:
        super().__init__()
        n = model.config.num_hidden_layers
        if not 0 <= start < stop <= n:
            raise ValueError(f"stage layers [{start}, {stop}) must lie within [0, {n}) and be non-empty")
        self.config = model.config
        self.start, self.stop = start, stop
        self.is_first, self.is_last = start == 0, stop == n
        self.embed_tokens = model.model.embed_tokens if self.is_first else None
        self.layers = nn.ModuleList(model.model.layers[start:stop])
        self.rotary_emb = model.model.rotary_emb
        self.norm = model.model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None

    def forward(
        self,
        *,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        past_key_values: Any = None,
    ) -> torch.Tensor:
        """First stage takes ``input_ids`` (B, T); later stages take ``hidden`` (B, T, C). Returns hidden
        states (B, T, C), or logits (B, T, V) from the last stage. ``past_key_values``: a transformers
        ``Cache`` for this stage's layers (inference): the inputs continue the cached positions, and
        ``attention_mask`` covers the cached positions and the new ones."""
        if self.is_first:
            if input_ids is None:
                raise ValueError("the first stage needs input_ids")
            assert self.embed_tokens is not None
            hidden = self.embed_tokens(input_ids)  # (B, T, C)
        elif hidden is None:
            raise ValueError(f"stage [{self.start}, {self.stop}) needs the previous stage's hidden states")
        position_ids = positions_from_mask(attention_mask)[:, -hidden.shape[1] :]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            layer_idx=self.start if past_key_values is not None else None,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
            )
        if self.lm_head is not None and self.norm is not None:
            return self.lm_head(self.norm(hidden))  # (B, T, V)
        return hidden


def split_llama(model: LlamaForCausalLM, boundaries: list[int]) -> list[LlamaStage]:
    """Stages cut before each layer index in ``boundaries`` (strictly increasing, inside (0, n_layers))."""
    n = model.config.num_hidden_layers
    cuts = [0, *boundaries, n]
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        raise ValueError(f"boundaries {boundaries} must be strictly increasing within (0, {n})")
    return [LlamaStage(model, a, b) for a, b in itertools.pairwise(cuts)]
