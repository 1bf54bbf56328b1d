"""One forward of the cut model over fed tokens and a KV cache, in two halves.

``lower`` runs the embeddings and layers 1..L and returns the layer-L states; the caller may replace
the slot states (``SplitLM.replace_slots``) before ``upper`` runs layers L+1..N, the final norm and
the LM head on the last positions. These are the operations of HF ``LlamaForCausalLM.forward``
(transformers 5.23, pinned): one causal mask made before any layer writes the cache, rotary position
embeddings, the decoder layers in order; written out so that the memory slot is a value passed
between the halves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class Lower:
    """Layer-L states of a forward, and what its upper half needs."""

    h: torch.Tensor  # [B, T, H]
    mask: Any  # the forward's causal mask (attention implementation's format)
    pos: torch.Tensor  # [B, T] position ids
    cache: DynamicCache | None


def lower(lm, ids: torch.Tensor, attention_mask: torch.Tensor | None, pos: torch.Tensor,
          cache: DynamicCache | None) -> Lower:
    """Layers 1..L over ``ids`` [B, T] at positions ``pos`` [B, T]; ``attention_mask`` [B, past + T]
    covers the cached positions too (0 = padding or a hole)."""
    h = lm.model.model.embed_tokens(ids)
    mask = lm.causal_mask(h, attention_mask, pos, cache)
    return Lower(lm.run_layers(lm.lower_layers(), h, mask, pos, cache), mask, pos, cache)


def upper(lm, low: Lower, keep: int = 1) -> torch.Tensor:
    """Logits [B, keep, V] at the last ``keep`` positions, from (slot-filled) layer-L states."""
    h = lm.run_layers(lm.upper_layers(), low.h, low.mask, low.pos, low.cache)
    return lm.head(h[:, -keep:])


def forward(lm, ids: torch.Tensor, attention_mask: torch.Tensor | None, pos: torch.Tensor, cache: DynamicCache | None,
            keep: int = 1) -> torch.Tensor:
    """``upper(lower(...))`` without a slot: logits [B, keep, V]."""
    return upper(lm, lower(lm, ids, attention_mask, pos, cache), keep)
