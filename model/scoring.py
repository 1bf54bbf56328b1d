"""Eq. 5's scores: log P(target title | prompt with the slot filled by each candidate memory element).

Label annotation (``model/train/labels.py``) scores every candidate element of a sample's memory; the
prompt's layers 1..L and the upper layers over the prefix before the slot run once and are shared.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from model.generation.kv_cache import expand_prefix
from model.prompts import PromptIds


@torch.no_grad()
def target_logprob(
    lm,
    prompt: PromptIds,
    target_ids: Sequence[int],
    slot_vectors: torch.Tensor | None,
    chunk_size: int = 32,
) -> torch.Tensor:
    """[E] float32: sum_i log P(target_i | prompt with the slots filled by candidate e, target_<i).

    ``slot_vectors`` [E, S, H] (or [E, H] when S = 1); ``None`` scores the placeholder itself
    (E = 1, the no-memory term log P(y | z_t) of Eq. 5). Cost: layers 1..L run once over
    prompt+target; layers L+1..N run once over the prefix before the first slot (its KV cache is
    shared), then over the rest for the E candidates in chunks; the LM head only at the target
    positions.
    """
    target_ids = list(target_ids)
    if not target_ids:
        raise ValueError("target_ids is empty")
    seq = list(prompt.input_ids) + target_ids
    n_prompt, n_total = len(prompt.input_ids), len(seq)
    slots = list(prompt.slot_positions)
    if slot_vectors is not None:
        if not slots:
            raise ValueError("slot_vectors given but the prompt has no slot")
        if slot_vectors.ndim == 2:
            slot_vectors = slot_vectors[:, None, :]
        if slot_vectors.ndim != 3 or tuple(slot_vectors.shape[1:]) != (len(slots), lm.hidden_size):
            raise ValueError(
                f"slot_vectors must be [E, S={len(slots)}, H={lm.hidden_size}], got {tuple(slot_vectors.shape)}"
            )
        if slot_vectors.shape[0] == 0:
            return torch.zeros(0)
    p0 = min(slots) if slots else n_prompt - 1  # the first position whose upper states vary
    dev = lm.device
    ids = torch.tensor([seq], dtype=torch.long, device=dev)
    ones = torch.ones_like(ids)
    h_low = lm.lower_forward(ids, ones)  # [1, T, H]

    # Upper layers over the shared prefix [0, p0), once, into a cache of layers L+1..N.
    prefix = DynamicCache(config=lm.config)
    pos = torch.arange(n_total, device=dev)[None]  # [1, T]
    if p0 > 0:
        hp = h_low[:, :p0]
        lm.run_layers(lm.upper_layers(), hp, lm.causal_mask(hp, ones[:, :p0], pos[:, :p0], prefix, layer_idx=lm.cut),
                     pos[:, :p0], prefix)

    tgt = torch.tensor(target_ids, device=dev)  # [Y]
    first = n_prompt - 1 - p0  # suffix index of the state that predicts target token 0
    e_total = 1 if slot_vectors is None else slot_vectors.shape[0]
    rel_slots = torch.tensor([q - p0 for q in slots], dtype=torch.long, device=dev)
    out = []
    end = n_total - 1  # the last target token predicts nothing: positions [p0, T-1) suffice
    for start in range(0, e_total, chunk_size):
        c = min(chunk_size, e_total - start)
        hs = h_low[:, p0:end].expand(c, -1, -1)  # [c, T-1-p0, H]
        if slot_vectors is not None:
            vec = slot_vectors[start:start + c]
            hs = lm.replace_slots(hs, rel_slots[None].expand(c, -1), vec)
        cache = DynamicCache(config=lm.config)
        if p0 > 0:  # the prefix's upper-layer KV, one copy per candidate
            expand_prefix(cache, [None] * lm.cut + [(layer.keys, layer.values) for layer in prefix.layers[lm.cut:]], c)
        spos = pos[:, p0:end].expand(c, -1)
        mask = lm.causal_mask(hs, torch.ones(c, end, dtype=torch.long, device=dev), spos, cache, layer_idx=lm.cut)
        hs = lm.run_layers(lm.upper_layers(), hs, mask, spos, cache)
        logits = lm.head(hs[:, first:first + len(target_ids)])  # [c, Y, V], in the model's dtype like the served forward
        picked = logits.gather(-1, tgt[None, :, None].expand(c, -1, 1))[..., 0].float()  # [c, Y]
        lse = torch.logsumexp(logits.float(), dim=-1)  # [c, Y]
        out.append((picked - lse).sum(-1).cpu())
    return torch.cat(out)
