"""Request and response bodies of the HTTP API (docs/SERVICE.md).

Ids (user, item, event) are strings; JSON integers are accepted and turned into their decimal string
(MovieLens ids are numbers), so ``"item_id": 50`` and ``"item_id": "50"`` are the same item. Unknown
fields are rejected (a misspelt ``exlude_seen`` must not be silently ignored).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from memory_store.keys import MAX_EVENT_ID_CHARS, MAX_ITEM_ID_CHARS, MAX_USER_ID_CHARS, check_text
from service.modes import Mode

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_RECENT_ITEMS = 100


def _int_to_str(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return v


def _checked(what: str, max_chars: int):
    def check(v: str) -> str:
        return check_text(v, what, max_chars)  # ValueError: empty, too long, control characters

    return AfterValidator(check)


UserId = Annotated[str, BeforeValidator(_int_to_str), _checked("user_id", MAX_USER_ID_CHARS)]
ItemId = Annotated[str, BeforeValidator(_int_to_str), _checked("item_id", MAX_ITEM_ID_CHARS)]
EventId = Annotated[str, BeforeValidator(_int_to_str), _checked("event_id", MAX_EVENT_ID_CHARS)]
Timestamp = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX, description="seconds (int64)")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- /recommend ---------------------------------------------------------------------------------


class RecommendIn(_In):
    user_id: UserId
    k: int = Field(default=10, ge=1, le=100, description="number of items to return")
    exclude_seen: bool = Field(default=True, description="never recommend an item of the user's history")
    recent_items: list[ItemId] | None = Field(
        default=None, min_length=1, max_length=MAX_RECENT_ITEMS,
        description="item ids, oldest first: the short-term context instead of the stored one (its last K)")
    mode: Mode | None = Field(default=None, description="automr | bigrec | full-history (default: the server's policy)")
    priority: Literal["interactive", "background"] | None = Field(
        default=None,
        description="background: nobody waits for this answer (e.g. precomputing recommendations); it yields "
                    "the model to the other requests. Default: the mode's (AUTOMR_BACKGROUND_MODES: full-history)")


class ItemOut(BaseModel):
    item_id: str
    title: str
    # on the scale of the item's source: 'beam', the beam's score of the title (its log-probability among
    # the user's unseen titles + the popularity prior); 'grounding', minus the L2 distance to the
    # generated title; 'popularity' (the fallback), the item's training count
    score: float
    source: Literal["beam", "grounding", "popularity"]


class MemoryOut(BaseModel):
    used: bool  # an element filled the slot
    item_id: str | None = None  # the interaction that ends the selected window
    timestamp: int | None = None
    score: float | None = None  # the slot policy's score of the element (null for 'random')
    elements: int  # memory elements the policy chose from


class RecommendOut(BaseModel):
    user_id: str
    items: list[ItemOut]
    memory: MemoryOut | None
    fallback: Literal["popularity"] | None
    mode: Mode | None  # None with the popularity fallback
    slot_policy: str | None
    generated: str | None  # the generated title before grounding (None with the fallback)
    model_version: str
    latency_ms: float


# ---- /interactions ------------------------------------------------------------------------------


class EventIn(_In):
    user_id: UserId
    item_id: ItemId
    timestamp: Timestamp
    event_id: EventId = Field(description="idempotency key: a retry must reuse it")


class InteractionsIn(_In):
    events: list[EventIn] = Field(min_length=1)


class InteractionsOut(BaseModel):
    added: int  # new events now stored
    duplicates: int  # event ids already stored, or repeated within the batch (ignored)
    too_old: int  # events older than a full window of 100 (dropped; also a retry of a long-trimmed event)
    users: int


# ---- /users/{id} --------------------------------------------------------------------------------


class HistoryEventOut(BaseModel):
    event_id: str
    item_id: str
    title: str | None  # None for an item that is not in the catalogue any more
    timestamp: int


class HistoryOut(BaseModel):
    user_id: str
    events: list[HistoryEventOut]  # oldest first
