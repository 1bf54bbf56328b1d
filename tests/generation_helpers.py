"""Test-side helpers for the generation engine: references that do not use the engine's own code.

``slot_replaced`` patches HF's own forward (``model(...)``, ``model.generate``) with a temporary hook on
layer L, so a reference is a full HF forward with the slot states replaced: independent of the
engine, which passes the states between its two halves (``model/generation/forward.py``)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import StoppingCriteria

from model import generation
from model.generation import stop as stop_module


@contextmanager
def slot_replaced(split, positions: torch.Tensor, vectors: torch.Tensor, seq_len: int):
    """Within the block, the first forward of ``seq_len`` positions (the prefill) has the layer-L states
    at ``positions`` [B, S] replaced by ``vectors`` [B, S, H] (rows repeated for beams). Yields a dict
    whose ``"applied"`` says whether it ran."""
    state = {"applied": False}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if state["applied"] or h.shape[1] != seq_len:
            return None
        state["applied"] = True
        rep = h.shape[0] // positions.shape[0]
        pos = positions.repeat_interleave(rep, dim=0)
        vec = vectors.repeat_interleave(rep, dim=0).to(h.dtype)
        h = h.clone()
        h[torch.arange(h.shape[0])[:, None], pos] = vec
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = split.model.model.layers[split.cut - 1].register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


class StopCriterion(StoppingCriteria):
    """The engine's stop rule as an HF stopping criterion (new tokens start at ``start``)."""

    def __init__(self, rule, start: int):
        self.rule, self.start = rule, start

    def __call__(self, input_ids, scores, **kwargs):
        return self.rule.done(input_ids[:, self.start:].cpu())


@contextmanager
def stop_tables(split, newline, lead, content):
    """Within the block, ``split``'s stop rule uses these token tables."""
    stop_module._RULES[split] = stop_module.StopAfterFirstLine(newline, lead, content)
    try:
        yield
    finally:
        del stop_module._RULES[split]


def start(split, prompts, tags=None, slot_vectors=None, select=None, **kwargs) -> generation.DecodeBatch:
    """A whole prefill of ``prompts`` with fixed slot vectors (or none), or those that ``select(z_t)``
    returns with the rows that take them: its rows, next token pending."""
    p = generation.begin(split, prompts, tags, **kwargs)
    if select is None:
        return generation.run(split, p, slot_vectors)
    while (z := generation.advance(split, p)) is None:
        pass
    return generation.complete(split, p, *select(z))


def trie_beam_search(split, batch, trie, tables, excludes, num_beams: int, max_new_tokens: int = 64,
                     renormalize: bool = True, prior=None) -> list:
    """Beam search (``TrieBeams``) for every row of ``batch`` (row j = request j, prefilled, its next
    logits pending), stepped by ``generation.step`` as the service steps it. Per request, up to
    ``num_beams`` finished titles in score order. ``batch`` is consumed."""
    from model.generation.beams import TrieBeams

    if len(excludes) != batch.rows:
        raise ValueError(f"{len(excludes)} exclude sets for {batch.rows} rows")
    searches = [TrieBeams(trie, tables, ex, num_beams, max_new_tokens, renormalize, prior) for ex in excludes]
    batch.searches = list(searches)
    generation.decode(split, batch)
    return [s.result() for s in searches]
