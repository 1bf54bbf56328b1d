"""One-hop memorization analysis (METHOD.md §4, after the memorization study ``003_…``).

Exact definitions used here:

- **Training transitions** ``T``: the set of ordered item pairs ``(a, b)`` with ``a = s.history[-1]``
  and ``b = s.target`` for every TRAIN sample ``s``; i.e. ``b`` directly follows ``a`` in a user's
  sequence (sorted by ``(timestamp, item_id)``), and ``b``'s interaction lies in the training period.
  Pairs inside the history (``history[i] -> history[i+1]``) are not added by default: every such pair
  whose second item has at least ``K`` predecessors is already the (last item, target) pair of an
  earlier train sample; only the first ``K`` transitions of each user differ. ``include_history=True``
  adds them too. Pairs are directed and counted once (a set), whichever users made them.
- **Memorized top-1**: for an evaluated sample ``s`` with top-1 recommendation ``r``, the
  recommendation is memorized when ``(s.history[-1], r) in T``, i.e. ``r`` is a one-hop training
  successor of the sample's last short-term item. ``memorized_top1_share`` is the mean over samples
  (samples with an empty top-1 slot count as not memorized).
- **Covered sample**: ``(s.history[-1], s.target) in T``: the target itself is a one-hop training
  successor of the last short-term item. The metrics are reported separately on covered and
  uncovered samples (``covered`` / ``uncovered``), with their counts.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from model.data.types import Sample
from model.eval.metrics import mean_metrics

Transitions = set[tuple[int, int]]


def one_hop_transitions(train_samples: Iterable[Sample], include_history: bool = False) -> Transitions:
    """The set ``T`` of (previous item, next item) pairs of the training samples (see module doc)."""
    pairs: Transitions = set()
    for s in train_samples:
        if not s.history:
            raise ValueError(f"train sample of user {s.user_id} at {s.timestamp} has an empty history")
        pairs.add((s.history[-1], s.target))
        if include_history:
            h = s.history
            pairs.update(zip(h[:-1], h[1:]))
    return pairs


def covered_mask(samples: Sequence[Sample], transitions: Transitions) -> np.ndarray:
    """[n] bool: the target is a training one-hop successor of the sample's last history item."""
    return np.array([(s.history[-1], s.target) in transitions for s in samples], dtype=bool)


def memorized_top1_mask(samples: Sequence[Sample], top1: np.ndarray, transitions: Transitions) -> np.ndarray:
    """[n] bool: the top-1 recommendation is a training one-hop successor of the last history item."""
    if len(samples) != len(top1):
        raise ValueError(f"{len(samples)} samples but {len(top1)} top-1 items")
    return np.array(
        [int(r) >= 0 and (s.history[-1], int(r)) in transitions for s, r in zip(samples, top1)], dtype=bool
    )


def memorization_report(
    samples: Sequence[Sample], ranks: np.ndarray, top1: np.ndarray, transitions: Transitions
) -> dict:
    """The memorization block of an evaluation result (see module doc for the definitions)."""
    ranks = np.asarray(ranks)
    cov = covered_mask(samples, transitions)
    mem = memorized_top1_mask(samples, np.asarray(top1), transitions)
    return {
        "n_transitions": len(transitions),
        "memorized_top1_share": float(mem.mean()) if mem.size else float("nan"),
        "n_memorized_top1": int(mem.sum()),
        "covered_share": float(cov.mean()) if cov.size else float("nan"),
        "covered": {"n": int(cov.sum()), **mean_metrics(ranks[cov])},
        "uncovered": {"n": int((~cov).sum()), **mean_metrics(ranks[~cov])},
    }
