"""Grounding embeddings remembered by text, so that a repeated answer costs no forward.

BIGRec grounding embeds each generated title with the base model (a whole-model forward of the
title, about a decode step at batch 1) before the L2 search. Most answers are texts the service has
embedded before:

- a catalogue title: its embedding is the index's own row for that title (the index was built by the
  same embedder, so this is the same vector up to floating point: padding in the build's batches);
- an answer given before (generators repeat themselves: the quick-start one answers "Cinderella
  (1950)" to a third of the users): a bounded LRU of the last ``max_recent`` distinct texts.

Only the texts in neither are embedded, each distinct text once per call. The memo is valid as long
as the index is (the same embedder: the index's fingerprint covers the lower layers and the dtype; the
base upper layers never change). One model thread uses it (``service/worker.py``), as does the
evaluator; it is not locked.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from model.grounding import CatalogueIndex, Embedder, _to_numpy


class GroundingMemo:
    """Wraps an ``Embedder`` (texts -> [n, H]) with the catalogue's rows and an LRU of recent texts."""

    def __init__(self, titles: Sequence[str], index: CatalogueIndex, max_recent: int = 10_000):
        if len(titles) != index.n_items:
            raise ValueError(f"{len(titles)} titles for an index of {index.n_items} items")
        if max_recent < 0:
            raise ValueError(f"max_recent must be >= 0, got {max_recent}")
        self.index = index
        self.max_recent = max_recent
        self._rows: dict[str, int] = {}
        for i, t in enumerate(titles):
            self._rows.setdefault(t, i)  # a title listed twice: its first item (same text, same vector)
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> [H] float32, oldest first
        # texts served each way (metrics; they add up to every text asked): an index row, a remembered
        # vector, a new forward (a text asked twice in one call shares its forward)
        self.catalogue_hits = self.recent_hits = self.embedded = 0

    def __len__(self) -> int:
        """Texts in the LRU (catalogue titles not counted)."""
        return len(self._recent)

    def wrap(self, embed: Embedder) -> Embedder:
        """An embedder that answers from the memo and calls ``embed`` once for the distinct misses."""

        def remembered(texts: Sequence[str]) -> np.ndarray:
            return self.embed(texts, embed)

        return remembered

    def embed(self, texts: Sequence[str], embed: Embedder) -> np.ndarray:
        """[n, H] float32 embeddings of ``texts``."""
        out = np.empty((len(texts), self.index.dim), dtype=np.float32)
        rows: list[tuple[int, int]] = []  # (position, catalogue row)
        missing: dict[str, list[int]] = {}  # text -> positions
        for j, t in enumerate(texts):
            r = self._rows.get(t)
            if r is not None:
                rows.append((j, r))
            elif t in self._recent:
                self._recent.move_to_end(t)
                out[j] = self._recent[t]
                self.recent_hits += 1
            else:
                missing.setdefault(t, []).append(j)
        if rows:
            at = np.fromiter((j for j, _ in rows), dtype=np.int64)
            out[at] = self.index.vectors([r for _, r in rows])
            self.catalogue_hits += len(rows)
        if missing:
            new = list(missing)
            vecs = _to_numpy(embed(new))
            if vecs.shape != (len(new), self.index.dim):
                raise ValueError(f"embedder returned shape {tuple(vecs.shape)} for {len(new)} texts; "
                                 f"expected ({len(new)}, {self.index.dim})")
            for t, v in zip(new, vecs):
                out[missing[t]] = v
                self._remember(t, v)
            self.embedded += sum(len(at) for at in missing.values())
        return out

    def _remember(self, text: str, vec: np.ndarray) -> None:
        if self.max_recent == 0:
            return
        self._recent[text] = vec.copy()
        while len(self._recent) > self.max_recent:
            self._recent.popitem(last=False)
