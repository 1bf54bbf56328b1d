"""The evaluation protocol of METHOD.md §1: filter, order, cut into samples, split by time.

Choices the method leaves open, fixed here:

- **Duplicates**: rows with the same (user, item, timestamp) are kept once, before any filtering, and
  counted. The same item again at another time is kept (a re-watch is an interaction).
- **Filtering** happens once, in this order: items with fewer than ``min_item`` interactions, then users
  with fewer than ``min_user``. Items may fall below ``min_item`` again after the user filter; that is
  the protocol (no iteration to a fixed point).
- **Re-indexing**: the surviving items get dense indices ``0..n-1`` in the natural order of their
  original ids (``loaders.sort_ids``: numeric when all ids are integers, else string order).
- **Order within a user**: by ``(timestamp, original item id in natural order)``. Because the dense
  indices follow the same order, sorting by dense index gives the identical sequence; the order does
  not depend on which other items happen to be in the catalogue.
- **Samples**: every position ``t >= k_short`` of a user's sequence (at least ``k_short`` earlier items)
  is a sample whose history is the ``min(t, max_history)`` items before it, oldest first.
- **Split**: all samples are ordered by ``(target timestamp, user id in natural order, position t)``;
  the first ``floor(n * p_train)`` are train, up to ``floor(n * (p_train + p_valid))`` valid, the rest
  test (the fractions are taken as exact decimals, so 0.8 of 10 is 8, never 7). Samples at the same
  timestamp as a boundary may fall on both sides of it; the tie-breaker makes that deterministic.
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
from tqdm.auto import tqdm

from model.data.reading import sort_ids
from model.data.types import Catalogue, Interactions, Sample

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


class ProtocolError(ValueError):
    """The data cannot yield samples under this protocol (e.g. nothing left after filtering)."""


@dataclass(frozen=True)
class ProtocolConfig:
    min_item: int = 5
    min_user: int = 20
    max_history: int = 100
    k_short: int = 10
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", tuple(float(x) for x in self.split))
        if self.min_item < 1 or self.min_user < 1:
            raise ValueError(f"min_item and min_user must be >= 1, got {self.min_item}, {self.min_user}")
        if self.k_short < 1:
            raise ValueError(f"k_short must be >= 1, got {self.k_short}")
        if self.max_history < self.k_short:
            raise ValueError(f"max_history ({self.max_history}) must be >= k_short ({self.k_short})")
        if len(self.split) != 3 or any(x < 0 for x in self.split) or abs(sum(self.split) - 1) > 1e-9:
            raise ValueError(f"split must be three non-negative fractions summing to 1, got {self.split}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ProtocolConfig":
        keys = ("min_item", "min_user", "max_history", "k_short", "split")
        return cls(**{k: (tuple(d[k]) if k == "split" else d[k]) for k in keys if k in d})


@dataclass
class ProtocolReport:
    interactions_in: int = 0
    duplicates_dropped: int = 0
    items_below_min: int = 0
    interactions_dropped_items: int = 0
    users_below_min: int = 0
    interactions_dropped_users: int = 0
    interactions: int = 0
    users: int = 0
    items: int = 0
    samples: int = 0
    train: int = 0
    valid: int = 0
    test: int = 0
    samples_target_in_history: int = 0
    split_timestamps: dict = field(default_factory=dict)  # first/last target timestamp per split

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ProtocolResult:
    interactions: Interactions  # filtered, re-indexed, sorted by (user, timestamp, item)
    splits: dict[str, list[Sample]]  # "train"/"valid"/"test", each in split order
    report: ProtocolReport

    @property
    def catalogue(self) -> Catalogue:
        return self.interactions.catalogue


@contextmanager
def no_gc():
    """Pause the cyclic GC while building many small lists (it rescans them all: 4x slower on ML-100K)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """``(n_train, n_valid, n_test)`` with floor boundaries on exact decimal fractions."""
    f0, f1 = Fraction(str(fractions[0])), Fraction(str(fractions[1]))
    a = int(n * f0)  # int() of a non-negative Fraction is floor
    b = int(n * (f0 + f1))
    return a, b - a, n - b


