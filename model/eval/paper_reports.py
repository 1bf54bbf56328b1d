"""The AutoMR paper's reports from evaluation result files: Table 1, Figure 2, Figure 3, memorization.

Input: the result JSONs of ``automr evaluate`` (same split, seed and ``--limit`` for every method, so
the samples pair up). Output: markdown (returned) and PNG figures (written).

- Table 1: every method × Recall@1/5/10/20, NDCG@5/10/20 with n and 95% CIs, plus the paired
  bootstrap CI of automr − bigrec and automr − random.
- Figure 2: automr vs random, box plots of the bootstrap replicate means (B resamples of the test
  samples) of Recall@1, Recall@5 and NDCG@5.
- Figure 3: for samples where memory turned a miss into a hit (target outside bigrec's top-10, inside
  automr's), how far back the retrieved element lies (1 = the newest memory element).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from model.eval.bootstrap import mean_ci
from model.eval.evaluator import EvalResult, compare
from model.eval.metrics import per_sample_metrics
from model.eval.report import comparison_table, memorization_table, results_table

FIG2_METRICS = ("recall@1", "recall@5", "ndcg@5")


def _result(r: dict | EvalResult) -> EvalResult:
    return r if isinstance(r, EvalResult) else EvalResult.from_json(r)


def table1(results: Sequence[dict], pairs: Sequence[tuple[str, str]] = (("automr", "bigrec"), ("automr", "random")),
           n_boot: int = 1000, seed: int = 0) -> str:
    """Markdown: the results table and the paired comparisons that are available."""
    by_name = {r["method"]: r for r in results}
    parts = [results_table(list(results))]
    comps = [compare(by_name[a], by_name[b], n_boot=n_boot, seed=seed) for a, b in pairs if a in by_name and b in by_name]
    if comps:
        parts.append(comparison_table(comps))
    parts.append(memorization_table(list(results)))
    return "\n\n".join(parts)


def figure2(automr: dict, random: dict, out: Path, n_boot: int = 1000, seed: int = 0) -> dict:
    """Box plots of bootstrap replicate means, automr vs random; returns the medians shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, r = _result(automr), _result(random)
    pa, pr = per_sample_metrics(a.ranks), per_sample_metrics(r.ranks)
    fig, axes = plt.subplots(1, len(FIG2_METRICS), figsize=(4 * len(FIG2_METRICS), 3.5))
    medians = {}
    for ax, m in zip(axes, FIG2_METRICS):
        reps = [mean_ci(p[m], n_boot=n_boot, seed=seed).replicates for p in (pa, pr)]
        ax.boxplot(reps, tick_labels=[a.method, r.method])
        ax.set_title(f"{m} (n={a.n}, B={n_boot})")
        medians[m] = {a.method: float(np.median(reps[0])), r.method: float(np.median(reps[1]))}
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return medians


def figure3(automr: dict, bigrec: dict, out: Path, k: int = 10) -> dict:
    """Histogram of the retrieved element's age for samples where memory turned a miss into a hit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = _result(automr), _result(bigrec)
    trace = a.info.get("trace") or []
    if len(trace) != a.n:
        raise ValueError(f"{a.method}: the result holds no per-sample trace of the retrieved elements")
    pos_b = {key: i for i, key in enumerate(b.keys)}
    ages = []
    for i, key in enumerate(a.keys):
        j = pos_b.get(key)
        if j is None:
            continue
        hit_a = 0 <= a.ranks[i] < k
        hit_b = 0 <= b.ranks[j] < k
        if hit_a and not hit_b and trace[i]["memory_age"]:
            ages.append(trace[i]["memory_age"][0])

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(ages, bins=range(1, 92, 5))
    ax.set_xlabel("age of the retrieved element (1 = newest memory element)")
    ax.set_ylabel("samples")
    ax.set_title(f"miss→hit@{k} thanks to memory: {len(ages)} samples")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return {"n_miss_to_hit": len(ages), "median_age": float(np.median(ages)) if ages else None}
