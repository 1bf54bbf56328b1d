"""The users-and-memory service between the HTTP layer and the model: users' windows and memory
vectors in Redis, the request modes, and the model worker's recommend.

A user's stored window (``MemoryStore``: the newest 100 events, oldest first) is read as

    events  e_0 .. e_{n-1}                 (events whose item the catalogue knows; others are skipped)
    short-term context  = items of the last K events            (or the request's ``recent_items``)
    memory              = the elements of e_0 .. e_{n-K-1}       (up to 90)

The element of event ``m`` (METHOD.md §3, ``model/memory.py``) is the layer-L last-token state of the
generation prompt of the K items ending at ``m`` (fewer for the first ones), stored under ``m``'s
event id with the encoder's fingerprint. The element of the newest event is the current query
``z_t`` (the same prompt), so it is stored too and reused as the query. Vectors are float16 in the
store; freshly encoded ones are rounded to float16 before use so that a recommendation does not
depend on whether a vector was just encoded or read back.

Missing or stale vectors (another fingerprint: model or L changed) are encoded in the request that
needs them and stored; the background encoder encodes those of new events right
after their append (``service/background_encoder.py``). Item elements depend on the item alone: they
come from the table encoded once at start-up (``MemoryElements``: no model call), and an append stores
them with its events. Before storing, the user's window is read again and only vectors whose window
is unchanged are written (an out-of-order event may have changed it meanwhile).
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from memory_store import Event, MemoryStore, StoreUnavailable, UserState
from model import context
from model.recommend import RecommendRequest
from service import modes
from service.components import Components
from service.errors import ApiError
from service.memory_elements import MemoryElements
from service.modes import MEMORY_POLICIES, SLOT_POLICIES, ModeChoice
from service.worker import ModelWorker
from service.schemas import (
    EventIn,
    HistoryEventOut,
    HistoryOut,
    InteractionsOut,
    ItemOut,
    MemoryOut,
    RecommendIn,
    RecommendOut,
)

log = logging.getLogger(__name__)

def fp16(x: np.ndarray) -> np.ndarray:
    """Round to float16 and back: what the store keeps."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


@dataclass
class UserView:
    """A consistent snapshot of one user's stored window, restricted to catalogue items."""

    events: list[Event]
    items: list[int]  # dense item index of each event
    vectors: dict[str, np.ndarray]  # event id -> [H] float32 (fresh under our fingerprint only)
    skipped: int  # stored events whose item is not in the catalogue

    def window(self, p: int, k: int) -> tuple[int, ...]:
        """Item indices of the element of event ``p``: the K items ending at ``p``."""
        return context.window(self.items, p, k)

    def window_ids(self, p: int, k: int) -> tuple[str, ...]:
        return tuple(e.event_id for e in context.window(self.events, p, k))


