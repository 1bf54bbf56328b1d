"""Every use of the model goes through a ``ModelRunner``: the LLM is CPU-bound and shared.

    await runner.encode(windows)                    -> [n, H] float32 memory element vectors
    await runner.recommend(key, requests, topk)     -> one Recommendation per request

Dynamic batching. Callers' coroutines put their call in one queue and await a future; ONE model
thread serves the queue.

- ``recommend`` of a greedy or beam-search recommender (the service's: automr, bigrec, full-history)
  is batched continuously. The rows of the requests being generated form one decoding batch
  (``model.llm.DecodeBatch``); a beam-search request holds one row per live beam (its prompt is
  prefilled once and its KV row copied to the beams). Between two decoding steps, queued calls join
  it, up to ``max_batch`` requests: their prefills (``Recommender.begin``, one per prefill group) run
  and their rows are merged in, whatever their recommender (only the prefill and the rows' search
  differ between them). Admissions take turns, a group each, with a decoding step after each turn;
  requests being prefilled count against ``max_batch``.
  With ``prefill_chunk_tokens`` (0: off), while rows decode or other prefills wait, a turn runs that
  many padded tokens of a prefill (chunked prefill: ``SplitLM.advance``), so a long prompt does not
  stop the decoding rows for its whole length at once. A row leaves as soon as its answer line is
  done, and its place is free for the next call. A call whose rows are all done is grounded and
  answered (``Recommender.finish``) together with the other done calls, in one pass: at once when
  nothing else decodes, else after at most ``ground_wait_ms`` or as soon as the done rows fill a
  batch (a grounding pass is a whole-model forward: one title costs about a decoding step, 16 cost
  a few). It never waits for the longest answer of the batch. When nothing is decoding, the
  first call waits up to ``max_wait_ms`` after its arrival for same-recommender calls to prefill
  with it.
- Background calls yield to the others (``service.priority.BackgroundPriority`` decides the order):
  those of the ``background`` recommenders (the service's full-history mode by default), unless the
  caller says otherwise (``recommend(..., background=)``). Their prefills run in
  chunks of at most ``background_chunk_tokens`` padded tokens; while other work is live, only
  within ``background_share`` of the model's time, so a full-history prompt (~1,200 tokens, ~1.2 s)
  no longer stops the short modes' rows for its whole length. With nothing else live their chunks
  run back to back, as one whole prefill, but a call arriving meanwhile waits for one chunk, not for
  the rest. Their rows decode in the shared batch like any other: the answers are the same.
- Other recommend calls (unconstrained beams through HF ``generate``, which the service does not
  configure, or a recommender on another model) run whole: up to ``max_batch`` requests of one
  recommender in one ``Recommender.recommend(all, topk=max topk)``, between two decoding steps.
- ``encode``: up to ``max_batch`` calls whose windows fit in one encoder batch (``batch_size``
  windows; a longer first call runs alone), as one encoder call of the distinct windows, split back
  by call, between two decoding steps.

Each caller gets its rows cut to its own ``topk``; the ranking is exact and tie-broken by item
index, so the first k of a longer ranking are the top k. Results do not depend on the batch beyond
floating point (padding). ``tests/test_batching.py`` checks batched == one at a time, including
calls that join a batch mid-decode. The deadline counts from the first call's arrival, so a call
that already waited behind a running model call is not held back again. Calls of other keys keep
their place in the queue. Two model calls never run at once (one thread); the event loop never
blocks on the model.

Back-pressure: ``max_queue`` requests waiting (not yet in a model call; a recommend call counts its
requests, an encode call counts 1) -> the next call raises ``QueueFull`` with ``retry_after_s``
(recent call time x batches ahead, at least 1 s). The HTTP layer answers 429 + ``Retry-After``.

Shutdown (``close``): new calls raise ``RunnerClosed`` (503); the calls in progress (the decoding
batch) and every queued call still run, for up to ``timeout`` seconds; calls still queued then fail
with ``RunnerClosed``.

``queue_depth()`` and ``add_listener(fn(kind, size, seconds))`` (called after each model call, on the
model thread: "recommend", the prefills that admitted ``size`` requests, or a whole recommend call;
"prefill_chunk", one prefill forward of ``size`` rows (whole or a chunk); "encode", an encode call;
"ground", a grounding pass of ``size`` requests) are for metrics.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch

from model.pipeline import Pipeline
from model.llm import DecodeBatch
from model.recommend import Recommendation, Recommender, RecommendRequest
from service.errors import ApiError
from service.priority import BackgroundPriority
from service.thread_governor import ThreadGovernor

log = logging.getLogger(__name__)

Listener = Callable[[str, int, float], None]  # (kind "recommend" | "prefill_chunk" | "encode" | "ground", size, seconds)


class QueueFull(Exception):
    """``max_queue`` requests are already waiting for the model; retry after ``retry_after_s``."""

    def __init__(self, depth: int, max_queue: int, retry_after_s: float):
        super().__init__(f"{depth} requests are waiting for the model (limit {max_queue}, AUTOMR_MAX_QUEUE); "
                         f"retry in {retry_after_s:.0f}s")
        self.depth, self.max_queue, self.retry_after_s = depth, max_queue, retry_after_s


class RunnerClosed(ApiError):
    """The runner is shutting down: 503 ``shutting_down`` (another replica, or this one restarted, can answer)."""

    def __init__(self, detail: str = "the server is shutting down"):
        super().__init__(503, "shutting_down", detail, headers={"Retry-After": "1"})


@dataclass(eq=False)
class _Call:
    """One caller's call, waiting in the queue."""

    kind: str  # "recommend" | "encode"
    key: str | None  # recommender key (recommend only)
    items: list  # RecommendRequests or windows
    topk: int | None
    background: bool = False  # it yields to the others (service.priority)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def weight(self) -> int:
        """What the call counts in the queue bound: its requests (recommend) or 1 (encode)."""
        return len(self.items) if self.kind == "recommend" else 1


