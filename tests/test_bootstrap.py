"""Paired and single-method percentile bootstrap."""
import numpy as np
import pytest

from model.eval.bootstrap import mean_ci, metric_cis, paired_diff_ci


def test_identical_methods_give_degenerate_zero_ci():
    a = np.random.default_rng(1).integers(0, 2, 500).astype(float)
    r = paired_diff_ci(a, a.copy(), n_boot=200, seed=0)
    assert r.diff == 0.0 and r.lo == 0.0 and r.hi == 0.0
    assert np.all(r.replicates_diff == 0.0)
    assert r.p_le_zero == 1.0


def test_strictly_better_method_has_ci_above_zero():
    rng = np.random.default_rng(2)
    b = rng.random(300)
    a = b + rng.uniform(0.001, 0.01, 300)  # better on every sample, by a little
    r = paired_diff_ci(a, b, n_boot=300, seed=0)
    assert r.lo > 0 and r.hi > r.lo
    assert r.p_le_zero == 0.0
    # and mostly-tied hit vectors: a hits wherever b does, plus 30 more samples
    b = np.zeros(1000)
    b[:100] = 1
    a = b.copy()
    a[100:130] = 1
    r = paired_diff_ci(a, b, n_boot=500, seed=3)
    assert r.diff == pytest.approx(0.03)
    assert 0 < r.lo < 0.03 < r.hi


def test_seeded_determinism():
    rng = np.random.default_rng(4)
    a, b = rng.random(200), rng.random(200)
    r1 = paired_diff_ci(a, b, n_boot=100, seed=7)
    r2 = paired_diff_ci(a, b, n_boot=100, seed=7)
    r3 = paired_diff_ci(a, b, n_boot=100, seed=8)
    assert np.array_equal(r1.replicates_diff, r2.replicates_diff) and (r1.lo, r1.hi) == (r2.lo, r2.hi)
    assert not np.array_equal(r1.replicates_diff, r3.replicates_diff)
    assert r1.replicates_a.shape == (100,)


def test_mean_ci_matches_normal_approximation():
    x = (np.random.default_rng(5).random(4000) < 0.3).astype(float)
    c = mean_ci(x, n_boot=1000, seed=0)
    p = x.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / x.size)  # ~0.0142
    assert c.lo < p < c.hi
    assert (c.hi - c.lo) / 2 == pytest.approx(half, rel=0.12)
    assert c.replicates.mean() == pytest.approx(p, abs=0.002)


def test_metric_cis_share_resamples_with_mean_ci():
    rng = np.random.default_rng(6)
    x, y = rng.random(50), rng.random(50)
    both = metric_cis({"x": x, "y": y}, n_boot=50, seed=9)
    assert np.allclose(both["x"].replicates, mean_ci(x, n_boot=50, seed=9).replicates)
    assert np.allclose(both["y"].replicates, mean_ci(y, n_boot=50, seed=9).replicates)


def test_bad_input():
    with pytest.raises(ValueError):
        paired_diff_ci(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        mean_ci(np.zeros(0))
