"""The prefill of a group of prompts: planned by ``begin``, fed by ``advance``, finished by ``complete``.

    p = begin(lm, prompts, tags)            # padding, the shared head's KV, slot columns, a drafted guess
    while (z := advance(lm, p)) is None:    # chunks before the slot: their KV only
        pass
    vectors, use = pick(z)                  # z_t [B, H]: the caller chooses the memory (AutoMR's query)
    batch = complete(lm, p, vectors, use)   # the slot states replaced at layer L, layers L+1..N, the head

The memory pick is a value the caller computes from z_t, the layer-L state of each prompt's last token
(the same z_t as ``SplitLM.encode_lower`` of the prompt, without a second lower-layer pass), and hands
back to ``complete``. Rows without memory keep the placeholder's own states.

Chunks: a long prefill run whole stops every row that is decoding for its whole length; the service
feeds a background prefill a chunk at a time between decoding steps. Every chunk but the last runs
the whole model into the cache (no head) and ends before the first slot; the last one feeds the slots,
the prompts' last tokens (z_t) and the drafted guess, so the slot fill and the memory pick are those of
a whole prefill. Exact: attention and positions are those of one forward (tested).

The shared template head: prompts built from one template share their first ``n_shared`` tokens; its
KV is computed once per (head, weights) and copied to each prompt's row (``kv_cache.expand_prefix``),
and the padding moves after it so that every row's head sits at positions [0, head).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from model.generation.batch import DecodeBatch, drafts_for
from model.generation.forward import Lower, forward, lower, upper
from model.generation.kv_cache import expand_prefix, growing_cache
from model.generation.speculative import accept
from model.generation.stop import stop_rule
from model.llm import left_pad
from model.prompts import PromptIds


@dataclass(eq=False)
class Prefill:
    """A prefill in progress. The fed columns are the prompts (left-padded after the shared head, whose
    KV is in ``cache`` already) then the drafted guess; columns before ``at`` are in the cache."""

    ids: torch.Tensor  # [B, T + k] fed token ids: the prompts, then the k drafted guess tokens
    mask: torch.Tensor  # [B, T + k] attention mask (0 = padding)
    pos: torch.Tensor  # [B, T + k] position ids
    prompt_len: int  # T
    at: int  # the next column to feed
    final_from: int  # the first slot column (T without slots): chunks before the last end at or before it
    slots: torch.Tensor | None  # [B, S] each row's slot columns, None when the prompts have no slot
    cache: DynamicCache
    draft: list[int]
    tags: list[Any]
    max_new_tokens: int
    stop_at_newline: bool
    policy: dict  # the batch's drafting policy (DecodeBatch's drafter, draft_tokens, draft_max_rows)
    searches: list[Any] | None = None  # per row: None (greedy) or its beam search (DecodeBatch.searches)
    low: Lower | None = None  # the last chunk's layer-L states, between ``advance`` and ``complete``
    low_from: int = 0  # the column where the last chunk starts

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def fed(self) -> bool:
        """Has its last chunk run through layers 1..L (``complete`` is next)?"""
        return self.at >= self.ids.shape[1]


@torch.no_grad()
def begin(lm, prompts: Sequence[PromptIds], tags: Sequence | None = None, *, max_new_tokens: int = 32,
          stop_at_newline: bool = True, reuse_head: bool = True, drafter: Any = None, draft_tokens: int = 0,
          draft_max_rows: int = 1) -> Prefill:
    """The prefill of ``prompts``: ``tags`` name each row in what the decoding steps return (default:
    its index). Only the shared template head's cache is made here.

    ``drafter``, ``draft_tokens``, ``draft_max_rows``: the batch's speculative-step policy
    (``DecodeBatch``). When it drafts for these rows, the drafted start of an answer
    (``drafter.draft([], draft_tokens)``) is also fed after the prompts in the last chunk. Each row
    keeps it as far as it equals its greedy choices, as a speculative step does, so a right guess costs
    no decoding step; a row is never finished there (the token that would end it is left pending)."""
    b = len(prompts)
    if not b:
        raise ValueError("a prefill needs at least one prompt")
    tags = list(range(b)) if tags is None else list(tags)
    if len(tags) != b:
        raise ValueError(f"{len(tags)} tags for {b} prompts")
    policy = dict(drafter=drafter, draft_tokens=draft_tokens, draft_max_rows=draft_max_rows)
    draft = drafter.draft([], min(draft_tokens, max_new_tokens - 1)) if drafts_for(b, **policy) else []
    k = len(draft)
    spare = max(len(p.input_ids) for p in prompts) + k + max_new_tokens  # room for every fed token
    head = _shared_head(prompts) if reuse_head else 0
    ids, mask = _pad_after_head(lm, prompts, head)
    cache = _head_cache(lm, prompts[0].input_ids[:head], b, spare) if head else growing_cache(lm.config, spare=spare)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T] the left-padded batch's position ids
    columns = slot_columns(prompts, mask)
    if len({len(c) for c in columns}) > 1:
        raise ValueError("the prompts of one prefill must all have the same number of slots")
    slots = torch.tensor(columns, dtype=torch.long, device=lm.device) if columns[0] else None
    t = ids.shape[1]
    if k:  # [B, T + k]: the guesses follow every row's prompt
        guess = torch.tensor(draft, dtype=torch.long, device=ids.device).expand(b, -1)
        ids = torch.cat([ids, guess], 1)
        mask = torch.cat([mask, torch.ones_like(guess, dtype=mask.dtype)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(k, device=pos.device)], 1)
    return Prefill(ids=ids, mask=mask, pos=pos, prompt_len=t, at=head,
                   final_from=min((c for row in columns for c in row), default=t), slots=slots, cache=cache,
                   draft=draft, tags=tags, max_new_tokens=max_new_tokens, stop_at_newline=stop_at_newline,
                   policy=policy)


@torch.no_grad()
def advance(lm, p: Prefill, max_tokens: int | None = None) -> torch.Tensor | None:
    """Feed ``p``'s next chunk: at most ``max_tokens`` padded tokens (rows x columns; None: everything
    left). Returns None after a chunk before the slots; after the last chunk's layers 1..L, z_t
    [B, H] float32, the layer-L state of each prompt's last token: then ``complete`` finishes it."""
    if p.fed:
        raise ValueError("this prefill has already run")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    end = p.ids.shape[1] if max_tokens is None else p.at + max(1, max_tokens // p.rows)
    if end < p.final_from:  # a chunk before the slots: its KV only
        low = lower(lm, p.ids[:, p.at:end], p.mask[:, :end], p.pos[:, p.at:end], p.cache)
        lm.run_layers(lm.upper_layers(), low.h, low.mask, low.pos, p.cache)
        p.at = end
        return None
    p.low = lower(lm, p.ids[:, p.at:], p.mask, p.pos[:, p.at:], p.cache)
    p.low_from, p.at = p.at, p.ids.shape[1]
    return p.low.h[:, p.prompt_len - 1 - p.low_from].float()


@torch.no_grad()
def complete(lm, p: Prefill, slot_vectors: torch.Tensor | None = None, use: torch.Tensor | None = None) -> DecodeBatch:
    """Finish ``p`` after ``advance`` returned z_t: ``slot_vectors`` [B, S, H] replace the slot states of
    the rows in ``use`` [B] bool (None: every row; no vectors: every row keeps its placeholder), then
    layers L+1..N and the head run. Returns the rows as a ``DecodeBatch``, next token pending."""
    if p.low is None:
        raise ValueError("complete follows the advance that returned z_t")
    b, t, k = p.rows, p.prompt_len, len(p.draft)
    low, p.low = p.low, None
    if slot_vectors is not None:
        if p.slots is None:
            raise ValueError("slot vectors given for prompts without a slot")
        if slot_vectors.ndim == 3 and slot_vectors.shape[1] != p.slots.shape[1]:
            raise ValueError(f"the prompts have {p.slots.shape[1]} slots, slot_vectors give {slot_vectors.shape[1]}")
        if tuple(slot_vectors.shape) != (b, p.slots.shape[1], lm.hidden_size):
            raise ValueError(f"slot_vectors must be [B={b}, S={p.slots.shape[1]}, H={lm.hidden_size}], "
                             f"got {tuple(slot_vectors.shape)}")
        rows = torch.arange(b) if use is None else use.nonzero()[:, 0]
        if len(rows):
            low.h = lm.replace_slots(low.h, p.slots - p.low_from, slot_vectors, rows=rows)
    logits = upper(lm, low, keep=1 + k)  # [B, 1 + k, V]
    batch = DecodeBatch(cache=p.cache, mask=p.mask[:, :t], last=p.pos[:, t - 1], logits=logits[:, -1].float(),
                        tokens=[[] for _ in range(b)], tags=p.tags, max_new=[p.max_new_tokens] * b,
                        stop_lines=[p.stop_at_newline] * b, searches=p.searches, **p.policy)
    if k:
        stop = stop_rule(lm) if p.stop_at_newline else None
        accept(lm, batch, logits, [p.draft] * b, torch.ones(b, k, dtype=p.mask.dtype), lead=0, stop=stop,
               finish=False)
    return batch


def run(lm, p: Prefill, slot_vectors: torch.Tensor | None = None, use: torch.Tensor | None = None) -> DecodeBatch:
    """``p`` whole with fixed slot vectors (or none): ``advance`` to the end, then ``complete``."""
    while advance(lm, p) is None:
        pass
    return complete(lm, p, slot_vectors, use)


def slot_columns(prompts: Sequence[PromptIds], mask: torch.Tensor) -> list[list[int]]:
    """Each row's slot positions in the padded batch: shifted by its padding, which comes before the
    prompt or, with a shared head, right after it (slots always lie after the head)."""
    pads = (mask == 0).sum(-1).tolist()
    return [[pads[i] + q for q in p.slot_positions] for i, p in enumerate(prompts)]


def _shared_head(prompts: Sequence[PromptIds]) -> int:
    """Length of the template head all ``prompts`` share and whose KV cache may be reused (0: none).
    Every prompt must keep at least one token and all its slots after it."""
    n = min(p.n_shared for p in prompts)
    if n < 1:
        return 0
    first = list(prompts[0].input_ids[:n])
    for p in prompts:
        if len(p.input_ids) <= n or list(p.input_ids[:n]) != first or any(q < n for q in p.slot_positions):
            return 0
    return n


def _pad_after_head(lm, prompts: Sequence[PromptIds], head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask [B, T]: left-padded prompts, or with ``head`` > 0 ``head | padding | rest`` per row;
    the position ids (mask cumsum) and attention over the real tokens are those of the left-padded batch."""
    if head == 0:
        return left_pad([p.input_ids for p in prompts], lm.pad_id, lm.device)
    rest, mask = left_pad([p.input_ids[head:] for p in prompts], lm.pad_id, lm.device)
    lead = torch.tensor(prompts[0].input_ids[:head], dtype=torch.long, device=lm.device).expand(len(prompts), -1)
    return torch.cat([lead, rest], 1), torch.cat([torch.ones_like(lead), mask], 1)


# the head's KV per model: (head ids, the weights' storage and version counters) -> per-layer (keys, values)
_HEAD_KV: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _head_cache(lm, head_ids: Sequence[int], rows: int, spare: int) -> DynamicCache:
    """A fresh cache holding the KV of ``head_ids`` for ``rows`` rows, with room for ``spare`` more
    positions. The head's KV is computed once per (head, weights): the key includes every parameter's
    storage and in-place version counter, so tuning or loading weights recomputes it."""
    memo = _HEAD_KV.setdefault(lm, {})
    stamp = tuple((q.data_ptr(), q._version) for q in lm.model.parameters())
    key = (tuple(int(i) for i in head_ids), stamp)
    kv = memo.get(key)
    if kv is None:
        ids = torch.tensor([list(head_ids)], dtype=torch.long, device=lm.device)
        cache = DynamicCache(config=lm.config)
        forward(lm, ids, None, torch.arange(ids.shape[1], device=lm.device)[None], cache)  # no padding: no mask
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        while len(memo) >= 4:  # one head per prompt builder in practice
            memo.pop(next(iter(memo)))
        memo[key] = kv
    return expand_prefix(growing_cache(lm.config, spare=spare), kv, rows)


def prefill_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices in prefill groups: by increasing length, each group as long as its rows x its
    longest length stays within ``max_tokens`` (a row longer than that forms a group alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