@dataclass(eq=False)
class _Job:
    """A step-wise recommend call in the decoding batch: its rows' texts arrive as they finish."""

    call: _Call
    recommender: Recommender
    started: float = field(default_factory=time.perf_counter)
    # the memory picks of its whole admission (the prefills complete them in place), and its first row there
    admission_picks: list = field(default_factory=list)
    first_row: int = 0

    def __post_init__(self) -> None:
        self.texts: list[str | None] = [None] * len(self.call.items)  # None: the row is still decoding
        self.searches: list = [None] * len(self.call.items)  # each request's beam search (constrained)
        self.beams: list[list[int]] = [[] for _ in self.call.items]  # its beams' items, once finished
        self.done_at: float | None = None  # monotonic time its last row finished (waiting for grounding)

    @property
    def done(self) -> bool:
        return all(t is not None for t in self.texts)

    @property
    def picks(self) -> list:
        """Its rows' memory picks: complete once its rows are prefilled (``Recommender.begin``)."""
        return self.admission_picks[self.first_row: self.first_row + len(self.texts)]


@dataclass(eq=False)
class _Admission:
    """Step-wise calls admitted together: their prefills (one per prefill group), run whole or chunk
    by chunk between decoding steps; each group's rows join the decoding batch when it is done."""

    calls: list[_Call]
    jobs: list[_Job]
    prefills: deque  # of model.llm.Prefill, the oldest first
    seconds: float = 0.0  # model time spent on its prefills so far

    @property
    def background(self) -> bool:
        """Background calls are admitted together only (``_gather``): it yields to the others."""
        return self.calls[0].background

    @property
    def rows(self) -> int:
        """Rows not yet in the decoding batch."""
        return sum(p.rows for p in self.prefills)


