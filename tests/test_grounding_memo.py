"""Grounding embeddings remembered by text (model/grounding_memo.py): which texts cost a forward,
the bound of the recent answers, and grounding through the memo equal to grounding without it."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from model.grounding import CatalogueIndex
from model.grounding_memo import GroundingMemo
from model.recommend import RecommendRequest
from tests.conftest import TINY_TITLES
from tests.test_recommend import _rec, parts  # noqa: F401  (the tiny model's fixture)

H = 8


def vec(text: str) -> np.ndarray:
    """A deterministic embedding of a text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(H).astype(np.float32)


class CountingEmbedder:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.stack([vec(t) for t in texts])

    @property
    def texts(self) -> list[str]:
        return [t for call in self.calls for t in call]


TITLES = ["Alien (1979)", "Heat (1995)", "Fargo (1996)", "Heat (1995)", "Babe (1995)"]  # one title twice


@pytest.fixture
def memo():
    index = CatalogueIndex(np.stack([vec(t) for t in TITLES]))
    return GroundingMemo(TITLES, index, max_recent=3)


def test_catalogue_titles_take_the_index_rows_and_cost_no_forward(memo):
    e = CountingEmbedder()
    out = memo.embed(["Heat (1995)", "Alien (1979)", "Babe (1995)"], e)
    assert e.calls == []
    np.testing.assert_array_equal(out, np.stack([vec("Heat (1995)"), vec("Alien (1979)"), vec("Babe (1995)")]))
    assert memo._rows["Heat (1995)"] == 1  # the first of the twice-listed title's items
    assert (memo.catalogue_hits, memo.recent_hits, memo.embedded) == (3, 0, 0)


def test_new_texts_are_embedded_once_each_then_remembered(memo):
    e = CountingEmbedder()
    texts = ["The (1996)", "Cinderella (1950)", "The (1996)", "Fargo (1996)", "The (1996)"]
    out = memo.embed(texts, e)
    assert e.calls == [["The (1996)", "Cinderella (1950)"]]  # one call, each distinct miss once
    np.testing.assert_array_equal(out, np.stack([vec(t) for t in texts]))
    again = memo.embed(["Cinderella (1950)", "The (1996)"], e)
    assert len(e.calls) == 1
    np.testing.assert_array_equal(again, np.stack([vec("Cinderella (1950)"), vec("The (1996)")]))
    assert (memo.catalogue_hits, memo.recent_hits, memo.embedded) == (1, 2, 4)
    assert len(memo) == 2


def test_recent_answers_are_bounded_least_recently_used_first(memo):
    e = CountingEmbedder()
    memo.embed(["a", "b", "c"], e)  # max_recent = 3
    memo.embed(["a"], e)  # a is used again: b is now the oldest
    memo.embed(["d"], e)
    assert len(memo) == 3
    memo.embed(["a", "c", "d"], e)
    assert e.texts == ["a", "b", "c", "d"]  # all three remembered
    memo.embed(["b"], e)
    assert e.texts == ["a", "b", "c", "d", "b"]  # b had left


def test_zero_recent_remembers_nothing_but_the_catalogue(memo):
    memo.max_recent = 0
    e = CountingEmbedder()
    memo.embed(["x", "Fargo (1996)"], e)
    memo.embed(["x"], e)
    assert e.texts == ["x", "x"] and len(memo) == 0


def test_bad_inputs(memo):
    with pytest.raises(ValueError, match="4 titles for an index of 5 items"):
        GroundingMemo(TITLES[:4], memo.index)
    with pytest.raises(ValueError, match="max_recent"):
        GroundingMemo(TITLES, memo.index, max_recent=-1)
    with pytest.raises(ValueError, match="embedder returned shape"):
        memo.embed(["new"], lambda texts: np.zeros((len(texts), H + 1), dtype=np.float32))
    assert len(memo) == 0  # nothing remembered from a failed call


def test_grounding_through_the_memo_equals_grounding_without_it(parts):  # noqa: F811
    """The recommender's grounding on the tiny float32 model: catalogue titles, repeated and new
    answers give the same ranking with and without the memo, and only new texts cost a forward."""
    lm, _, _ = parts
    plain, memoized = _rec(parts, ground_memo=False), _rec(parts)
    calls: list[list[str]] = []
    embed_final = lm.embed_final

    def counting(texts, *a, **k):
        calls.append(list(texts))
        return embed_final(texts, *a, **k)

    lm.embed_final = counting
    texts = [f'"{TINY_TITLES[3]}"', "the (1996)", TINY_TITLES[7], "the (1996)", "nothing like a title"]
    reqs = [RecommendRequest(context=[0], exclude={i}) for i in range(len(texts))]
    a_items, a_dist = plain.ground(reqs, texts, topk=6)
    calls.clear()
    for _ in range(2):
        b_items, b_dist = memoized.ground(reqs, texts, topk=6)
        np.testing.assert_array_equal(a_items, b_items)
        np.testing.assert_allclose(a_dist, b_dist, rtol=1e-4, atol=1e-4)
    assert calls == [["the (1996)", "nothing like a title"]]  # the titles from the index; then all remembered
    memo = memoized.ground_memo
    assert (memo.catalogue_hits, memo.recent_hits, memo.embedded) == (4, 3, 3)
