"""The rows being decoded together: their KV cache, masks, pending logits, tokens and stop rules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from model.generation.kv_cache import concat_rows
from model.generation.stop import StopAfterFirstLine

Finished = list[tuple[Any, list[int]]]  # (tag, new tokens) of the rows that left a batch


def drafts_for(rows: int, drafter: Any, draft_tokens: int, draft_max_rows: int) -> bool:
    """The speculative-step policy: drafted tokens are fed while at most ``draft_max_rows`` rows decode."""
    return drafter is not None and draft_tokens >= 1 and rows <= draft_max_rows


@dataclass(eq=False)
class DecodeBatch:
    """Rows being decoded together (``prefill.complete``, ``decode.step``).

    Row j has a KV cache row, an attention mask row (0 = padding: rows of different lengths share
    one sequence axis), the position id of its last token, the scores of its next token, the new
    tokens so far, a budget and a stop rule, its caller's ``tag`` and its search: None for greedy
    decoding, else the ``beams.TrieBeams`` of its request, whose live beams are consecutive rows
    (they share the request's tag). Rows leave when finished (``step``) and others join between
    steps (``merge``); neither changes any other row's tokens."""

    cache: DynamicCache  # per layer [n, kv_heads, T, d]
    mask: torch.Tensor  # [n, T]
    last: torch.Tensor  # [n]
    logits: torch.Tensor  # [n, V] float32
    tokens: list[list[int]]
    tags: list[Any]
    max_new: list[int]
    stop_lines: list[bool]  # the row ends with its answer line (``stop.StopAfterFirstLine``)
    # speculative steps (``speculative.py``): while the batch has at most ``draft_max_rows`` rows, each
    # step also checks up to ``draft_tokens`` tokens per row guessed by ``drafter`` (``draft.py``)
    drafter: Any = None
    draft_tokens: int = 0
    draft_max_rows: int = 1
    searches: list[Any] | None = None  # per row: None (greedy) or its request's beam search

    def __post_init__(self) -> None:
        if self.searches is None:
            self.searches = [None] * len(self.tags)

    @property
    def rows(self) -> int:
        return len(self.tags)

    @property
    def requests(self) -> int:
        """Requests being decoded: greedy rows, and beam searches counted once each."""
        return sum(1 for j, s in enumerate(self.searches) if s is None or j == 0 or self.searches[j - 1] is not s)

    @property
    def drafting(self) -> bool:
        """Does the next forward feed drafted tokens (the policy: few enough rows decode)?"""
        return (drafts_for(self.rows, self.drafter, self.draft_tokens, self.draft_max_rows)
                and all(s is None for s in self.searches))  # beam rows take no drafts

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order; a row listed twice is copied: a beam that branches)."""
        keep = list(keep)
        if keep == list(range(self.rows)):  # no copy of the cache (beams that each took one token)
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(idx.to(self.mask.device))
        self.mask, self.last, self.logits = self.mask[idx.to(self.mask.device)], self.last[idx], self.logits[idx]
        self.tokens = [list(self.tokens[j]) for j in keep]
        for name in ("tags", "max_new", "stop_lines", "searches"):
            old = getattr(self, name)
            setattr(self, name, [old[j] for j in keep])

    def _live_columns(self) -> torch.Tensor | None:
        """Positions some row attends to ([t'], CPU), or None when that is all of them."""
        live = self.mask.bool().any(0).cpu()  # [T]
        return None if bool(live.all()) else live.nonzero()[:, 0]

    def merge(self, other: "DecodeBatch") -> None:
        """Append ``other``'s rows (prefilled, next token pending): the shorter side is left-padded
        (masked) to the longer's length, so both keep their positions and attention."""
        if not self.rows:  # every row has left: the batch becomes ``other``
            self.__dict__.update(other.__dict__)
            return
        if self.drafter is None:  # the drafting policy is the batch's; it takes the first one offered
            self.drafter, self.draft_tokens, self.draft_max_rows = other.drafter, other.draft_tokens, other.draft_max_rows
        # positions masked for every row of a side (left by finished rows, padding, rejected draft
        # tokens) are dropped while copying: the batch's sequence axis would otherwise only grow as
        # long as rows keep joining, and every merge and attention would pay for it. Position ids are
        # explicit (``last``), so nothing else changes.
        cols = [self._live_columns(), other._live_columns()]
        masks = [m if c is None else m[:, c.to(m.device)] for m, c in ((self.mask, cols[0]), (other.mask, cols[1]))]
        t = max(m.shape[1] for m in masks)
        pad = lambda m: torch.nn.functional.pad(m, (t - m.shape[1], 0))  # noqa: E731  [n, T] -> [n, t]
        merged = (concat_rows([self.cache, other.cache], columns=cols), torch.cat([pad(m) for m in masks], 0),
                  torch.cat([self.last, other.last], 0), torch.cat([self.logits, other.logits], 0))
        self.cache, self.mask, self.last, self.logits = merged  # all or nothing: a failure above changes nothing
        for name in ("tokens", "tags", "max_new", "stop_lines", "searches"):
            getattr(self, name).extend(getattr(other, name))


def finishes(lm, batch: DecodeBatch, j: int, tok: int, stop: StopAfterFirstLine | None) -> bool:
    """Would ``tok`` finish row ``j`` (eos, its token budget, or the end of its answer line)?"""
    toks = batch.tokens[j]
    return (tok == lm.eos_id or len(toks) + 1 >= batch.max_new[j]
            or (batch.stop_lines[j] and stop.ends_with_stop([*toks, tok])))


def take(lm, batch: DecodeBatch, j: int, tok: int, stop: StopAfterFirstLine | None) -> bool:
    """Append ``tok`` to row ``j``'s tokens; is the row finished?"""
    done = finishes(lm, batch, j, tok, stop)
    batch.tokens[j].append(tok)
    return done


def leave(batch: DecodeBatch, done: Sequence[bool]) -> Finished:
    """Drop the finished rows from ``batch``; their (tag, tokens). A drafter that learns from
    answers (``observe``) sees each finished row's tokens."""
    finished = [(batch.tags[j], batch.tokens[j]) for j in range(len(done)) if done[j]]
    if finished:
        batch.select([j for j in range(len(done)) if not done[j]])
        observe = getattr(batch.drafter, "observe", None)
        for _, tokens in finished if observe is not None else ():
            observe(tokens)
    return finished