class UserService:
    def __init__(self, components: Components, store: MemoryStore, runner: ModelWorker, elements: MemoryElements,
                 slot_policy: str | None = None, max_batch_events: int = 1000, redis_threads: int = 32):
        self.c = components
        self.store = store
        self.runner = runner
        self.elements = elements
        self.max_batch_events = max_batch_events
        p = components.pipeline
        self.k = p.k_short
        self.element = p.element
        self.fingerprint = p.memory_fingerprint()
        self.slot_policy = slot_policy or ("learned" if p.retriever is not None else "none")
        if self.slot_policy == "learned" and p.retriever is None:
            raise ValueError("AUTOMR_SLOT_POLICY=learned needs a trained retriever (ARTEFACTS/retriever)")
        if self.slot_policy not in SLOT_POLICIES:
            raise ValueError(f"unknown slot policy {self.slot_policy!r}")
        self.background_encoder = None  # set by the app state when background encoding is on
        # Redis calls block a thread each (an append waits for the AOF fsync): a pool of their own, so
        # that concurrent appends share fsyncs and never queue behind other to_thread work
        self._redis_pool = ThreadPoolExecutor(max_workers=redis_threads, thread_name_prefix="automr-redis")

    async def _io(self, fn, *args):
        """A blocking store call on the Redis pool; the request's context (its id) travels with it."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._redis_pool, call)

    def close(self) -> None:
        """Release the Redis pool's threads (after shutdown; calls still running finish)."""
        self._redis_pool.shutdown(wait=False)

    # ---- helpers ---------------------------------------------------------------------------------

    @property
    def uses_memory(self) -> bool:
        """Can any request use memory vectors (so that encoding them ahead is worth it)?"""
        return self.slot_policy != "none" or self.c.pipeline.retriever is not None

    def choose(self, mode: str | None) -> ModeChoice:
        """``mode`` of a request -> the slot policy and recommender that serve it."""
        return modes.choose(mode, self.slot_policy, self.c.pipeline.retriever is not None)

    def item_indices(self, item_ids: Sequence[str], where: str) -> list[int]:
        """Dense indices of catalogue item ids; 422 ``unknown_item`` naming every unknown one.
        ``where``: how to name position j, e.g. ``"recent_items[{j}]"``."""
        cat = self.c.catalogue
        idx = [cat.get_index(i) for i in item_ids]
        unknown = [f"{where.format(j=j)} {item_ids[j]!r}" for j, x in enumerate(idx) if x is None]
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ApiError(422, "unknown_item", f"not in the catalogue: {', '.join(unknown[:5])}{more}")
        return idx  # type: ignore[return-value]

    def view(self, state: UserState) -> UserView:
        cat = self.c.catalogue
        events, items = [], []
        for e in state.events:
            i = cat.get_index(e.item_id)
            if i is not None:
                events.append(e)
                items.append(i)
        return UserView(events, items, state.vectors, len(state.events) - len(events))

    async def _state(self, user_id: str) -> UserView:
        state = await self._io(self.store.get_user_state, user_id, self.fingerprint)
        return self.view(state)

    async def _element_vectors(self, windows: Sequence[tuple[int, ...]]) -> np.ndarray:
        """[n, H] float32, rounded to float16 as stored: the memory element of each window. Item
        elements come from the table encoded once at start-up (no model call), window elements
        from the model."""
        table = self.elements.item_vectors([w[-1] for w in windows])
        if table is not None:
            return table.astype(np.float32)
        return fp16(await self.runner.encode(windows))

    async def _encode(self, view: UserView, positions: Sequence[int]) -> dict[str, np.ndarray]:
        """The elements of events at ``positions``: event id -> float16-rounded [H] vector."""
        vecs = await self._element_vectors([view.window(p, self.k) for p in positions])
        return {view.events[p].event_id: vecs[j] for j, p in enumerate(positions)}

    async def _store_vectors(self, user_id: str, view: UserView, vectors: dict[str, np.ndarray]) -> int:
        """Store vectors computed from ``view`` whose window is still the same in the store now."""
        if not vectors:
            return 0
        now = await self._state(user_id)
        pos_then = {e.event_id: p for p, e in enumerate(view.events)}
        pos_now = {e.event_id: p for p, e in enumerate(now.events)}
        k = self.k if self.element == "window" else 1
        keep = {}
        for eid, v in vectors.items():
            p1, p2 = pos_then[eid], pos_now.get(eid)
            if p2 is not None and eid not in now.vectors and view.window_ids(p1, k) == now.window_ids(p2, k):
                keep[eid] = v
        if not keep:
            return 0
        res = await self._io(self.store.put_vectors, user_id, self.fingerprint, keep)
        return res.stored

    # ---- POST /recommend -------------------------------------------------------------------------

    async def recommend(self, req: RecommendIn) -> RecommendOut:
        t0 = time.perf_counter()
        k = self.k
        choice = self.choose(req.mode)
        recent = self.item_indices(req.recent_items, "recent_items[{j}]") if req.recent_items else None
        view = await self._state(req.user_id)
        n = len(view.items)
        if n == 0 and recent is None:
            return self._popularity(req, t0)

        n_mem = context.n_memory(n, k)  # memory: every event older than the last K
        items = context.prompt_items(view.items, k, choice.recommender == "full-history", recent)
        exclude = (set(view.items) | set(recent or [])) if req.exclude_seen else set()

        memory = query = None
        put = None
        if choice.policy in MEMORY_POLICIES and n_mem > 0:
            # the memory elements, and the newest event's element as z_t when the context is the stored one
            stored_query = recent is None and self.element == "window"
            need = list(range(n_mem)) + ([n - 1] if stored_query else [])
            missing = [p for p in need if view.events[p].event_id not in view.vectors]
            vectors = dict(view.vectors)
            if missing:
                fresh = await self._encode(view, missing)
                vectors.update(fresh)
                put = asyncio.create_task(self._store_vectors(req.user_id, view, fresh))
            memory = torch.from_numpy(np.stack([vectors[e.event_id] for e in view.events[:n_mem]]))  # [M, H]
            if stored_query:
                query = torch.from_numpy(vectors[view.events[n - 1].event_id])  # [H]
        seed = zlib.crc32(f"{req.user_id}:{n}:{view.events[-1].event_id if n else ''}".encode())
        request = RecommendRequest(context=items, memory=memory, exclude=exclude, query=query, seed=seed)
        try:
            background = None if req.priority is None else req.priority == "background"
            rec = (await self.runner.recommend(choice.recommender, [request], topk=req.k, background=background))[0]
        finally:
            if put is not None:
                try:
                    await put
                except StoreUnavailable as e:  # the answer stands; the vectors are encoded again next time
                    log.warning("could not store memory vectors of user %r: %s", req.user_id, e)

        mem_out = None
        if n_mem > 0:
            mem_out = MemoryOut(used=False, elements=n_mem)
            if rec.memory_indices:
                i = rec.memory_indices[0]
                score = rec.memory_scores[0] if rec.memory_scores else float("nan")
                mem_out = MemoryOut(used=True, item_id=view.events[i].item_id, timestamp=view.events[i].timestamp,
                                    score=None if math.isnan(score) else float(score), elements=n_mem)
        cat = self.c.catalogue
        beam = dict(zip(rec.beam_items, rec.beam_scores))
        items = [ItemOut(item_id=cat.item_ids[i], title=cat.titles[i], score=float(beam[i]), source="beam")
                 if i in beam else
                 ItemOut(item_id=cat.item_ids[i], title=cat.titles[i], score=-math.sqrt(max(d, 0.0)), source="grounding")
                 for i, d in zip(rec.items, rec.distances)]
        return RecommendOut(
            user_id=req.user_id, items=items, memory=mem_out, fallback=None, mode=choice.mode,
            slot_policy=choice.policy, generated=rec.generated, model_version=self.c.model_version,
            latency_ms=round((time.perf_counter() - t0) * 1e3, 2),
        )

    def _popularity(self, req: RecommendIn, t0: float) -> RecommendOut:
        cat = self.c.catalogue
        items = [ItemOut(item_id=cat.item_ids[i], title=cat.titles[i], score=float(self.c.popularity[i]),
                         source="popularity") for i in self.c.most_popular(req.k)]
        return RecommendOut(
            user_id=req.user_id, items=items, memory=None, fallback="popularity", mode=None, slot_policy=None,
            generated=None, model_version=self.c.model_version,
            latency_ms=round((time.perf_counter() - t0) * 1e3, 2),
        )

    # ---- POST /interactions ----------------------------------------------------------------------

    async def append(self, events: Sequence[EventIn]) -> InteractionsOut:
        if len(events) > self.max_batch_events:
            raise ApiError(413, "batch_too_large",
                           f"{len(events)} events in one request; the limit is {self.max_batch_events} "
                           "(AUTOMR_MAX_BATCH_EVENTS): split the batch")
        items = self.item_indices([e.item_id for e in events], "events[{j}].item_id")  # the whole batch or nothing
        groups: dict[str, list[Event]] = {}
        for e in events:
            groups.setdefault(e.user_id, []).append(Event(item_id=e.item_id, timestamp=e.timestamp, event_id=e.event_id))
        # item elements depend on the item alone: stored with the events, in the same script (no model call)
        table = self.elements.item_vectors(items)
        vectors: dict[str, dict[str, np.ndarray]] | None = None
        if table is not None:
            vectors = {}
            for e, v in zip(events, table):
                vectors.setdefault(e.user_id, {}).setdefault(e.event_id, v)  # a repeated id: the first (as stored)
        results = await self._io(self.store.append_many, groups, vectors, self.fingerprint)
        if self.background_encoder is not None:  # new events without a vector, vectors deleted by an out-of-order event
            self.background_encoder.submit([u for u, r in results.items() if r.added > r.vectors or r.invalidated])
        return InteractionsOut(
            added=sum(r.added for r in results.values()),
            duplicates=sum(r.duplicates for r in results.values()),
            too_old=sum(r.too_old for r in results.values()),
            users=len(results),
        )

    async def encode_users(self, user_ids: Sequence[str]) -> int:
        """Encode and store every missing vector of these users' windows (the background worker's job).
        At most one model call for all of them; returns the number of vectors stored."""
        views = await asyncio.gather(*(self._state(u) for u in user_ids))
        jobs = [(u, v, [p for p, e in enumerate(v.events) if e.event_id not in v.vectors]) for u, v in zip(user_ids, views)]
        jobs = [j for j in jobs if j[2]]
        if not jobs:
            return 0
        windows = [v.window(p, self.k) for _, v, missing in jobs for p in missing]
        vecs = await self._element_vectors(windows)
        stored, at = 0, 0
        for u, v, missing in jobs:
            fresh = {v.events[p].event_id: vecs[at + j] for j, p in enumerate(missing)}
            at += len(missing)
            stored += await self._store_vectors(u, v, fresh)
        return stored

    # ---- /users/{id} -----------------------------------------------------------------------------

    async def history(self, user_id: str) -> HistoryOut:
        events = await self._io(self.store.history, user_id)
        if not events:
            raise ApiError(404, "unknown_user", f"user {user_id!r} has no stored interactions")
        cat = self.c.catalogue
        out = []
        for e in events:
            i = cat.get_index(e.item_id)
            out.append(HistoryEventOut(event_id=e.event_id, item_id=e.item_id, timestamp=e.timestamp,
                                       title=cat.titles[i] if i is not None else None))
        return HistoryOut(user_id=user_id, events=out)

    async def delete(self, user_id: str) -> bool:
        return await self._io(self.store.delete_user, user_id)
