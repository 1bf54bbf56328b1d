"""The key schema: every key of one user carries the hash tag ``{<user>}``.

    <ns>:u:{<user>}:events   ZSET, all scores 0, members ordered lexicographically (codec.event_member)
    <ns>:u:{<user>}:eids     SET of the event ids now in the window (idempotency index)
    <ns>:u:{<user>}:vec      HASH element key (an event id) -> fingerprinted float16 vector (codec.pack_vector)
    <ns>:u:{<user>}:meta     HASH: "fingerprint" (last encoder used), "appended" (events ever accepted)

The hash tag puts a user's four keys in one cluster slot, so one Lua script can touch them all
atomically on a Redis Cluster too. User ids are escaped (``%`` ``{`` ``}`` as ``%25`` ``%7B``
``%7D``) so that no user id can end the tag early or collide with another user's escaped form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_USER_ID_CHARS = 128
MAX_ITEM_ID_CHARS = 256
MAX_EVENT_ID_CHARS = 128
MAX_FINGERPRINT_CHARS = 256
DEFAULT_NAMESPACE = "automr"

# Unicode category Cc (C0, DEL, C1) and lone surrogates (Cs, which cannot be encoded as UTF-8).
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D"})


def check_text(value: object, what: str, max_chars: int) -> str:
    """Return ``value`` if it is a usable identifier, else raise ValueError saying why.

    Usable: a non-empty ``str`` of at most ``max_chars`` characters, no control characters
    (Unicode category Cc, which includes the store's separator ``\\x1f``) and no lone surrogates.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    if not value:
        raise ValueError(f"{what} is empty")
    if len(value) > max_chars:
        raise ValueError(f"{what} has {len(value)} characters, the limit is {max_chars}: {value[:40]!r}...")
    bad = _FORBIDDEN.search(value)
    if bad is not None:
        raise ValueError(f"{what} {value!r} contains the control character {bad.group()!r} at position {bad.start()}")
    return value


def escape_user_id(user_id: str) -> str:
    """Validate a user id and escape it for use inside the ``{...}`` hash tag."""
    return check_text(user_id, "user_id", MAX_USER_ID_CHARS).translate(_ESCAPES)


@dataclass(frozen=True, slots=True)
class UserKeys:
    """The four keys of one user (str; redis-py encodes them as UTF-8)."""

    events: str
    eids: str
    vec: str
    meta: str

    def all(self) -> list[str]:
        return [self.events, self.eids, self.vec, self.meta]


def check_namespace(namespace: str) -> str:
    check_text(namespace, "namespace", 64)
    if any(c in namespace for c in "{}*?[]"):
        raise ValueError(f"namespace {namespace!r} must not contain any of {{}}*?[]")
    return namespace


def user_keys(user_id: str, namespace: str = DEFAULT_NAMESPACE) -> UserKeys:
    base = f"{namespace}:u:{{{escape_user_id(user_id)}}}:"
    return UserKeys(events=base + "events", eids=base + "eids", vec=base + "vec", meta=base + "meta")


def user_key_pattern(user_id: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """A SCAN MATCH pattern for every key of one user (glob characters escaped)."""
    tag = escape_user_id(user_id)
    for ch in "\\*?[]":
        tag = tag.replace(ch, "\\" + ch)
    return f"{namespace}:u:{{{tag}}}:*"
