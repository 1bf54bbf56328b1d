"""BIGRec grounding: exact full-catalogue L2 ranking, exclusions, ties, approximate kinds, persistence."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from model.checkpoint import fingerprint
from model.grounding import (
    CatalogueIndex,
    IndexConfig,
    StaleIndexError,
    clean_generated,
    measure_recall,
    synthetic_catalogue,
    titles_hash,
)

TITLES = [
    "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
    "Twelve Monkeys (1995)", "Babe (1995)", "Dead Man Walking (1995)", "Richard III (1995)",
    "Seven (Se7en) (1995)", "The Usual Suspects (1995)", "Mighty Aphrodite (1995)", "Postino, Il (1994)",
    "Star Wars (1977)", "Fargo (1996)", "Heat (1995)", "Casino (1995)", "Sabrina (1995)",
    "Toy Story 2 (1999)", "Heat and Dust (1983)",
]


def ngram_embed(texts: list[str], dim: int = 256) -> np.ndarray:
    """Deterministic bag of character 1..3-grams hashed into ``dim`` buckets: [n, dim] float32."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        s = f"^{t.lower()}$"
        for n in (1, 2, 3):
            for j in range(len(s) - n + 1):
                h = int.from_bytes(hashlib.blake2b(s[j:j + n].encode(), digest_size=4).digest(), "little")
                out[i, h % dim] += 1.0
    return out


def brute_rank(items: np.ndarray, q: np.ndarray, excl: set[int], topk: int) -> tuple[list[int], np.ndarray]:
    """Independent reference: float64 distances to every item, sorted by (distance, index)."""
    d = ((items.astype(np.float64) - q.astype(np.float64)) ** 2).sum(1)
    order = [int(i) for i in np.lexsort((np.arange(len(items)), d)) if int(i) not in excl][:topk]
    return order, d[order]


# ---- clean_generated ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('"Heat (1995)"', "Heat (1995)"),
        ('  "Heat (1995)"\n', "Heat (1995)"),
        ('"Heat (1995)"\n"Casino (1995)"', "Heat (1995)"),  # only the first line
        ('\n\n"Fargo (1996)"</s>garbage', "Fargo (1996)"),  # text after the closing quote
        ('"Fargo (1996)" is a good pick', "Fargo (1996)"),
        ('"Toy Story (19', "Toy Story (19"),  # cut off, no closing quote
        ('I recommend "Babe (1995)".', "Babe (1995)"),  # first quoted span
        ("Star Wars (1977)", "Star Wars (1977)"),  # no quotes: the line
        ('""Great Performances" Cats (1998)"', '"Great Performances" Cats (1998)'),  # inner quotes kept
        ("   \n  ", ""),
        ("", ""),
    ],
)
def test_clean_generated(raw: str, expected: str) -> None:
    assert clean_generated(raw) == expected


# ---- exact ranking --------------------------------------------------------------------------------


def test_exact_title_ranks_first_ngram_embedder() -> None:
    index = CatalogueIndex.build(TITLES, ngram_embed, batch_size=7, progress=False)
    items, dist = index.rank(ngram_embed(TITLES), topk=5)
    assert items[:, 0].tolist() == list(range(len(TITLES)))
    assert np.all(dist[:, 0] == 0.0)
    assert np.all(dist[:, 1] > 0.0)
    # raw generated answers go through clean_generated first
    gen = ['"Heat (1995)"', ' "Fargo (1996)"\nmore text', 'I pick "Casino (1995)" for you']
    got, _ = index.ground(gen, ngram_embed, topk=3)
    assert got[:, 0].tolist() == [TITLES.index("Heat (1995)"), TITLES.index("Fargo (1996)"), TITLES.index("Casino (1995)")]


