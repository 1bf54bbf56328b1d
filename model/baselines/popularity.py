"""Most-popular baseline: rank the catalogue by how often each item was interacted with in training.

Counting rule (default ``count="targets"``): each TRAIN sample adds 1 to its target item. This counts
every interaction of the training period except each user's first ``K`` items (which are never a
target), and uses nothing from the validation or test period. ``count="interactions"`` instead counts
every distinct interaction ``(user, item, timestamp)`` seen in the train samples' histories or targets,
i.e. all interactions up to the train cut, each user's first ``K`` included.
Ties are broken by the lower catalogue index; the sample's history items are excluded.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from model.data.types import Sample
from model.eval.ranker import exclude_history, top_k


def popularity_counts(train_samples: Sequence[Sample], n_items: int, count: str = "targets") -> np.ndarray:
    """[n_items] interaction counts of the training period (see module doc for the two rules)."""
    counts = np.zeros(n_items, dtype=np.int64)
    if count == "targets":
        items = np.fromiter((s.target for s in train_samples), dtype=np.int64)
    elif count == "interactions":
        seen: set[tuple[str, int, int]] = set()
        for s in train_samples:
            seen.update((s.user_id, i, t) for i, t in zip(s.history, s.history_ts))
            seen.add((s.user_id, s.target, s.timestamp))
        items = np.fromiter((i for _, i, _ in seen), dtype=np.int64)
    else:
        raise ValueError(f"popularity count must be 'targets' or 'interactions', got {count!r}")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"train sample item index out of range [0, {n_items})")
    np.add.at(counts, items, 1)
    return counts


class PopularityRanker:
    name = "popularity"

    def __init__(self, counts: np.ndarray, count_rule: str = "targets"):
        self.counts = np.asarray(counts, dtype=np.float64)  # [n_items]
        self.count_rule = count_rule

    @classmethod
    def fit(cls, train_samples: Sequence[Sample], n_items: int, count: str = "targets") -> "PopularityRanker":
        return cls(popularity_counts(train_samples, n_items, count), count)

    def rank(self, samples: Sequence[Sample], topk: int) -> np.ndarray:
        scores = np.broadcast_to(self.counts, (len(samples), self.counts.shape[0])).copy()  # [n, n_items]
        return top_k(exclude_history(scores, samples), topk)

    def info(self) -> dict:
        return {"count": self.count_rule, "total_count": int(self.counts.sum())}
