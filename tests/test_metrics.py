"""Recall/NDCG on rankings whose values are worked out by hand."""
import math

import numpy as np
import pytest

from model.eval.metrics import METRICS, MISS, mean_metrics, ndcg_at, per_sample_metrics, recall_at, target_ranks
from model.eval.ranker import PAD, exclude_history, top_k
from model.data.types import Sample


def _ranking(target: int, rank: int | None, topk: int = 20) -> list[int]:
    """A top-k list of fillers 100, 101, ... with ``target`` at position ``rank`` (absent when None)."""
    row = list(range(100, 100 + topk))
    if rank is not None:
        row[rank] = target
    return row


def test_target_ranks_finds_position_or_miss():
    rankings = np.array([_ranking(7, 0), _ranking(3, 2), _ranking(5, None), [1, 2, 3] + [PAD] * 17])
    targets = np.array([7, 3, 5, 3])
    assert target_ranks(rankings, targets).tolist() == [0, 2, MISS, 2]


def test_metrics_by_hand():
    # ranks 0, 2, 7, 19 and a miss
    ranks = np.array([0, 2, 7, 19, -1])
    m = mean_metrics(ranks)
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@5"] == pytest.approx(2 / 5)
    assert m["recall@10"] == pytest.approx(3 / 5)
    assert m["recall@20"] == pytest.approx(4 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    # NDCG@5: 1 + 1/log2(4) = 1.5
    assert m["ndcg@5"] == pytest.approx(1.5 / 5)
    # NDCG@10: 1 + 0.5 + 1/log2(9) = 1.5 + 0.3154648768
    assert m["ndcg@10"] == pytest.approx((1.5 + 0.3154648768) / 5)
    # NDCG@20: ... + 1/log2(21) = 0.2276702486
    assert m["ndcg@20"] == pytest.approx((1.5 + 0.3154648768 + 0.2276702486) / 5)
    assert set(m) == set(METRICS)


def test_inf_and_minus_one_both_mean_miss():
    assert recall_at(np.array([np.inf, -1, 4]), 5).tolist() == [0.0, 0.0, 1.0]
    assert ndcg_at(np.array([np.inf, -1, 1]), 5).tolist() == pytest.approx([0.0, 0.0, 1 / math.log2(3)])


def test_per_sample_shapes_and_boundary():
    ps = per_sample_metrics(np.array([4, 5]))
    assert ps["recall@5"].tolist() == [1.0, 0.0]  # rank 4 is the 5th item: inside @5; rank 5 is not
    assert ps["ndcg@5"].tolist() == pytest.approx([1 / math.log2(6), 0.0])


def _s(history, target=0):
    return Sample("u", target, 0, list(history), [0] * len(history))


def test_exclude_history_and_top_k_ties():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    exclude_history(scores, [_s([2]), _s([0, 1, 2, 3])])
    # row 0: item 2 excluded; items 1 and 4 tie at 3 -> lower index first
    # row 1: only item 4 is left; the other slots are PAD
    assert top_k(scores, 4).tolist() == [[1, 4, 3, 0], [4, PAD, PAD, PAD]]


def test_exclude_history_rejects_bad_index():
    with pytest.raises(ValueError, match="out of range"):
        exclude_history(np.zeros((1, 3)), [_s([5])])
