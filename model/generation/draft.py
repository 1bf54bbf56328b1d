"""Draft tokens for speculative greedy decoding, from the catalogue's own titles.

A decoding step at batch 1 reads every weight of the model to produce one token: it costs about the
same for 1 token as for 9 (BENCHMARKS §3.3). The generator answers
with a catalogue title most of the time, or something close to one, so the catalogue predicts much
of what it will say: ``"The Jungle Book (1995)"`` is one token at a time, but after ``"The Jungle``
the catalogue knows `` Book (199``. A step can then check several guessed tokens in one forward and
keep those the model itself would have chosen (``speculative.py``, in ``generation.step`` when the
batch holds a drafter): the answer is the model's greedy answer, token for token, in fewer forwards.

``NgramDrafter`` is an n-gram table over the catalogue's response sequences (``'"Title"' + eos``, the
tokens the generator is tuned to emit, ``PromptBuilder.response_ids``), longest context first
(3, 2, 1 previous tokens; the start of the answer counts as context). Each context maps to its most
frequent next token (ties: the smaller token id). It proposes a continuation by chaining its own
guesses, and matches mid-answer too, so a title wrapped in other words (``The movie 'East of Eden'``)
still drafts well. It also learns from the answers the model actually gives (``observe``, called by
``generation.step`` for every finished row): a bounded pool of their most recent contexts is looked up
before the catalogue's, so a generator's habits (``The new movie is ...``) are drafted too, as in
lookahead decoding's n-gram pool (Fu et al. 2024). Whatever is drafted, the answer is the model's
own. Measured on the ML-100K quick-start generator: ~0.5 forwards per answer token instead of 1 with
the catalogue alone (BENCHMARKS.md §3.3).

Storage: one sorted int64 key per distinct context (the context's n and tokens packed into 62 bits,
20 bits per token, so vocabularies up to ~1M tokens) and its next token: ~12 bytes per context, a few
MB for 100k titles, looked up by binary search. The pool of observed answers is a dict of at most
``max_recent`` contexts (~10 MB at the default 50,000).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

_BITS = 20
_START = (1 << _BITS) - 1  # the token before an answer's first one
MAX_VOCAB = _START  # token ids must be below this


def _key(n: int, ctx: Sequence[int]) -> int:
    """The key of the context ``ctx`` (exactly ``n`` tokens, ``_START`` for before the answer)."""
    k = n
    for t in ctx:
        k = (k << _BITS) | t
    return k


class NgramDrafter:
    """Most frequent next token after each 1-, 2- and 3-token context of ``sequences``."""

    def __init__(self, sequences: Sequence[Sequence[int]], orders: Sequence[int] = (3, 2, 1),
                 max_recent: int = 50_000) -> None:
        self.orders = tuple(sorted({int(n) for n in orders}, reverse=True))
        if not self.orders or self.orders[-1] < 1 or self.orders[0] > 3:
            raise ValueError(f"orders must be within 1..3, got {tuple(orders)}")
        if max_recent < 0:
            raise ValueError(f"max_recent must be >= 0, got {max_recent}")
        self.max_recent = max_recent  # may be changed later; the pool is trimmed at the next observe
        self._recent: OrderedDict[int, int] = OrderedDict()  # context key -> next token, oldest first
        keys: list[int] = []
        nexts: list[int] = []
        for seq in sequences:
            seq = [int(t) for t in seq]
            if any(t < 0 or t >= MAX_VOCAB for t in seq):
                raise ValueError(f"token ids must be in [0, {MAX_VOCAB}) for the draft table")
            padded = [_START] * self.orders[0] + seq
            for i in range(self.orders[0], len(padded)):
                for n in self.orders:
                    keys.append(_key(n, padded[i - n:i]))
                    nexts.append(padded[i])
        k = np.asarray(keys, dtype=np.int64)
        t = np.asarray(nexts, dtype=np.int64)
        if len(k):
            # count (key, next) pairs, then keep per key the most frequent next (ties: smaller token)
            order = np.lexsort((t, k))
            k, t = k[order], t[order]
            new_pair = np.r_[True, (k[1:] != k[:-1]) | (t[1:] != t[:-1])]
            starts = np.flatnonzero(new_pair)
            counts = np.diff(np.r_[starts, len(k)])
            pk, pt = k[starts], t[starts]
            order = np.lexsort((pt, -counts, pk))  # by key, then count desc, then token asc
            pk, pt = pk[order], pt[order]
            first = np.r_[True, pk[1:] != pk[:-1]]
            k, t = pk[first], pt[first]
        self.keys = k  # [C] sorted
        self.next = t.astype(np.int32)  # [C]

    @classmethod
    def from_titles(cls, titles: Sequence[str], encode: Callable[[str], list[int]],
                    max_recent: int = 50_000) -> "NgramDrafter":
        """The table of ``encode(title)`` for every title (``PromptBuilder.response_ids``)."""
        return cls([encode(t) for t in titles], max_recent=max_recent)

    @classmethod
    def from_prompt_builder(cls, titles: Sequence[str], builder, max_recent: int = 50_000) -> "NgramDrafter":
        """The table of the catalogue's answers as the generator is tuned to emit them
        (``builder.response_ids``: '"Title"' + eos), like ``TitleTrie.from_prompt_builder``."""
        return cls.from_titles(titles, builder.response_ids, max_recent)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.next.nbytes

    def observe(self, tokens: Sequence[int]) -> None:
        """Learn from an answer the model gave: each of its contexts now drafts what followed it there
        (the latest answer wins; the oldest contexts leave beyond ``max_recent``)."""
        if not self.max_recent:
            self._recent.clear()
            return
        seq = [int(t) for t in tokens]
        if any(t < 0 or t >= MAX_VOCAB for t in seq):
            return
        padded = [_START] * self.orders[0] + seq
        for i in range(self.orders[0], len(padded)):
            for n in self.orders:
                key = _key(n, padded[i - n:i])
                self._recent[key] = padded[i]
                self._recent.move_to_end(key)
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)

    def _next(self, ctx: list[int]) -> int | None:
        for n in self.orders:
            key = _key(n, ctx[-n:])
            if key in self._recent:
                return self._recent[key]
            j = int(np.searchsorted(self.keys, key))
            if j < len(self.keys) and self.keys[j] == key:
                return int(self.next[j])
        return None

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` guessed tokens after the answer so far ``tokens`` (fewer where no context of
        the table matches)."""
        ctx = [_START] * self.orders[0] + [int(t) for t in tokens]
        if any(t < 0 or t >= MAX_VOCAB for t in ctx[self.orders[0]:]):
            return []  # outside the table's token range: nothing can match
        out: list[int] = []
        while len(out) < k:
            nxt = self._next(ctx)
            if nxt is None:
                break
            out.append(nxt)
            ctx.append(nxt)
        return out
