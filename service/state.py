"""Start-up of the service: load once in a background thread, seed the store once, then serve.

The server starts listening at once (``/healthz`` answers 200, ``/readyz`` 503 ``not_ready``). A
loader thread then

1. loads the components (model, tuned layers, retriever, FAISS index, catalogue, popularity) or takes
   the injected ones,
2. opens the store (``REDIS_URL``; else the embedded redis-server on ``AUTOMR_HOME/redis``),
3. seeds it from the prepared dataset's ``interactions.csv`` unless the marker key
   ``<ns>:seeded:<dataset id>`` says this dataset was loaded before (so users erased later are not
   brought back by a restart); while Redis is unreachable it retries every few seconds,
4. builds the runner and the engine and flips ``/readyz`` to 200.

A failure in 1 or 4 leaves the process up with ``/readyz`` 503 and the reason in ``detail``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Callable

from memory_store import EmbeddedRedis, MemoryStore, StoreUnavailable, open_store
from memory_store.errors import is_unavailable
from service.components import Components, load_components
from service.engine import EncoderWorker, Engine
from service.runner import ModelRunner
from service.settings import Settings

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
    try:
        if store.client.exists(key):
            return None
    except Exception as e:
        if is_unavailable(e):
            raise StoreUnavailable(f"redis unavailable while checking {key}: {e}") from e
        raise
    t0 = time.perf_counter()
    res = store.load_histories(components.histories(), progress=progress)
    summary = {"users": res.users, "events": res.events, "added": res.added, "duplicates": res.duplicates,
               "trimmed": res.trimmed, "seconds": round(time.perf_counter() - t0, 2), "at": int(time.time())}
    try:
        store.client.set(key, json.dumps(summary))
    except Exception as e:
        if is_unavailable(e):
            raise StoreUnavailable(f"redis unavailable while setting {key}: {e}") from e
        raise
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
        self.engine: Engine | None = None
        self.runner: ModelRunner | None = None
        self.encoder: EncoderWorker | None = None
        self.phase = "starting"
        self.error: str | None = None
        self.seeded: dict | None = None
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready_at: float | None = None
        self.started_at = time.time()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def status(self) -> dict:
        out = {"status": "ready" if self.ready else self.phase}
        if self.error:
            out["error"] = self.error
        if self.components is not None:
            out["model_version"] = self.components.model_version
            out["dataset"] = self.components.dataset_name
        if self.engine is not None:
            out["slot_policy"] = self.engine.slot_policy
            out["k_short"] = self.engine.k
            out["memory_fingerprint"] = self.engine.fingerprint
        return out

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._load, name="automr-loader", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        s = self.settings
        try:
            self.phase = "loading"
            src = self._source
            comp = src() if callable(src) else (src if src is not None else load_components(s))
            self.components = comp
            if self.store is None:
                self.store, self.server = open_store(s.redis_url, s.home, appendfsync=s.redis_appendfsync,
                                                     socket_timeout=s.redis_timeout_s, namespace=s.redis_namespace)
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
            cfg = dict(max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, batch_size=s.llm_batch_size)
            recommenders = {pol: p.recommender(pol, **cfg) for pol in ("none", "random", "semantic")}
            if p.retriever is not None:
                recommenders["learned"] = p.recommender("learned", **cfg)
            recommenders["full-history"] = p.recommender("none", full_history=True, **cfg)
            self.runner = ModelRunner(p, recommenders, batch_size=s.llm_batch_size)
            engine = Engine(comp, self.store, self.runner, slot_policy=s.slot_policy,
                            max_batch_events=s.max_batch_events)
        except Exception as e:  # keep the process up: /readyz tells why
            self.phase = "failed"
            self.error = f"start-up failed: {type(e).__name__}: {e}"
            log.exception("start-up failed")
            return
        try:
            self._loop.call_soon_threadsafe(self._became_ready, engine)
        except RuntimeError:  # the loop closed while we loaded (shutdown)
            pass

    def _became_ready(self, engine: Engine) -> None:
        if self._stop.is_set():
            return
        s = self.settings
        if s.encode_on_write and engine.uses_memory:
            self.encoder = EncoderWorker(engine, queue_size=s.encoder_queue_size, batch_users=s.encoder_batch_users)
            self.encoder.start()
            engine.encoder_worker = self.encoder
        self.engine = engine
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
        self._stop.set()
        if self.encoder is not None:
            await self.encoder.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        if self.runner is not None:
            self.runner.close()
        if self._own_store and self.store is not None:
            self.store.close()
        if self.server is not None and self.server.owned:
            self.server.stop()