class ModelRunner:
    def __init__(self, pipeline: Pipeline, recommenders: dict[str, Recommender], batch_size: int = 16, *,
                 max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 64, memory_dir=None,
                 ground_wait_ms: float = 0.0, prefill_chunk_tokens: int = 0, background: Collection[str] = (),
                 background_share: float = 0.25, background_chunk_tokens: int = 256,
                 governor: ThreadGovernor | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or ground_wait_ms < 0 or prefill_chunk_tokens < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0, ground_wait_ms >= 0, "
                             f"prefill_chunk_tokens >= 0; got {max_batch}, {max_queue}, {max_wait_ms}, "
                             f"{ground_wait_ms}, {prefill_chunk_tokens}")
        unknown = sorted(set(background) - set(recommenders))
        if unknown:
            raise ValueError(f"background recommenders {unknown} are not among {sorted(recommenders)}")
        self.priority = BackgroundPriority(background, background_share, background_chunk_tokens)
        self.pipeline = pipeline
        self.recommenders = recommenders
        self.encoder = pipeline.memory_encoder(batch_size=batch_size)  # memoizes item elements in memory
        if memory_dir is not None and pipeline.element == "item":
            try:  # item vectors depend on the title only: keep them on disk across restarts
                self.encoder = pipeline.cached_memory_encoder(memory_dir)
            except (OSError, ValueError) as e:
                log.warning("item vectors are not cached on disk (%s): %s", memory_dir, e)
        self.batch_size = batch_size
        self.item_table: np.ndarray | None = None  # [n_items, H] float16 item elements (warm_items)
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self.calls = 0  # model calls made (tests, metrics): a batch of many callers is one call
        self._queue: deque[_Call] = deque()
        self._depth = 0  # sum of the queued calls' weights
        self._cond = threading.Condition()
        self._busy = False  # a model call is running
        self._closing = False
        self._call_s: float | None = None  # moving average of model-call wall time (Retry-After)
        self._listeners: list[Listener] = []
        self._decoding: DecodeBatch | None = None  # the rows being decoded (continuous batching)
        self._admitting: deque[_Admission] = deque()  # admitted calls whose prefills are not all done
        self.prefill_chunk_tokens = prefill_chunk_tokens  # 0: a prefill group runs whole
        self._grounding: list[_Job] = []  # calls whose rows are all done, waiting to be grounded together
        self.ground_wait_s = ground_wait_ms / 1e3
        # intra-op threads from the CPU share the model thread gets (service/thread_governor.py)
        self.governor = governor
        self._thread = threading.Thread(target=self._work, name="automr-model", daemon=True)
        self._thread.start()

    @property
    def background(self) -> frozenset[str]:
        """Recommender keys that yield to the others (``service.priority``)."""
        return self.priority.keys

    @property
    def background_seconds(self) -> dict[str, float]:
        """Model time of background prefills since start, beside other live work or alone (/metrics)."""
        return self.priority.seconds

    # ---- the coroutines the service awaits -------------------------------------------------------

    async def encode(self, windows: Sequence[tuple[int, ...]]) -> np.ndarray:
        """[n, H] float32: the memory element of each window (item indices, oldest first)."""
        if not windows:
            return np.zeros((0, self.pipeline.lm.hidden_size), dtype=np.float32)
        return await self._submit(_Call("encode", None, list(windows), None))

    async def recommend(self, key: str, requests: Sequence[RecommendRequest], topk: int | None,
                        background: bool | None = None) -> list[Recommendation]:
        """``Recommender.recommend`` of the recommender named ``key`` (a slot policy or 'full-history').
        ``background``: the call yields to the others (None: as the runner's ``background`` keys say)."""
        if key not in self.recommenders:
            raise KeyError(f"no recommender {key!r}; have {sorted(self.recommenders)}")
        if not requests:
            return []
        bg = key in self.priority if background is None else background
        return await self._submit(_Call("recommend", key, list(requests), topk, background=bg))

    async def _submit(self, call: _Call):
        with self._cond:
            if self._closing:
                raise RunnerClosed()
            if self._depth > 0 and self._depth + call.weight > self.max_queue:
                raise QueueFull(self._depth, self.max_queue, self._retry_after())
            self._queue.append(call)
            self._depth += call.weight
            self._cond.notify()
        return await asyncio.wrap_future(call.future)  # a cancelled caller's call is skipped if not started

    # ---- metrics ---------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Requests waiting, not yet in a model call (recommend requests + encode calls)."""
        return self._depth

    def add_listener(self, fn: Listener) -> None:
        """``fn(kind, size, seconds)`` after every model call (on the model thread: keep it quick)."""
        self._listeners.append(fn)

    def _retry_after(self) -> float:
        """Seconds until the queue has room, roughly: batches ahead x recent model-call time (>= 1)."""
        ahead = math.ceil(self._depth / self.max_batch) + (1 if self._busy else 0)
        return max(1.0, (self._call_s or 1.0) * ahead)

    # ---- the model thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._holding and not self._closing:
                    self._cond.wait()
                if not self._queue and not self._holding:  # closing and drained
                    return
                batch = self._take(wait=not self._generating) if self._queue else []
                queued_background = any(c.background for c in self._queue)
                self._busy = True
            t0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                if batch and batch[0].kind == "recommend" and self._stepwise(batch[0].key):
                    self._admit(batch)
                elif batch:
                    self._run(batch)
                yielding = self._yielding(queued_background)
                self.priority.begin_turn()
                step = self._prefill() if self._admitting else True
                if self._decoding is not None and step:
                    self._step()
                self._ground()
                self.priority.end_turn(yielding, time.perf_counter() - t0)
            except Exception as e:  # never let the model thread die: fail what it holds, serve the rest
                log.exception("the model thread failed; failing the calls it held")
                self._fail_all(batch, e)
            if self.governor is not None:
                self._govern(time.perf_counter() - t0, time.thread_time() - cpu0)
            with self._cond:
                self._busy = self._holding

    def _govern(self, wall_s: float, cpu_s: float) -> None:
        """Set this (the model) thread's intra-op threads to the governor's count when it changes."""
        n = self.governor.observe(wall_s, cpu_s)
        if n is not None:
            torch.set_num_threads(n)
            log.info("model threads: %d (CPU share of the model thread %.2f)", n, self.governor.last_share)

    @property
    def _generating(self) -> bool:
        """Are rows being prefilled or decoded (continuous batching)?"""
        return self._decoding is not None or bool(self._admitting)

    @property
    def _holding(self) -> bool:
        """Does the model thread hold calls it has taken (prefilling, decoding or to be grounded)?"""
        return self._generating or bool(self._grounding)

    def _room(self) -> int:
        """Requests that can still join the decoding batch (a beam search counts once; requests being
        prefilled, a row each, count as in it)."""
        rows = (self._decoding.requests if self._decoding is not None else 0) + sum(a.rows for a in self._admitting)
        return self.max_batch - rows

    def _takeable(self, c: _Call) -> bool:
        """(Lock held.) Can ``c`` run now? While a batch is decoding, a step-wise recommend call joins
        it only if its requests fit; other calls run between two steps."""
        if not self._generating or c.kind != "recommend" or not self._stepwise(c.key):
            return True
        return len(c.items) <= self._room()

    def _take(self, wait: bool = True) -> list[_Call]:
        """(Lock held.) The oldest call, if it can run now, and the same-kind, same-key calls that join
        it; with ``wait`` (nothing decoding) up to max_wait after its arrival for more. Returns []
        when it cannot run yet or every candidate was cancelled."""
        first = self.priority.first(self._queue, self._takeable)  # a call that does not fit yet holds the later ones
        if not self._takeable(first):
            return []
        deadline = first.arrived + self.max_wait_s
        while True:
            batch = self._gather(first)
            full = self._size(batch) >= self._limit(first)
            now = time.monotonic()
            if not wait or full or self._closing or now >= deadline or len(batch) >= self.max_batch:
                break
            self._cond.wait(deadline - now)
        taken = []
        for c in batch:
            try:
                self._queue.remove(c)
            except ValueError:  # dropped by close() after its grace ran out
                continue
            self._depth -= c.weight
            if c.future.set_running_or_notify_cancel():  # False: the caller went away
                taken.append(c)
        return taken

    def _limit(self, first: _Call) -> int:
        """Items per model call: requests (recommend; those that fit in the decoding batch) or windows
        (encode); the first call is whole."""
        if first.kind == "recommend":
            room = self._room() if self._stepwise(first.key) else self.max_batch
            return max(room, len(first.items))
        return max(self.batch_size, len(first.items))

    @staticmethod
    def _size(batch: Sequence[_Call]) -> int:
        return sum(len(c.items) for c in batch)

    def _gather(self, first: _Call) -> list[_Call]:
        batch, size, limit = [first], len(first.items), self._limit(first)
        for c in self._queue:
            if len(batch) >= self.max_batch or size >= limit:
                break
            if c is first or c.kind != first.kind or c.key != first.key or c.background != first.background:
                continue
            if size + len(c.items) <= limit:
                batch.append(c)
                size += len(c.items)
        return batch

    def _run(self, batch: list[_Call]) -> None:
        """One model call for the batch; on failure each call alone (one bad request fails only itself)."""
        try:
            outs = self._call(batch)
        except Exception as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            log.warning("a batched %s call of %d callers failed (%s: %s); running them one by one",
                        batch[0].kind, len(batch), type(e).__name__, e)
            for c in batch:
                try:
                    c.future.set_result(self._call([c])[0])
                except Exception as e1:
                    c.future.set_exception(e1)
            return
        for c, out in zip(batch, outs):
            c.future.set_result(out)

    # ---- continuous batching of greedy generation -----------------------------------------------

    def _stepwise(self, key: str | None) -> bool:
        """Does the recommender ``key`` generate step-wise (greedy or trie beams, on the pipeline's
        model), so that its requests join and leave the decoding batch between steps?"""
        rec = self.recommenders.get(key)  # any object with ``recommend`` serves; step-wise is optional
        return bool(getattr(rec, "stepwise", False)) and getattr(rec, "lm", None) is self.pipeline.lm

    def _admit(self, calls: list[_Call], first: bool = False) -> None:
        """Take the calls' requests into generation: their prompts, memory picks and prefills, which
        ``_prefill`` runs (``first``: before the admissions already waiting). A failing call fails
        alone (the calls are retried one by one)."""
        rec = self.recommenders[calls[0].key]
        jobs = [_Job(c, rec) for c in calls]
        requests = [r for c in calls for r in c.items]
        tags = [(job, j) for job in jobs for j in range(len(job.call.items))]
        try:
            prefills, picks = rec.begin(requests, tags)
        except Exception as e:
            self._retry_alone(calls, e, "prompts")
            return
        at = 0
        for job in jobs:
            job.admission_picks, job.first_row = picks, at
            at += len(job.texts)
        for prefill in prefills:
            for (job, j), search in zip(prefill.tags, prefill.searches or ()):
                job.searches[j] = search
        admission = _Admission(calls, jobs, deque(prefills))
        if first:
            self._admitting.appendleft(admission)
        else:
            self._admitting.append(admission)

    def _retry_alone(self, calls: list[_Call], e: Exception, what: str) -> None:
        """After a failure of ``calls``' shared prefill: fail a lone call, else admit each one alone."""
        if len(calls) == 1:
            calls[0].future.set_exception(e)
            return
        log.warning("the batched %s of %d callers failed (%s: %s); admitting them one by one",
                    what, len(calls), type(e).__name__, e)
        for c in reversed(calls):  # each goes first, in the calls' order
            self._admit([c], first=True)

    def _prefill(self) -> bool:
        """Run the next admission's next prefill: one chunk of ``prefill_chunk_tokens`` padded tokens
        while rows are decoding or other prefills wait (they wait for no more than that), else the
        whole group at once. A group done prefilling joins the decoding batch; an admission whose group
        fails is taken back (its rows leave the decoding batch) and its calls are retried alone.

        Admissions take turns (round robin, a chunk or a group each): a short prompt admitted while a
        long one is being prefilled in chunks waits for one chunk, not for the rest of the long one.
        Background admissions go after the others (``BackgroundPriority.turn``) and always run in
        chunks of at most ``background_chunk_tokens``, so that a call arriving meanwhile waits for one chunk; with
        nothing else live their chunks run back to back, as one whole prefill would (no decoding
        step between them unless ``prefill_chunk_tokens`` asks for it).

        Returns whether a decoding step should follow. A background prefill's time is added to
        ``background_seconds`` (beside other live work, where it spends the credit, or alone)."""
        live = self._others_live()  # work that is not background is prefilled or decoded
        adm = self.priority.turn(self._admitting, live)
        if adm is None:
            return True
        prefill = adm.prefills[0]
        waiting = self._decoding is not None or len(self._admitting) > 1  # rows or other prefills wait for it
        chunk = self.prefill_chunk_tokens if waiting and self.prefill_chunk_tokens else None
        yielding = adm.background and live
        if adm.background:
            chunk = self.priority.chunk(chunk)
        t0 = time.perf_counter()
        try:
            part = self.pipeline.lm.advance(prefill, chunk)
            if part is not None:
                if self._decoding is None:
                    self._decoding = part
                else:
                    self._decoding.merge(part)  # builds the merged cache before changing anything
        except Exception as e:
            self._admitting.remove(adm)
            self._take_back(adm.jobs)
            self._retry_alone([job.call for job in adm.jobs if not job.done], e, "prefill")
            return True
        seconds = time.perf_counter() - t0
        adm.seconds += seconds
        if adm.background:
            self.priority.ran(seconds, beside_others=yielding)
        self._tell("prefill_chunk", prefill.rows, seconds)  # what decoding rows waited for
        if part is not None:
            adm.prefills.popleft()
        self._admitting.remove(adm)
        if adm.prefills:
            self._admitting.append(adm)  # the other admissions' prefills go first
        else:
            self._observe("recommend", sum(len(c.items) for c in adm.calls), adm.seconds)
        alone = adm.background and not yielding and part is None and not self.prefill_chunk_tokens
        return not alone

    def _others_live(self) -> bool:
        """Is work of a call that is not background being prefilled or decoded?"""
        if any(not adm.background for adm in self._admitting):
            return True
        return self._decoding is not None and any(not job.call.background for job, _ in self._decoding.tags)

    def _yielding(self, queued: bool) -> bool:
        """Does background work (``queued`` calls, or admitted prefills) wait beside other live work
        (the credit is counted)?"""
        waits = queued or any(adm.background for adm in self._admitting)
        return waits and self._others_live()

    def _take_back(self, jobs: Sequence[_Job]) -> None:
        """Remove the rows of ``jobs`` that are still decoding from the decoding batch."""
        if self._decoding is None:
            return
        drop = set(map(id, jobs))
        keep = [j for j, (job, _) in enumerate(self._decoding.tags) if id(job) not in drop]
        if len(keep) < self._decoding.rows:
            self._decoding.select(keep)
        if not self._decoding.rows:
            self._decoding = None

    def _step(self) -> None:
        """One decoding step; the calls whose rows have all finished are grounded and answered."""
        lm = self.pipeline.lm
        try:
            finished = lm.step(self._decoding)
        except Exception as e:  # the step is shared: every call in it fails
            log.exception("a decoding step of %d rows failed", self._decoding.rows)
            self._fail_all([], e)
            return
        if not self._decoding.rows:
            self._decoding = None
        for (job, j), tokens in finished:
            job.texts[j] = lm.text(tokens)
            if job.searches[j] is not None:
                job.beams[j] = job.searches[j].result().items
        now = time.monotonic()
        for job in dict.fromkeys(job for (job, _), _ in finished):
            if job.done:
                job.done_at = now
                self._grounding.append(job)

    def _ground(self) -> None:
        """Ground and answer the calls whose rows are all done, together (one pass per recommender).

        A grounding pass embeds the generated titles with the whole base model: at batch 1 it costs
        about one decoding step, and 16 titles ~4x one (BENCHMARKS §6c). So while other rows are
        still decoding, a done call waits up to ``ground_wait_s`` for company; it is grounded at once
        when nothing else decodes (a lone request never waits) or the done calls fill a batch."""
        if not self._grounding:
            return
        rows = sum(len(job.texts) for job in self._grounding)
        waited = time.monotonic() - self._grounding[0].done_at
        if self._decoding is not None and rows < self.max_batch and waited < self.ground_wait_s:
            return
        jobs, self._grounding = self._grounding, []
        by_rec: dict[int, list[_Job]] = {}
        for job in jobs:
            by_rec.setdefault(id(job.recommender), []).append(job)
        for group in by_rec.values():
            t0 = time.perf_counter()
            self._finish(group)
            self._tell("ground", sum(len(job.texts) for job in group), time.perf_counter() - t0)

    def _fail_all(self, calls: list[_Call], e: Exception) -> None:
        """Fail the given calls and every call being prefilled or decoded (those not answered yet).
        Calls done decoding are still grounded and answered."""
        held = list(calls) + ([job.call for job, _ in self._decoding.tags] if self._decoding is not None else [])
        held += [c for adm in self._admitting for c in adm.calls]
        self._decoding = None
        self._admitting.clear()
        for c in dict.fromkeys(held):
            if not c.future.done():
                c.future.set_exception(e)

    def _finish(self, jobs: list[_Job]) -> None:
        rec = jobs[0].recommender
        topks = [job.call.topk or rec.config.topk for job in jobs]
        requests = [r for job in jobs for r in job.call.items]
        try:
            texts = [t for job in jobs for t in job.texts]
            beams = [b for job in jobs for b in job.beams]
            recs = rec.finish(requests, texts, beams, [p for job in jobs for p in job.picks], topk=max(topks))
        except Exception as e:
            if len(jobs) > 1:
                for job in jobs:
                    self._finish([job])
                return
            jobs[0].call.future.set_exception(e)
            return
        at = 0
        now = time.perf_counter()
        for job, k in zip(jobs, topks):
            n = len(job.call.items)
            job.call.future.set_result([replace(r, items=r.items[:k], distances=r.distances[:k])
                                        for r in recs[at: at + n]])
            at += n
            self._call_s = self._average(now - job.started)

    def _average(self, seconds: float) -> float:
        return seconds if self._call_s is None else 0.7 * self._call_s + 0.3 * seconds

    def _observe(self, kind: str, size: int, seconds: float) -> None:
        """Count a model call and tell the listeners."""
        self.calls += 1
        self._tell(kind, size, seconds)

    def _tell(self, kind: str, size: int, seconds: float) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind, size, seconds)
            except Exception:
                log.exception("runner listener %r failed", fn)

    def _call(self, batch: list[_Call]) -> list[Any]:
        """The model call proper: one result per call, in order."""
        items = [x for c in batch for x in c.items]
        kind = batch[0].kind
        t0 = time.perf_counter()
        if kind == "encode":  # each distinct window once (two requests of one user may need the same ones)
            unique = {tuple(w): j for j, w in enumerate(dict.fromkeys(tuple(w) for w in items))}
            vecs = self._encode(list(unique))  # [u, H]
            items = list(unique)
            outs: list[Any] = [vecs[[unique[tuple(w)] for w in c.items]] for c in batch]  # [n_c, H] each
        else:
            rec = self.recommenders[batch[0].key]
            topks = [c.topk or rec.config.topk for c in batch]
            recs = rec.recommend(items, topk=max(topks))
            outs, at = [], 0
            for c, k in zip(batch, topks):
                outs.append([replace(r, items=r.items[:k], distances=r.distances[:k]) for r in recs[at:at + len(c.items)]])
                at += len(c.items)
        seconds = time.perf_counter() - t0
        self._call_s = self._average(seconds)
        self._observe(kind, len(items), seconds)
        return outs

    def _encode(self, windows: Sequence[tuple[int, ...]]) -> np.ndarray:
        if self.pipeline.element == "window":
            vecs = self.encoder.encode_windows(list(windows))  # [n, H]
        elif self.item_table is not None:  # warmed item elements: the window's last item, as stored
            return self.item_table[[w[-1] for w in windows]].astype(np.float32)
        else:  # item elements: the window's last item alone, each title encoded once (cache)
            vecs = self.encoder.encode([(w[-1],) for w in windows])
        return vecs.float().numpy()

    def warm_items(self) -> int:
        """Item elements: encode every catalogue title now (start-up, before the worker takes calls)
        so that no request waits for its memory vectors, and keep them as ``item_table`` (float16,
        as the store keeps them) for appends to store with their events. ``encode`` serves item
        elements from that table from then on, and the encoder with its cache is let go, so the
        vectors are held once. Returns how many were encoded (0: all cached or already warm)."""
        if self.pipeline.element != "item" or self.item_table is not None:
            return 0
        keys = [(i,) for i in range(len(self.pipeline.titles))]
        todo = len(self.encoder.cache.missing(keys))
        t0 = time.perf_counter()
        try:
            vecs = self.encoder.encode(keys)
        except OSError as e:  # a read-only artefact folder: keep them in memory instead
            log.warning("cannot write the item vector cache (%s); keeping it in memory", e)
            self.encoder = self.pipeline.memory_encoder(batch_size=self.batch_size)
            vecs = self.encoder.encode(keys)
        self.item_table = vecs.float().numpy().astype(np.float16)  # what _encode gives, rounded as stored
        self.item_table.flags.writeable = False  # read from the event loop's thread: never changes
        self.encoder = None  # the table serves every item element from now on: the vectors are held once
        log.info("item memory vectors: %d encoded, %d cached, %.1f s", todo, len(keys) - todo, time.perf_counter() - t0)
        return todo

    def item_vectors(self, items: Sequence[int]) -> np.ndarray | None:
        """[n, H] float16 memory elements of these catalogue items, without a model call (item
        elements after ``warm_items``); None when elements depend on the window."""
        return None if self.item_table is None else self.item_table[list(items)]

    # ---- shutdown --------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking calls, let the running and the queued calls finish (up to ``timeout`` seconds,
        None = no limit), then fail what is still queued with ``RunnerClosed``. Blocking: from a
        coroutine use ``await asyncio.to_thread(runner.close, t)``. True when everything finished."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self._cond:  # grace over: the running call (if any) cannot be interrupted; drop the rest
            left = list(self._queue)
            self._queue.clear()
            self._depth = 0
        for c in left:
            if c.future.set_running_or_notify_cancel():
                c.future.set_exception(RunnerClosed("the server shut down before this request reached the model"))
        log.warning("runner closed after %.1fs with a model call still running; %d queued calls dropped",
                    timeout or 0.0, len(left))
        return False
