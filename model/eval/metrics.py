"""Full-ranking Recall@K and NDCG@K for one target per sample.

Everything starts from the 0-based rank of the target in each sample's top-k list, ``-1`` when the
target is not in it. With a single relevant item, Recall@K is the hit rate ``rank < K`` and
NDCG@K = ``1 / log2(rank + 2)`` if ``rank < K`` else 0 (the ideal DCG is 1).
"""
from __future__ import annotations

import numpy as np

KS: tuple[int, ...] = (1, 5, 10, 20)
METRICS: tuple[str, ...] = tuple(f"recall@{k}" for k in KS) + tuple(f"ndcg@{k}" for k in KS)
MISS = -1  # rank of a target that is not in the top-k list


def target_ranks(rankings: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[n] 0-based position of ``targets[i]`` in ``rankings[i]`` ([n, topk]), ``MISS`` if absent."""
    rankings = np.asarray(rankings)
    targets = np.asarray(targets)
    if rankings.ndim != 2 or rankings.shape[0] != targets.shape[0]:
        raise ValueError(f"rankings must be [n, topk] with n = {targets.shape[0]}, got {rankings.shape}")
    hit = rankings == targets[:, None]  # [n, topk]
    first = hit.argmax(axis=1)
    return np.where(hit.any(axis=1), first, MISS).astype(np.int64)


def _valid_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < 0, np.inf, ranks)  # MISS (-1) and inf both mean "not ranked"


def recall_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """[n] 1.0 where the target is in the top k, else 0.0."""
    return (_valid_ranks(ranks) < k).astype(np.float64)


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """[n] 1/log2(rank+2) where rank < k, else 0.0."""
    r = _valid_ranks(ranks)
    out = np.zeros_like(r)
    hit = r < k
    out[hit] = 1.0 / np.log2(r[hit] + 2.0)
    return out


def per_sample_metrics(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, np.ndarray]:
    """{"recall@K": [n], "ndcg@K": [n]} for every K in ``ks``."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at(ranks, k)
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at(ranks, k)
    return out


def mean_metrics(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Means of :func:`per_sample_metrics` (NaN for an empty set of samples)."""
    return {
        name: float(v.mean()) if v.size else float("nan")
        for name, v in per_sample_metrics(ranks, ks).items()
    }
