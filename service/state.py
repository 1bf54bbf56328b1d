"""Start-up of the service: load once in a background thread, seed the store once, then serve.

The server starts listening at once (``/healthz`` answers 200, ``/readyz`` 503 ``not_ready``). A
loader thread then

1. loads the components (model, tuned layers, retriever, FAISS index, catalogue, popularity) or takes
   the injected ones,
2. opens the store (``REDIS_URL``; else the embedded redis-server on ``AUTOMR_HOME/redis``),
3. seeds it from the prepared dataset's ``interactions.csv`` unless the marker key
   ``<ns>:seeded:<dataset id>`` says this dataset was loaded before (so users erased later are not
   brought back by a restart); while Redis is unreachable it retries every few seconds,
4. builds the model worker and the users service and flips ``/readyz`` to 200.

A failure in 1 or 4 leaves the process up with ``/readyz`` 503 and the reason in ``detail``.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from typing import Callable

import torch

from memory_store import EmbeddedRedis, MemoryStore, StoreUnavailable, open_store
from model.generation.stop import stop_rule
from model.row_split import RowSplit
from service.components import Components, load_components
from service.background_encoder import BackgroundEncoder
from service.memory_elements import MemoryElements
from service.modes import build_recommenders, recommender_keys
from service.settings import Settings
from service.thread_governor import ThreadGovernor
from service.users import UserService
from service.worker import ModelWorker

log = logging.getLogger(__name__)

ComponentsSource = Components | Callable[[], Components] | None


def seed_marker_key(store: MemoryStore, components: Components) -> str:
    return f"{store.namespace}:seeded:{components.dataset_id}"


def seed_store(store: MemoryStore, components: Components, progress: bool = False) -> dict | None:
    """Load the dataset's histories into the store unless its marker key exists; returns the
    ``LoadResult`` as a dict, or None when the store was seeded before. Idempotent (event ids are
    derived from (timestamp, item)), so an interrupted seeding simply runs again."""
    if components.histories is None:
        return None
    key = seed_marker_key(store, components)
    if store.get_marker(key) is not None:
        return None
    t0 = time.perf_counter()
    res = store.load_histories(components.histories(), progress=progress)
    summary = {"users": res.users, "events": res.events, "added": res.added, "duplicates": res.duplicates,
               "trimmed": res.trimmed, "seconds": round(time.perf_counter() - t0, 2), "at": int(time.time())}
    store.set_marker(key, json.dumps(summary))
    log.info("seeded the store from %s: %s", components.dataset_name, summary)
    return summary


class AppState:
    """Readiness, the loaded pieces and their lifecycle (one per app)."""

    def __init__(self, settings: Settings, components: ComponentsSource = None, store: MemoryStore | None = None,
                 retry_s: float = 2.0):
        self.settings = settings
        self._source = components
        self.store = store
        self._own_store = store is None
        self.server: EmbeddedRedis | None = None
        self.components: Components | None = None
        self.users: UserService | None = None
        self.runner: ModelWorker | None = None
        self._row_split: RowSplit | None = None  # made here (not injected with the model): closed at stop
        self.encoder: BackgroundEncoder | None = None
        self.phase = "starting"
        self.error: str | None = None
        self.seeded: dict | None = None
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future | None = None  # set by stop(); done when shutdown finished
        self.ready_at: float | None = None
        self.started_at = time.time()

    @property
    def ready(self) -> bool:
        return self.users is not None

    def status(self) -> dict:
        out = {"status": "ready" if self.ready else self.phase}
        if self.error:
            out["error"] = self.error
        if self.components is not None:
            out["model_version"] = self.components.model_version
            out["dataset"] = self.components.dataset_name
        if self.users is not None:
            out["slot_policy"] = self.users.slot_policy
            out["k_short"] = self.users.k
            out["memory_fingerprint"] = self.users.fingerprint
        return out

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._load, name="automr-loader", daemon=True)
        self._thread.start()

    def _memory_dir(self, comp: Components):
        """Where item element vectors are cached on disk: ARTEFACTS/memory, shared with the offline
        stages (keyed by the encoder's fingerprint); None for injected components (tests)."""
        return None if self._source is not None else self.settings.resolved_artefacts_dir() / "memory"

    def _load(self) -> None:
        s = self.settings
        try:
            self.phase = "loading"
            src = self._source
            comp = src() if callable(src) else (src if src is not None else load_components(s))
            self.components = comp
            if self.store is None:
                self.store, self.server = open_store(s.redis_url, s.home, appendfsync=s.redis_appendfsync,
                                                     socket_timeout=s.redis_timeout_s, namespace=s.redis_namespace,
                                                     breaker_s=s.redis_breaker_s)
            if s.seed_store:
                self.phase = "seeding"
                while not self._stop.is_set():
                    try:
                        self.seeded = seed_store(self.store, comp)
                        self.error = None
                        break
                    except StoreUnavailable as e:
                        self.error = f"waiting for the store: {e}"
                        log.warning("%s; retrying in %.0fs", self.error, self.retry_s)
                        self._stop.wait(self.retry_s)
            if self._stop.is_set():
                return
            p = comp.pipeline
            n = torch.get_num_threads()
            if s.row_split_min_tokens and n > 1 and p.lm.row_split is None:
                p.lm.row_split = self._row_split = RowSplit(n, s.row_split_min_tokens)
                # with the governor: whole forwards until it finds another job on the CPUs
                self._row_split.active = not s.adaptive_threads
            p.draft_learn, p.ground_memo_recent = s.draft_learn, s.ground_memo_recent  # before they are built
            # the draft table and the grounding memo are built here with the recommenders, not in a request
            recommenders = build_recommenders(p, batch_size=s.llm_batch_size, **s.generation())
            elements = MemoryElements(p, batch_size=s.llm_batch_size, memory_dir=self._memory_dir(comp))
            self.runner = ModelWorker(p, recommenders, elements, max_batch=s.batch_max_size,
                                      max_wait_ms=s.batch_max_wait_ms, max_queue=s.max_queue,
                                      ground_wait_ms=s.ground_max_wait_ms,
                                      background=recommender_keys(s.background_modes, recommenders),
                                      background_share=s.background_share,
                                      background_chunk_tokens=s.background_chunk_tokens,
                                      governor=ThreadGovernor(torch.get_num_threads()) if s.adaptive_threads else None)
            users = UserService(comp, self.store, self.runner, elements, slot_policy=s.slot_policy,
                                max_batch_events=s.max_batch_events)
            self.phase = "warming up"
            stop_rule(p.lm)  # the decoding stop's token tables: once here, not in the first request
            if users.uses_memory:
                elements.warm()  # item elements: every title encoded (no-op for windows)
        except Exception as e:  # keep the process up: /readyz tells why
            self.phase = "failed"
            self.error = f"start-up failed: {type(e).__name__}: {e}"
            log.exception("start-up failed")
            return
        try:
            self._loop.call_soon_threadsafe(self._became_ready, users)
        except RuntimeError:  # the loop closed while we loaded (shutdown)
            pass

    def _became_ready(self, users: UserService) -> None:
        if self._stop.is_set():
            return
        s = self.settings
        if s.encode_on_write and users.uses_memory:
            self.encoder = BackgroundEncoder(users, queue_size=s.encoder_queue_size, batch_users=s.encoder_batch_users)
            self.encoder.start()
            users.background_encoder = self.encoder
        self.users = users
        if s.gc_freeze:
            gc.collect()
            gc.freeze()  # the loaded model and catalogue are never garbage: full collections skip them
        self.phase = "ready"
        self.ready_at = time.time()
        log.info("ready in %.1fs: %s", self.ready_at - self.started_at, self.status())

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until ready (tests); raises RuntimeError when start-up failed or took too long."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.phase == "failed":
                raise RuntimeError(self.error)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout}s (phase {self.phase}, {self.error})")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Graceful shutdown, within ``shutdown_grace_s`` in all (idempotent).

        1. No new work: ``users`` is unset, so ``/readyz`` and every API call answer 503 ``not_ready``
           (handlers already running keep their reference and finish). Under ``automr serve`` uvicorn
           has already stopped accepting connections and waited for the running requests.
        2. The background encoder takes no more users and drains its queue (bounded by the grace).
        3. The runner takes no more calls; the model call in progress and the queued ones finish
           (bounded by what is left of the grace); still queued after that: 503 ``shutting_down``.
        4. The store is closed (and the embedded redis-server stopped, AOF fsynced).
        """
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.get_running_loop().create_future()
        try:
            await self._shutdown()
        finally:
            self._stopping.set_result(None)

    async def _shutdown(self) -> None:
        t0 = time.monotonic()
        left = lambda: max(self.settings.shutdown_grace_s - (time.monotonic() - t0), 0.0)  # noqa: E731
        self._stop.set()
        self.phase = "stopping"
        users, self.users = self.users, None
        if self.encoder is not None:
            drained = await self.encoder.stop(timeout=left())
            log.info("shutdown: background encoder %s", "drained" if drained else "stopped with work left")
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        if self.runner is not None:
            done = await asyncio.to_thread(self.runner.close, left())
            log.info("shutdown: model runner %s after %.1fs", "drained" if done else "abandoned",
                     time.monotonic() - t0)
            if done and self._row_split is not None:  # the model thread no longer runs forwards
                self.runner.pipeline.lm.row_split = None
                self._row_split.close()
        if users is not None:
            users.close()
        if self._own_store and self.store is not None:
            self.store.close()
        if self.server is not None and self.server.owned:
            self.server.stop()
