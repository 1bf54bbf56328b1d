"""Percentile bootstrap confidence intervals over test samples.

- :func:`mean_ci`: a 95% CI of one method's mean metric (resample samples with replacement).
- :func:`paired_diff_ci`: a 95% CI of the difference of two methods' means on the *same* samples;
  each replicate draws one index vector and applies it to both methods (paired), which removes the
  between-sample variance the two methods share.

Both return the replicate means, from which Figure 2 (box plots of AutoMR vs random) is drawn.
Replicate index vectors come from ``np.random.default_rng(seed)``, so a given (n, B, seed) always
draws the same resamples: two metrics or two method pairs bootstrapped with the same seed share them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_B = 1000
DEFAULT_ALPHA = 0.05
_CHUNK = 100  # replicates per chunk: bounds memory at _CHUNK * n indices


@dataclass
class MeanCI:
    mean: float
    lo: float
    hi: float
    replicates: np.ndarray  # [B] replicate means

    def to_json(self, with_replicates: bool = False) -> dict:
        d = {"mean": self.mean, "lo": self.lo, "hi": self.hi}
        if with_replicates:
            d["replicates"] = self.replicates.tolist()
        return d


@dataclass
class PairedDiffCI:
    mean_a: float
    mean_b: float
    diff: float  # mean_a - mean_b
    lo: float
    hi: float
    p_le_zero: float  # share of replicates with diff <= 0 (a one-sided bootstrap "p-value" for a > b)
    replicates_a: np.ndarray  # [B]
    replicates_b: np.ndarray  # [B]
    replicates_diff: np.ndarray  # [B]

    def to_json(self, with_replicates: bool = False) -> dict:
        d = {
            "a": self.mean_a,
            "b": self.mean_b,
            "diff": self.diff,
            "lo": self.lo,
            "hi": self.hi,
            "p_le_zero": self.p_le_zero,
        }
        if with_replicates:
            d["replicates_a"] = self.replicates_a.tolist()
            d["replicates_b"] = self.replicates_b.tolist()
            d["replicates_diff"] = self.replicates_diff.tolist()
        return d


def _replicate_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[B, m] means over B resamples of the rows of ``values`` ([n, m]), seeded."""
    n = values.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap an empty set of samples")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, values.shape[1]), dtype=np.float64)
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))  # [b, n]
        out[start : start + b] = values[idx].mean(axis=1)
    return out


def _percentiles(x: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(x, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_ci(
    values: np.ndarray, *, n_boot: int = DEFAULT_B, seed: int = 0, alpha: float = DEFAULT_ALPHA
) -> MeanCI:
    """Percentile bootstrap CI of ``values.mean()`` ([n] per-sample metric)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    reps = _replicate_means(v, n_boot, seed)[:, 0]
    lo, hi = _percentiles(reps, alpha)
    return MeanCI(float(v.mean()), lo, hi, reps)


def paired_diff_ci(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = DEFAULT_B,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
) -> PairedDiffCI:
    """Paired percentile bootstrap CI of mean(a) - mean(b); ``a[i]`` and ``b[i]`` are the same sample."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired bootstrap needs two [n] arrays of equal length, got {a.shape} and {b.shape}")
    reps = _replicate_means(np.stack([a, b], axis=1), n_boot, seed)  # [B, 2]
    diff = reps[:, 0] - reps[:, 1]
    lo, hi = _percentiles(diff, alpha)
    return PairedDiffCI(
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        diff=float(a.mean() - b.mean()),
        lo=lo,
        hi=hi,
        p_le_zero=float((diff <= 0).mean()),
        replicates_a=reps[:, 0],
        replicates_b=reps[:, 1],
        replicates_diff=diff,
    )


def metric_cis(
    per_sample: dict[str, np.ndarray], *, n_boot: int = DEFAULT_B, seed: int = 0, alpha: float = DEFAULT_ALPHA
) -> dict[str, MeanCI]:
    """:func:`mean_ci` of every metric, all on the same resamples (one pass over the index draws)."""
    names = list(per_sample)
    values = np.stack([np.asarray(per_sample[k], dtype=np.float64) for k in names], axis=1)  # [n, m]
    reps = _replicate_means(values, n_boot, seed)  # [B, m]
    out = {}
    for j, name in enumerate(names):
        lo, hi = _percentiles(reps[:, j], alpha)
        out[name] = MeanCI(float(values[:, j].mean()), lo, hi, reps[:, j])
    return out
