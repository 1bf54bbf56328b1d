"""One-hop memorization on a hand-made example."""
import math

import numpy as np
import pytest

from model.data.types import Sample
from model.eval.memorization import covered_mask, memorization_report, memorized_top1_mask, one_hop_transitions


def S(user, history, target, ts=0):
    return Sample(user, target, ts, list(history), list(range(len(history))))


TRAIN = [S("u1", [0, 1], 2), S("u2", [5, 1], 3), S("u1", [0, 1, 2], 4)]
TEST = [S("u3", [9, 1], 3), S("u3", [9, 1, 3, 2], 5), S("u4", [8, 0], 1)]


def test_transitions():
    assert one_hop_transitions(TRAIN) == {(1, 2), (1, 3), (2, 4)}
    assert one_hop_transitions(TRAIN, include_history=True) == {(1, 2), (1, 3), (2, 4), (0, 1), (5, 1)}


def test_covered_and_memorized_masks():
    t = one_hop_transitions(TRAIN)
    assert covered_mask(TEST, t).tolist() == [True, False, False]
    assert covered_mask(TEST, one_hop_transitions(TRAIN, include_history=True)).tolist() == [True, False, True]
    # top-1: 2 after 1 (memorized), 4 after 2 (memorized), 7 after 0 (not); -1 (empty) never memorized
    assert memorized_top1_mask(TEST, np.array([2, 4, 7]), t).tolist() == [True, True, False]
    assert memorized_top1_mask(TEST, np.array([-1, 3, 1]), t).tolist() == [False, False, False]


def test_report():
    t = one_hop_transitions(TRAIN)
    rep = memorization_report(TEST, np.array([0, 3, -1]), np.array([2, 4, 7]), t)
    assert rep["n_transitions"] == 3
    assert rep["memorized_top1_share"] == pytest.approx(2 / 3)
    assert rep["covered_share"] == pytest.approx(1 / 3)
    assert rep["covered"]["n"] == 1 and rep["covered"]["recall@1"] == 1.0
    assert rep["uncovered"]["n"] == 2
    assert rep["uncovered"]["recall@5"] == pytest.approx(0.5)
    assert rep["uncovered"]["ndcg@5"] == pytest.approx(0.5 / math.log2(5))
    assert rep["uncovered"]["recall@1"] == 0.0
