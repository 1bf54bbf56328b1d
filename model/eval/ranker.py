"""The ranker interface every method implements, and the shared "exclude the history" convention.

A ranker turns samples into a top-k list of catalogue indices, best first. By convention every ranker
removes the items of the sample's history from its ranking (the target is never in the history for
the datasets we use), so scores-based rankers call :func:`exclude_history` then :func:`top_k`.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from model.data.types import Sample

PAD = -1  # an empty slot in a ranking (fewer than topk rankable items)


@runtime_checkable
class Ranker(Protocol):
    name: str

    def rank(self, samples: Sequence[Sample], topk: int) -> np.ndarray:
        """[n, topk] int64 item indices, best first; ``PAD`` (-1) marks an empty slot."""
        ...


def exclude_history(scores: np.ndarray, samples: Sequence[Sample]) -> np.ndarray:
    """Set ``scores[i, j] = -inf`` for every item j in ``samples[i].history`` (in place; returns it).

    scores: [n, n_items] float array, one row per sample.
    """
    if scores.ndim != 2 or scores.shape[0] != len(samples):
        raise ValueError(
            f"scores must be [n_samples, n_items] = [{len(samples)}, ...], got shape {scores.shape}"
        )
    n_items = scores.shape[1]
    rows = np.repeat(np.arange(len(samples)), [len(s.history) for s in samples])
    cols = np.fromiter((j for s in samples for j in s.history), dtype=np.int64, count=rows.shape[0])
    if cols.size and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"history item index out of range [0, {n_items}) in exclude_history")
    scores[rows, cols] = -np.inf
    return scores


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, k] indices of the k highest scores per row, best first; ties go to the lower index.

    Items scored -inf (excluded) never appear: their slots are ``PAD``. Deterministic, so rankings of
    tied scores (popularity counts) are reproducible.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [n, n_items], got shape {scores.shape}")
    n, n_items = scores.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.full((n, k), PAD, dtype=np.int64)
    kk = min(k, n_items)
    for i in range(n):
        row = scores[i]
        kth = np.partition(row, n_items - kk)[n_items - kk]  # the kk-th largest value
        cand = np.flatnonzero(row >= kth)  # every item tied with or above it
        order = cand[np.lexsort((cand, -row[cand]))][:kk]
        order = order[np.isfinite(row[order]) | (row[order] > 0)]  # drop -inf (excluded) items
        out[i, : order.shape[0]] = order
    return out
