"""Value types of the memory store: events in, append results and user state out."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Event:
    """One interaction of a user: ``item_id`` at ``timestamp`` (int seconds), named by ``event_id``.

    ``event_id`` is the idempotency key: a retried event must reuse it. The store keeps the first
    ``(item_id, timestamp)`` written under an event id and ignores later writes of the same id.
    """

    item_id: str
    timestamp: int
    event_id: str

    @classmethod
    def from_interaction(cls, item_id: str, timestamp: int) -> "Event":
        """An event whose id is derived from ``(timestamp, item_id)``: for seeding datasets that
        have no event ids (one user rating one item twice in the same second becomes one event)."""
        digest = hashlib.blake2b(f"{int(timestamp)}\x1f{item_id}".encode(), digest_size=12).hexdigest()
        return cls(item_id=item_id, timestamp=int(timestamp), event_id="d" + digest)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one append did to one user's window.

    added: new events now in the window
    duplicates: events whose id was already in the window, or repeated within the batch (ignored)
    trimmed: events of the window pushed out at the oldest end by the cap (ids and vectors deleted)
    invalidated: vectors deleted because an out-of-order event landed before their window's end
    too_old: new events older than the whole (full) window, dropped at once; this is also what a
        retry of an event trimmed long ago gives (the window keeps only its own ids): no change
    vectors: memory vectors given with the events and stored (new events still in the window)
    """

    added: int
    duplicates: int
    trimmed: int = 0
    invalidated: int = 0
    too_old: int = 0
    vectors: int = 0


@dataclass(slots=True)
class UserState:
    """A user's window as one consistent snapshot.

    events: oldest first, ordered by (timestamp, item_id, event_id)
    vectors: element key (event id) -> float32 vector [H], only those stored under the asked fingerprint
    stale_keys: element keys whose vector was stored under another fingerprint (re-encode them)
    """

    events: list[Event]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    stale_keys: list[str] = field(default_factory=list)

    @property
    def missing_keys(self) -> list[str]:
        """Event ids (oldest first) without a vector under the asked fingerprint: stale or never encoded."""
        return [e.event_id for e in self.events if e.event_id not in self.vectors]


@dataclass(slots=True)
class LoadResult:
    """Totals of a bulk load. trimmed: events outside the newest ``cap`` (dropped before sending,
    too old for the window, or pushed out of it); duplicates: repeated ids (in a history or already stored)."""

    users: int = 0
    events: int = 0
    added: int = 0
    duplicates: int = 0
    trimmed: int = 0


@dataclass(frozen=True, slots=True)
class PutResult:
    """stored: vectors written; rejected: keys that are not an event id in the user's window
    (never appended, or trimmed since the caller read the state): dropped, not stored."""

    stored: int
    rejected: list[str]