def test_exact_title_ranks_first_tiny_lm(tiny_split) -> None:
    """The production embedder (SplitLM.embed_final) on a tiny random Llama, checked against torch.cdist."""
    embed = lambda texts: tiny_split.embed_final(texts)  # noqa: E731
    index = CatalogueIndex.build(TITLES, embed, batch_size=8, fingerprint=fingerprint(tiny_split), progress=False)
    items, dist = index.rank(embed(TITLES), topk=len(TITLES))
    assert items[:, 0].tolist() == list(range(len(TITLES)))
    # BIGRec's own formulation: torch.cdist over all items, argsort
    queries = embed(['"Heat (1995)"', "Toy Story", "Star Wars (1977)"])
    got, got_d = index.rank(queries, topk=len(TITLES))
    ref = torch.cdist(queries.double(), torch.from_numpy(index.embeddings()).double()) ** 2  # [3, N]
    assert got.tolist() == torch.argsort(ref, dim=1, stable=True).tolist()
    np.testing.assert_allclose(got_d, torch.sort(ref, dim=1).values.numpy(), rtol=1e-5)


def test_rank_matches_brute_force_with_exclusions() -> None:
    items, queries = synthetic_catalogue(2000, 24, 40, n_clusters=16, seed=1)
    rng = np.random.default_rng(2)
    index = CatalogueIndex(items)
    exclude = []
    for b in range(len(queries)):
        e = set(rng.integers(0, 2000, 30).tolist())
        # exclude some of the query's true nearest neighbours too: those must make way for others
        e |= set(brute_rank(items, queries[b], set(), 5)[0][: b % 4])
        exclude.append(e)
    got, dist = index.rank(queries, exclude=exclude, topk=10)
    assert got.shape == (40, 10) and dist.shape == (40, 10)
    for b in range(len(queries)):
        ref, ref_d = brute_rank(items, queries[b], exclude[b], 10)
        assert got[b].tolist() == ref
        assert not set(got[b].tolist()) & exclude[b]
        np.testing.assert_allclose(dist[b], ref_d, rtol=1e-6)
    # keep_excluded: the excluded items come back
    kept, _ = index.rank(queries, exclude=exclude, topk=10, keep_excluded=True)
    for b in range(len(queries)):
        assert kept[b].tolist() == brute_rank(items, queries[b], set(), 10)[0]


def test_exclusion_pads_only_when_catalogue_is_too_small() -> None:
    items = np.eye(5, dtype=np.float32)
    index = CatalogueIndex(items)
    got, dist = index.rank(items[:1], exclude=[{0, 1, 2}], topk=4)
    assert got.tolist() == [[3, 4, -1, -1]]
    assert np.isinf(dist[0, 2:]).all() and np.allclose(dist[0, :2], 2.0)
    # out-of-range ids in exclude are ignored, not an error
    got, _ = index.rank(items[:1], exclude=[{-3, 99, 0}], topk=4)
    assert got.tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_exact_ties_ordered_by_item_index_even_past_the_first_search(kind: str) -> None:
    """50 identical items (a duplicated title) scattered in the catalogue. With margin 0 the first
    search asks for exactly topk candidates; HNSW then returns an arbitrary subset of the tie, so the
    boundary check must widen the search until the whole tie is seen."""
    rng = np.random.default_rng(3)
    items = rng.standard_normal((2000, 16)).astype(np.float32) + 5.0
    dup = np.sort(rng.choice(2000, 50, replace=False))
    v = rng.standard_normal(16).astype(np.float32)
    items[dup] = v
    index = CatalogueIndex(items, IndexConfig(kind=kind, margin=0, nprobe=4))
    got, dist = index.rank(v[None], topk=10)
    assert got[0].tolist() == dup[:10].tolist()
    assert np.all(dist == 0.0)
    got, _ = index.rank(v[None], exclude=[set(dup[:45].tolist())], topk=10)
    assert got[0, :5].tolist() == dup[45:].tolist()
    if kind == "flat":  # the rest are ordinary neighbours, exact only for flat
        assert got[0, 5:].tolist() == brute_rank(items, v, set(dup.tolist()), 5)[0]


