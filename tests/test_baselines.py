"""Popularity on a hand-made example; SASRec learns a deterministic successor pattern; safetensors round-trip."""
import numpy as np
import pytest
import torch

from model.baselines.popularity import PopularityRanker, popularity_counts
from model.baselines.sasrec import (
    SASRec,
    SASRecConfig,
    SASRecRanker,
    SASRecTrainConfig,
    build_sasrec,
    encode_histories,
    sample_negatives,
    train_sasrec,
    user_train_sequences,
)
from model.data.types import Catalogue, Sample
from model.eval.evaluator import MethodContext, evaluate


def S(user, history, target, ts=0, hts=None):
    return Sample(user, target, ts, list(history), hts if hts is not None else list(range(len(history))))


def test_popularity_counts_targets_and_ranks_excluding_history():
    train = [S("a", [0], 2), S("a", [0, 2], 2), S("b", [1], 2), S("b", [1, 2], 1), S("c", [4], 1), S("c", [4, 1], 3)]
    counts = popularity_counts(train, 6)
    assert counts.tolist() == [0, 2, 3, 1, 0, 0]
    r = PopularityRanker(counts)
    # history {2, 4}: 1 (2), 3 (1), then 0 and 5 tie at 0 -> lower index first, then nothing is left
    assert r.rank([S("x", [2, 4], 0)], 5).tolist() == [[1, 3, 0, 5, -1]]
    assert r.rank([S("y", [0], 0)], 3).tolist() == [[2, 1, 3]]


def test_popularity_counts_interactions_dedupes_repeated_history():
    # user a: items 0@t0, 1@t1 then target 2@t2; the second sample repeats 0@t0, 1@t1, 2@t2 in its history
    train = [S("a", [0, 1], 2, ts=2, hts=[0, 1]), S("a", [0, 1, 2], 3, ts=3, hts=[0, 1, 2]), S("b", [0], 3, ts=5, hts=[4])]
    assert popularity_counts(train, 5, "interactions").tolist() == [2, 1, 1, 2, 0]
    with pytest.raises(ValueError, match="targets"):
        popularity_counts(train, 5, "bogus")


def test_user_train_sequences_takes_latest_sample():
    train = [S("a", [0, 1], 2, ts=5), S("a", [0, 1, 2], 3, ts=6), S("b", [4], 5, ts=9), S("b", [4, 5], 6, ts=9)]
    assert user_train_sequences(train) == [[0, 1, 2, 3], [4, 5, 6]]


def test_encode_histories_left_pads_with_offset():
    assert encode_histories([[3, 4], [0, 1, 2, 5]], 3).tolist() == [[0, 4, 5], [2, 3, 6]]


def test_negatives_avoid_the_users_items():
    gen = torch.Generator().manual_seed(0)
    inp = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    pos = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 9]])
    neg = sample_negatives(inp, pos, 10, gen)
    assert not any(int(n) in {1, 2, 3, 4, 5} for n in neg[0]) and not any(int(n) in {5, 6, 7, 8, 9} for n in neg[1])
    assert int(neg.min()) >= 1 and int(neg.max()) <= 10


# --------------------------------------------------------------------------- SASRec on a successor pattern

N = 40  # items; item i is always followed by item (i + 1) % N; sequences of 16 never wrap onto themselves


def successor_samples(n_users, seed, k=3, length=16):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for u in range(n_users):
        start = int(rng.integers(N))
        seq = [(start + j) % N for j in range(length)]
        for t in range(k, length):
            s = Sample(f"u{u}", seq[t], 100 * u + t, seq[:t], list(range(100 * u, 100 * u + t)))
            (test if t == length - 1 else train).append(s)
    return train, test


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds contention on the 2 shared cores (measured 2-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread):
    train, test = successor_samples(120, seed=0)
    valid = successor_samples(20, seed=1)[1]
    mcfg = SASRecConfig(n_items=N, max_len=16, hidden=32, n_blocks=2, dropout=0.1)
    tcfg = SASRecTrainConfig(lr=1e-2, batch_size=16, max_epochs=10, eval_every=5, patience=3, progress=False)
    return train_sasrec(train, valid, N, mcfg, tcfg), test


def test_sasrec_learns_the_successor(trained):
    ranker, test = trained
    res = evaluate(ranker, test, progress=False, n_boot=10)
    assert res.metrics["recall@1"] >= 0.85, res.metrics  # chance is 1/28, popularity ~1/40
    info = ranker.info()["train"]
    assert info["best_epoch"] >= 5 and info["best_valid_ndcg@10"] > 0.9
    torch.manual_seed(0)
    untrained = SASRecRanker(SASRec(ranker.config))
    assert evaluate(untrained, test, progress=False, n_boot=10).metrics["recall@1"] < 0.3  # so it was learned


def test_sasrec_safetensors_roundtrip(trained, tmp_path):
    ranker, test = trained
    ranker.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    back = SASRecRanker.load(tmp_path / "m")
    assert np.array_equal(back.scores(test), ranker.scores(test))
    assert np.array_equal(back.rank(test, 20), ranker.rank(test, 20))
    assert back.train_info["best_epoch"] == ranker.train_info["best_epoch"]


def test_sasrec_rank_excludes_history(trained):
    ranker, test = trained
    top = ranker.rank(test[:5], 20)
    for s, row in zip(test[:5], top):
        assert not set(row.tolist()) & set(s.history)


class FakeDataset:
    def __init__(self, splits):
        self._splits = splits
        self.catalogue = Catalogue([str(i) for i in range(N)], [f"item {i}" for i in range(N)])

    def split(self, name):
        return self._splits[name]


def test_build_sasrec_trains_once_then_reuses_artefact(tmp_path):
    train, test = successor_samples(20, seed=2)
    ds = FakeDataset({"train": train, "valid": test[:5], "test": test})
    opts = {"max_len": 16, "hidden": 16, "max_epochs": 2, "eval_every": 2, "batch_size": 32}
    r1 = build_sasrec(MethodContext(ds, opts, tmp_path / "sasrec", seed=1, progress=False))
    assert "loaded_from" not in r1.train_info
    r2 = build_sasrec(MethodContext(ds, opts, tmp_path / "sasrec", seed=1, progress=False))
    assert r2.train_info["loaded_from"] == str(tmp_path / "sasrec")
    assert np.array_equal(r1.rank(test, 20), r2.rank(test, 20))
    r3 = build_sasrec(MethodContext(ds, {**opts, "max_epochs": 1}, tmp_path / "sasrec", seed=1, progress=False))
    assert "loaded_from" not in r3.train_info  # other options -> retrained
    with pytest.raises(ValueError, match="unknown sasrec option"):
        build_sasrec(MethodContext(ds, {"hiden": 3}, None, progress=False))