def _rank(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Position of each string in its natural order, and the ordered distinct values."""
    order = sort_ids(set(values.tolist()))
    pos = {v: i for i, v in enumerate(order)}
    return np.fromiter((pos[v] for v in values.tolist()), dtype=np.int64, count=len(values)), order


def apply_protocol(inter: Interactions, cfg: ProtocolConfig = ProtocolConfig(), *,
                   progress: bool = False) -> ProtocolResult:
    """Filter, re-index, cut into samples and split ``inter`` (see the module docstring)."""
    with no_gc():
        return _apply(inter, cfg, progress)


def _apply(inter: Interactions, cfg: ProtocolConfig, progress: bool) -> ProtocolResult:
    rep = ProtocolReport(interactions_in=len(inter))
    if len(inter) == 0:
        raise ProtocolError("no interactions to apply the protocol to")
    cat = inter.catalogue
    user_rank, user_ids = _rank(inter.user)  # [n]
    # items ranked by their original ids' natural order (the catalogue may be in any order)
    ordered_ids = sort_ids(cat.item_ids)
    id_rank = np.empty(len(cat), dtype=np.int64)
    id_rank[[cat.index_of(i) for i in ordered_ids]] = np.arange(len(cat))
    item_rank = id_rank[inter.item]  # [n]
    ts = inter.timestamp.astype(np.int64)

    # 1. duplicates (user, item, timestamp)
    order = np.lexsort((item_rank, ts, user_rank))
    u, it, t = user_rank[order], item_rank[order], ts[order]
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] = (u[1:] == u[:-1]) & (it[1:] == it[:-1]) & (t[1:] == t[:-1])
    rep.duplicates_dropped = int(dup.sum())
    u, it, t = u[~dup], it[~dup], t[~dup]  # sorted by (user, ts, item)

    # 2. items with < min_item interactions
    item_counts = np.bincount(it, minlength=len(cat))
    present = item_counts > 0
    rare = present & (item_counts < cfg.min_item)
    keep = ~rare[it]
    rep.items_below_min = int(rare.sum())
    rep.interactions_dropped_items = int((~keep).sum())
    u, it, t = u[keep], it[keep], t[keep]

    # 3. then users with < min_user interactions
    user_counts = np.bincount(u, minlength=len(user_ids))
    few = (user_counts > 0) & (user_counts < cfg.min_user)
    keep = ~few[u]
    rep.users_below_min = int(few.sum())
    rep.interactions_dropped_users = int((~keep).sum())
    u, it, t = u[keep], it[keep], t[keep]
    if len(u) == 0:
        raise ProtocolError(
            f"nothing left after filtering items with < {cfg.min_item} and then users with < {cfg.min_user} "
            f"interactions (input: {len(inter)} interactions, {len(user_ids)} users, {int(present.sum())} items); "
            "lower min_item/min_user or use a larger dataset"
        )

    # 4. re-index the surviving items densely, in natural id order (= item_rank order)
    surviving = np.unique(it)  # sorted ranks
    new_index = np.full(len(cat), -1, dtype=np.int64)
    new_index[surviving] = np.arange(len(surviving))
    it = new_index[it]
    new_ids = [ordered_ids[r] for r in surviving.tolist()]
    new_cat = Catalogue(item_ids=new_ids, titles=[cat.titles[cat.index_of(i)] for i in new_ids])
    users_out = np.array([user_ids[r] for r in u.tolist()], dtype=object)
    filtered = Interactions(user=users_out, item=it, timestamp=t.copy(), catalogue=new_cat)
    rep.interactions, rep.users, rep.items = len(filtered), len(np.unique(u)), len(new_cat)

    # 5. samples: rows are already grouped by user and sorted by (ts, item) within each user
    bounds = np.flatnonzero(np.diff(u)) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    ends = np.concatenate([bounds, [len(u)]]).tolist()
    items_l, ts_l, u_l = it.tolist(), t.tolist(), u.tolist()
    samples: list[Sample] = []
    keys: list[tuple[int, int, int]] = []  # (target ts, user rank, position) per sample
    k, hmax = cfg.k_short, cfg.max_history
    for s, e in tqdm(list(zip(starts, ends)), desc="samples", disable=not progress):
        seq, sts = items_l[s:e], ts_l[s:e]
        uid, ur = user_ids[u_l[s]], u_l[s]
        for pos in range(k, e - s):
            lo = max(0, pos - hmax)
            samples.append(Sample(user_id=uid, target=seq[pos], timestamp=sts[pos],
                                  history=seq[lo:pos], history_ts=sts[lo:pos]))
            keys.append((sts[pos], ur, pos))
    if not samples:
        raise ProtocolError(
            f"no user has more than k_short={cfg.k_short} interactions after filtering, so there are no samples"
        )
    rep.samples = len(samples)
    rep.samples_target_in_history = sum(s.target in s.history for s in samples)

    # 6. global temporal split with the (timestamp, user, position) tie-breaker
    order = sorted(range(len(samples)), key=keys.__getitem__)
    n_tr, n_va, n_te = split_sizes(len(samples), cfg.split)
    cut = {"train": order[:n_tr], "valid": order[n_tr:n_tr + n_va], "test": order[n_tr + n_va:]}
    splits = {name: [samples[i] for i in idx] for name, idx in cut.items()}
    rep.train, rep.valid, rep.test = n_tr, n_va, n_te
    rep.split_timestamps = {
        name: ([sp[0].timestamp, sp[-1].timestamp] if sp else None) for name, sp in splits.items()
    }
    for name in SPLITS:
        if not splits[name]:
            log.warning("split %s is empty (%d samples in all)", name, len(samples))
    return ProtocolResult(interactions=filtered, splits=splits, report=rep)
