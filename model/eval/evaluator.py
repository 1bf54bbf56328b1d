"""Full-ranking evaluation of a Ranker, result files, paired comparison and the method registry.

- :func:`evaluate` runs a ranker over a split (or a fixed seeded subset of it) and returns an
  :class:`EvalResult`: mean Recall/NDCG@{1,5,10,20}, bootstrap CIs, the per-sample target ranks
  (keyed ``user_id:timestamp:target`` so that two result files can be paired later), timing, and the
  one-hop memorization block when the train samples are given.
- :func:`compare` is the paired bootstrap of two result files on their (identical) sample sets.
- :func:`register_method` / :func:`get_method`: a name -> factory registry. A factory takes a
  :class:`MethodContext` and returns a Ranker. ``popularity`` and ``sasrec`` register themselves in
  ``model.baselines``; other modules do the same and are found through ``PLUGIN_MODULES``.
- ``model/eval/run.py``'s ``run_evaluation`` does what ``automr evaluate`` needs end to end.
"""
from __future__ import annotations

import gzip
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from model.data.types import Sample
from model.eval.bootstrap import DEFAULT_B, metric_cis, paired_diff_ci
from model.eval.memorization import memorization_report, one_hop_transitions
from model.eval.metrics import KS, METRICS, mean_metrics, per_sample_metrics, target_ranks
from model.eval.ranker import PAD, Ranker

TOPK = max(KS)  # 20: rankings are cut here; a target ranked lower counts as a miss at every K


# ----------------------------------------------------------------------------- samples and subsets


def sample_keys(samples: Sequence[Sample]) -> list[str]:
    """``user_id:timestamp:target`` per sample; a repeated key gets a ``#2``, ``#3``… suffix."""
    seen: dict[str, int] = {}
    keys = []
    for s in samples:
        k = f"{s.user_id}:{s.timestamp}:{s.target}"
        c = seen.get(k, 0) + 1
        seen[k] = c
        keys.append(k if c == 1 else f"{k}#{c}")
    return keys


def select_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the evaluated samples: all of them, or ``limit`` drawn by a seeded permutation.

    The drawn indices are returned in their original order, and depend only on (n, limit, seed), so
    every method evaluated with the same seed on the same split sees the same samples.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:limit])


# ----------------------------------------------------------------------------- the result


@dataclass
class EvalResult:
    method: str
    split: str
    n: int
    n_split: int  # samples in the split before the subset
    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]  # 95% percentile bootstrap CI of each mean
    keys: list[str]
    indices: np.ndarray  # [n] positions in the split
    ranks: np.ndarray  # [n] 0-based rank of the target, -1 when not in the top 20
    top1: np.ndarray  # [n] the top-1 item (-1 when empty)
    seed: int
    limit: int | None
    n_boot: int
    seconds: float  # wall time of ranker.rank over all samples
    memorization: dict | None = None
    info: dict = field(default_factory=dict)  # what the method reports about itself
    history_len: np.ndarray | None = None  # [n] items before each target (memory size = this - K)

    def per_sample(self) -> dict[str, np.ndarray]:
        return per_sample_metrics(self.ranks)

    def to_json(self) -> dict:
        d: dict[str, Any] = {"method": self.method, "split": self.split, "n": self.n, "n_split": self.n_split}
        d.update(self.metrics)
        d["ci"] = {k: [lo, hi] for k, (lo, hi) in self.ci.items()}
        d.update(
            seed=self.seed,
            limit=self.limit,
            n_boot=self.n_boot,
            timing={"seconds": self.seconds, "ms_per_sample": 1000.0 * self.seconds / max(self.n, 1)},
            memorization=self.memorization,
            info=self.info,
            per_sample={
                "keys": self.keys,
                "index": self.indices.tolist(),
                "rank": self.ranks.tolist(),
                "top1": self.top1.tolist(),
                **({"history_len": self.history_len.tolist()} if self.history_len is not None else {}),
            },
        )
        return d

    @classmethod
    def from_json(cls, d: dict) -> "EvalResult":
        ps = d["per_sample"]
        return cls(
            method=d["method"],
            split=d.get("split", "test"),
            n=int(d["n"]),
            n_split=int(d.get("n_split", d["n"])),
            metrics={k: float(d[k]) for k in METRICS if k in d},
            ci={k: (float(v[0]), float(v[1])) for k, v in d.get("ci", {}).items()},
            keys=list(ps["keys"]),
            indices=np.asarray(ps.get("index", range(len(ps["keys"]))), dtype=np.int64),
            ranks=np.asarray(ps["rank"], dtype=np.int64),
            top1=np.asarray(ps.get("top1", [PAD] * len(ps["keys"])), dtype=np.int64),
            seed=int(d.get("seed", 0)),
            limit=d.get("limit"),
            n_boot=int(d.get("n_boot", DEFAULT_B)),
            seconds=float(d.get("timing", {}).get("seconds", float("nan"))),
            memorization=d.get("memorization"),
            info=d.get("info", {}),
            history_len=np.asarray(ps["history_len"], dtype=np.int64) if "history_len" in ps else None,
        )

    def save(self, path: str | Path) -> None:
        write_result_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        try:
            return cls.from_json(read_result_json(path))
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not an evaluation result file ({e!r})") from e


