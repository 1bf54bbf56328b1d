"""Byte encodings: events as sorted-set members, vectors as fingerprinted float16 blobs.

Event member (UTF-8): ``<timestamp + 2**63, 20 digits> \\x1f <item_id> \\x1f <event_id>``.
All members have score 0, so Redis orders them by bytes: the fixed-width timestamp first, then the
item id (``\\x1f`` sorts below every allowed character, so a prefix item id sorts first, exactly like
Python's ``str`` order; UTF-8 byte order is code point order), then the event id. That is the
project's ``(timestamp, item_id)`` order with a deterministic last tie-breaker.

Vector blob: ``b"v1" | uint16 LE len(fp) | fp (UTF-8) | float16 LE [H]``. The fingerprint rides in
every blob so one stale vector can never be mixed in with fresh ones.
"""
from __future__ import annotations

import struct

import numpy as np

from .keys import MAX_EVENT_ID_CHARS, MAX_FINGERPRINT_CHARS, MAX_ITEM_ID_CHARS, check_text
from .types import Event

SEP = "\x1f"
TS_OFFSET = 2**63
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT16_MAX = 65504.0
_MAGIC = b"v1"


def check_timestamp(ts: object) -> int:
    if isinstance(ts, bool) or not isinstance(ts, (int, np.integer)):
        raise ValueError(f"timestamp must be an int (seconds), got {type(ts).__name__}: {ts!r}")
    ts = int(ts)
    if not INT64_MIN <= ts <= INT64_MAX:
        raise ValueError(f"timestamp {ts} is outside the int64 range")
    return ts


def event_member(event: Event) -> tuple[bytes, bytes]:
    """Validate an event and return ``(event_id, member)`` as bytes."""
    if not isinstance(event, Event):
        raise ValueError(f"expected an Event, got {type(event).__name__}: {event!r}")
    item = check_text(event.item_id, "item_id", MAX_ITEM_ID_CHARS)
    eid = check_text(event.event_id, "event_id", MAX_EVENT_ID_CHARS)
    ts = check_timestamp(event.timestamp)
    return eid.encode(), f"{ts + TS_OFFSET:020d}{SEP}{item}{SEP}{eid}".encode()


def decode_member(member: bytes) -> Event:
    ts, item, eid = member.decode().split(SEP)
    return Event(item_id=item, timestamp=int(ts) - TS_OFFSET, event_id=eid)


def check_fingerprint(fingerprint: object) -> str:
    return check_text(fingerprint, "fingerprint", MAX_FINGERPRINT_CHARS)


def vector_header(fingerprint: str) -> bytes:
    fp = check_fingerprint(fingerprint).encode()
    return _MAGIC + struct.pack("<H", len(fp)) + fp


def to_float16(key: str, vector: object) -> np.ndarray:
    """Check one vector and return it as little-endian float16; ValueError names the key on bad input."""
    arr = np.asarray(vector)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise ValueError(f"vector {key!r} must have shape [H] with H > 0, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"vector {key!r} has dtype {arr.dtype}, expected a float array")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"vector {key!r} has non-finite values at positions {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}")
    peak = float(np.abs(arr).max())
    if peak > FLOAT16_MAX:
        raise ValueError(f"vector {key!r} has |value| {peak:g} > {FLOAT16_MAX:g}, the float16 maximum")
    return arr.astype("<f2")


def pack_vector(header: bytes, vec16: np.ndarray) -> bytes:
    return header + vec16.tobytes()


def unpack_payload(payload: bytes) -> np.ndarray:
    """float16 bytes (the blob without its header) -> float32 [H]."""
    return np.frombuffer(payload, dtype="<f2").astype(np.float32)


def split_blob(blob: bytes) -> tuple[str, np.ndarray]:
    """A whole blob -> (fingerprint, float32 [H]); for inspection and tests."""
    if blob[:2] != _MAGIC:
        raise ValueError(f"not a memory_store vector blob (starts with {blob[:4]!r})")
    (n,) = struct.unpack("<H", blob[2:4])
    return blob[4 : 4 + n].decode(), unpack_payload(blob[4 + n :])