def test_bad_input_raises() -> None:
    index = CatalogueIndex(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"queries must be \[B, 4\]"):
        index.rank(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="exclude has 1 rows for 2 queries"):
        index.rank(np.zeros((2, 4), dtype=np.float32), exclude=[set()])
    with pytest.raises(ValueError, match="NaN"):
        CatalogueIndex(np.array([[0.0, np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match="unknown index kind"):
        IndexConfig(kind="pq")
    with pytest.raises(ValueError, match="embedder returned shape"):
        CatalogueIndex.build(["a", "b"], lambda t: np.zeros((1, 3)), progress=False)


# ---- approximate kinds -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, params", [("ivf", {"nprobe": 8}), ("hnsw", {"ef_search": 64})])
def test_approximate_recall_against_exact(kind: str, params: dict) -> None:
    items, queries = synthetic_catalogue(4000, 32, 100, n_clusters=64, noise=1.0, seed=4)
    rep = measure_recall(kind, items, queries, k=10, **params)
    assert rep.n_items == 4000 and rep.k == 10
    assert rep.recall >= 0.9, rep.row()
    # the recall is recomputed here independently of measure_recall
    approx = CatalogueIndex(items, IndexConfig(kind=kind, **params))
    got, _ = approx.rank(queries, topk=10)
    ref = [brute_rank(items, q, set(), 10)[0] for q in queries]
    recall = np.mean([len(set(g.tolist()) & set(r)) / 10 for g, r in zip(got, ref)])
    assert recall >= 0.9 and abs(recall - rep.recall) < 0.05


def test_ivf_with_tiny_nprobe_still_returns_topk_admissible_items() -> None:
    items, queries = synthetic_catalogue(600, 8, 10, n_clusters=20, seed=5)
    index = CatalogueIndex(items, IndexConfig(kind="ivf", nlist=100, nprobe=1, margin=0))
    exclude = [set(range(0, 600, 2)) for _ in queries]  # half the catalogue
    got, dist = index.rank(queries, exclude=exclude, topk=25)
    assert (got >= 0).all() and np.isfinite(dist).all()
    for row, e in zip(got, exclude):
        assert len(set(row.tolist())) == 25 and not set(row.tolist()) & e


# ---- persistence ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind: str) -> None:
    items, queries = synthetic_catalogue(1500, 16, 30, n_clusters=32, noise=1.0, seed=6)
    titles = [f"item {i}" for i in range(1500)]
    index = CatalogueIndex(items, IndexConfig(kind=kind, nprobe=4, ef_search=32), fingerprint="emb-v1",
                           titles_sha=titles_hash(titles))
    exclude = [set(range(b, b + 20)) for b in range(30)]
    before = index.rank(queries, exclude=exclude, topk=15)
    index.save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    assert (meta["kind"], meta["n_items"], meta["dim"], meta["fingerprint"]) == (kind, 1500, 16, "emb-v1")
    assert (tmp_path / "index.faiss").exists() == (kind != "flat")
    loaded = CatalogueIndex.load(tmp_path, fingerprint="emb-v1", titles=titles)
    after = loaded.rank(queries, exclude=exclude, topk=15)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(loaded.embeddings(), items)
    with pytest.raises(StaleIndexError, match="emb-v1"):
        CatalogueIndex.load(tmp_path, fingerprint="emb-v2")
    with pytest.raises(StaleIndexError, match="different catalogue"):
        CatalogueIndex.load(tmp_path, titles=titles[:-1] + ["renamed"])


def test_load_reports_corrupt_metadata(tmp_path) -> None:
    CatalogueIndex(np.eye(3, dtype=np.float32)).save(tmp_path)
    (tmp_path / "index.json").write_text('{"kind": "flat",\n "n_items": }')
    with pytest.raises(ValueError, match=r"index.json: invalid JSON at line 2, column 13"):
        CatalogueIndex.load(tmp_path)