def write_result_json(path: str | Path, result: dict) -> None:
    """A result as JSON; gzipped where the name ends in ``.gz`` (the published per-sample files are;
    mtime 0, so the same result gives the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(result, indent=1).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def read_result_json(path: str | Path) -> dict:
    """A result file as ``write_result_json`` writes it, plain or gzipped."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    ranker: Ranker,
    samples: Sequence[Sample],
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    train_samples: Sequence[Sample] | None = None,
    split: str = "test",
    n_boot: int = DEFAULT_B,
    progress: bool = True,
) -> EvalResult:
    """Rank ``samples`` (or a seeded subset of ``limit`` of them) and score the target's position."""
    if len(samples) == 0:
        raise ValueError("no samples to evaluate")
    idx = select_subset(len(samples), limit, seed)
    chosen = [samples[i] for i in idx]
    targets = np.array([s.target for s in chosen], dtype=np.int64)
    ranks = np.empty(len(chosen), dtype=np.int64)
    top1 = np.empty(len(chosen), dtype=np.int64)
    name = getattr(ranker, "name", type(ranker).__name__)

    seconds = 0.0
    bar = tqdm(total=len(chosen), desc=f"eval {name}", unit="sample", disable=not progress)
    for start in range(0, len(chosen), batch_size):
        chunk = chosen[start : start + batch_size]
        t0 = time.perf_counter()
        ranking = np.asarray(ranker.rank(chunk, TOPK))
        seconds += time.perf_counter() - t0
        if ranking.shape != (len(chunk), TOPK):
            raise ValueError(
                f"ranker {name!r} returned shape {ranking.shape} for {len(chunk)} samples, "
                f"expected ({len(chunk)}, {TOPK})"
            )
        ranks[start : start + len(chunk)] = target_ranks(ranking, targets[start : start + len(chunk)])
        top1[start : start + len(chunk)] = ranking[:, 0]
        bar.update(len(chunk))
    bar.close()

    cis = metric_cis(per_sample_metrics(ranks), n_boot=n_boot, seed=seed)
    memo = None
    if train_samples is not None:
        memo = memorization_report(chosen, ranks, top1, one_hop_transitions(train_samples))
    info = ranker.info() if callable(getattr(ranker, "info", None)) else {}
    all_keys = sample_keys(samples)  # keyed over the whole split, so a subset's keys match the full run's
    return EvalResult(
        method=name,
        split=split,
        n=len(chosen),
        n_split=len(samples),
        metrics=mean_metrics(ranks),
        ci={k: (c.lo, c.hi) for k, c in cis.items()},
        keys=[all_keys[i] for i in idx],
        indices=idx,
        ranks=ranks,
        top1=top1,
        seed=seed,
        limit=limit,
        n_boot=n_boot,
        seconds=seconds,
        memorization=memo,
        info=info,
        history_len=np.array([len(s.history) for s in chosen], dtype=np.int64),
    )


def compare(
    a: dict | EvalResult,
    b: dict | EvalResult,
    *,
    n_boot: int = DEFAULT_B,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
    with_replicates: bool = False,
) -> dict:
    """Paired bootstrap of ``a - b`` per metric; ``a`` and ``b`` must hold the same samples.

    Samples are paired by key, so the two files may list them in different orders.
    """
    ra = a if isinstance(a, EvalResult) else EvalResult.from_json(a)
    rb = b if isinstance(b, EvalResult) else EvalResult.from_json(b)
    ka, kb = set(ra.keys), set(rb.keys)
    if ka != kb:
        raise ValueError(
            f"cannot pair {ra.method!r} ({len(ka)} samples) with {rb.method!r} ({len(kb)} samples): "
            f"{len(ka - kb)} samples only in the first, {len(kb - ka)} only in the second "
            f"(evaluate both on the same split with the same --limit and seed)"
        )
    pos_b = {k: i for i, k in enumerate(rb.keys)}
    order_b = np.array([pos_b[k] for k in ra.keys], dtype=np.int64)
    pa, pb = per_sample_metrics(ra.ranks), per_sample_metrics(rb.ranks[order_b])
    out: dict[str, Any] = {"a": ra.method, "b": rb.method, "n": ra.n, "n_boot": n_boot, "seed": seed}
    for m in metrics:
        out[m] = paired_diff_ci(pa[m], pb[m], n_boot=n_boot, seed=seed).to_json(with_replicates)
    return out


# ----------------------------------------------------------------------------- method registry


@dataclass
class MethodContext:
    """What a method factory gets: the prepared dataset, its options and a folder for its artefacts."""

    dataset: Any  # model.data.prepared.PreparedDataset
    options: dict = field(default_factory=dict)
    artefact_dir: Path | None = None
    seed: int = 0
    progress: bool = True


MethodFactory = Callable[[MethodContext], Ranker]
_REGISTRY: dict[str, MethodFactory] = {}
# Modules that register methods when imported; other modules append themselves (or the CLI does).
PLUGIN_MODULES: list[str] = ["model.baselines", "model.eval.llm_methods"]


def register_method(name: str, factory: MethodFactory) -> None:
    """Make ``get_method(name, ...)`` build a ranker with ``factory(ctx)``; re-registering replaces."""
    _REGISTRY[name] = factory


def _load_plugins() -> None:
    for mod in PLUGIN_MODULES:
        importlib.import_module(mod)


def available_methods() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def get_method(
    name: str,
    *,
    dataset: Any,
    options: dict | None = None,
    artefact_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Ranker:
    """Build the ranker registered as ``name`` (``pkg.module:factory`` also works)."""
    if name not in _REGISTRY:
        if ":" in name:
            mod, _, attr = name.partition(":")
            register_method(name, getattr(importlib.import_module(mod), attr))
        else:
            _load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}")
    ctx = MethodContext(
        dataset=dataset,
        options=dict(options or {}),
        artefact_dir=Path(artefact_dir) if artefact_dir is not None else None,
        seed=seed,
        progress=progress,
    )
    return _REGISTRY[name](ctx)
