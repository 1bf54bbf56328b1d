"""The data types every stage shares: the catalogue, the interaction table and the sample.

Items are addressed internally by a dense index ``0..n_items-1`` into the ``Catalogue``; the original
ids are kept as strings for the outside world (the service API, reports).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model import context


@dataclass
class Catalogue:
    """Items in index order: ``item_ids[i]`` and ``titles[i]`` describe item ``i``."""

    item_ids: list[str]
    titles: list[str]
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.titles):
            raise ValueError("item_ids and titles differ in length")
        self._index = {iid: i for i, iid in enumerate(self.item_ids)}
        if len(self._index) != len(self.item_ids):
            raise ValueError("duplicate item ids in catalogue")

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_id: str) -> int:
        """Dense index of an original item id; KeyError if unknown."""
        return self._index[item_id]

    def get_index(self, item_id: str) -> int | None:
        return self._index.get(item_id)


@dataclass
class Interactions:
    """One row per interaction; ``item`` holds dense catalogue indices.

    ``user`` holds original user ids as strings. Rows are not assumed to be sorted.
    """

    user: np.ndarray  # [n] object (str)
    item: np.ndarray  # [n] int64, index into catalogue
    timestamp: np.ndarray  # [n] int64, seconds
    catalogue: Catalogue

    def __len__(self) -> int:
        return int(self.item.shape[0])


@dataclass
class Sample:
    """One next-item prediction task ``(u, t, h_t, M_{u,t}, y)`` of METHOD.md §1.

    ``history`` is the user's last (at most ``max_history``) items before the target, oldest first;
    the last ``K`` of them are the short-term context, the rest the long-term memory.
    """

    user_id: str
    target: int  # item index y
    timestamp: int  # the target's timestamp
    history: list[int]  # item indices, oldest first, len >= K
    history_ts: list[int]  # their timestamps

    def short_term(self, k: int) -> list[int]:
        return context.short_term(self.history, k)

    def memory(self, k: int) -> list[int]:
        return self.history[:context.n_memory(len(self.history), k)]

    def to_json(self) -> dict:
        return {
            "user_id": self.user_id,
            "target": self.target,
            "timestamp": self.timestamp,
            "history": self.history,
            "history_ts": self.history_ts,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Sample":
        return cls(
            user_id=str(d["user_id"]),
            target=int(d["target"]),
            timestamp=int(d["timestamp"]),
            history=[int(x) for x in d["history"]],
            history_ts=[int(x) for x in d["history_ts"]],
        )
