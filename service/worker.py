"""Every use of the model goes through one ``ModelWorker``: the LLM is CPU-bound and shared.

    await worker.encode(windows)                    -> [n, H] float32 memory element vectors
    await worker.recommend(key, requests, topk)     -> one Recommendation per request

Callers' coroutines queue a call and await its future; ONE model thread runs the plan of the
scheduler (``service/scheduler.py``) on the model, one turn at a time:

    take calls        recommend calls join generation: their prompts, memory picks and prefill groups
                      (``Recommender.begin``); encode calls run whole (``MemoryElements.encode``)
    feed a prefill    one group, or a background chunk (``Recommender.advance``); a group done joins
                      its rows to the one decoding batch, whatever their recommender
    decode one step   every row of the batch (``generation.step``): rows leave when their answer is done
    ground            done calls, together (``Recommender.finish``): the answers

Continuous batching: calls join the decoding batch between steps and leave it as soon as their
answers are done, so no call waits for the longest answer of a batch. Results do not depend on the
batch beyond floating point (padding): ``tests/test_batching.py`` checks batched == alone. Two model
calls never run at once (one thread); the event loop never blocks on the model.

Back-pressure: ``max_queue`` requests waiting -> ``QueueFull`` with ``retry_after_s`` (429). A failing
call fails alone: a batch that failed is retried a call at a time; a failing decoding step fails the
calls in it, and the thread serves the rest. Shutdown (``close``): new calls raise ``RunnerClosed``
(503); the calls in progress and the queued ones still run, for up to ``timeout`` seconds.

``queue_depth()`` and ``add_listener(fn(kind, size, seconds))`` (called on the model thread after each
model call: "recommend", the prefills that admitted ``size`` requests; "prefill_chunk", one prefill
forward of ``size`` rows; "encode", an encode call; "ground", a grounding pass) are for metrics.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from model import generation
from model.pipeline import Pipeline
from model.recommend import Recommendation, Recommender, RecommendRequest
from service.errors import RunnerClosed
from service.memory_elements import MemoryElements
from service.priority import BackgroundPriority
from service.scheduler import Call, Job, Scheduler, Turn
from service.thread_governor import ThreadGovernor

log = logging.getLogger(__name__)

Listener = Callable[[str, int, float], None]  # (kind "recommend" | "prefill_chunk" | "encode" | "ground", size, seconds)


def forward_clock(lm) -> tuple[float, float]:
    """Wall and CPU seconds so far of the model thread's work that its intra-op count governs: with
    row parts (``model/row_split.py``), of the forwards it ran whole (the turn's would count the waits
    for the parts, and for the GIL between them, as CPU lost); else of everything (call it there)."""
    if lm.row_split is not None:
        return lm.row_split.whole_wall_s, lm.row_split.whole_cpu_s
    return time.perf_counter(), time.thread_time()


class ModelWorker:
    def __init__(self, pipeline: Pipeline, recommenders: dict[str, Recommender], elements: MemoryElements, *,
                 max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 64, ground_wait_ms: float = 0.0,
                 background: Collection[str] = (), background_share: float = 0.25,
                 background_chunk_tokens: int = 256, governor: ThreadGovernor | None = None):
        unknown = sorted(set(background) - set(recommenders))
        if unknown:
            raise ValueError(f"background recommenders {unknown} are not among {sorted(recommenders)}")
        other = sorted(k for k, r in recommenders.items() if r.lm is not pipeline.lm)
        if other:  # one decoding batch: every row on the same model
            raise ValueError(f"recommenders {other} do not run on the pipeline's model")
        self.priority = BackgroundPriority(background, background_share, background_chunk_tokens)
        self.scheduler = Scheduler(max_batch=max_batch, max_wait_s=max_wait_ms / 1e3, max_queue=max_queue,
                                   batch_size=elements.batch_size, ground_wait_s=ground_wait_ms / 1e3,
                                   priority=self.priority)
        self.pipeline, self.recommenders, self.elements = pipeline, recommenders, elements
        self.calls = 0  # model calls made (tests, metrics): a batch of many callers is one call
        self.decoding: generation.DecodeBatch | None = None  # the rows being decoded
        self.governor = governor  # intra-op threads from the CPU share the model thread gets
        self._cond = threading.Condition()
        self._busy = False  # a model call is running
        self._closing = False
        self._listeners: list[Listener] = []
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
            return np.zeros((0, self.elements.hidden_size), dtype=np.float32)
        return await self._submit(Call("encode", None, list(windows), None))

    async def recommend(self, key: str, requests: Sequence[RecommendRequest], topk: int | None,
                        background: bool | None = None) -> list[Recommendation]:
        """``Recommender.recommend`` of the recommender named ``key`` (a slot policy or 'full-history').
        ``background``: the call yields to the others (None: as the worker's ``background`` keys say)."""
        if key not in self.recommenders:
            raise KeyError(f"no recommender {key!r}; have {sorted(self.recommenders)}")
        if not requests:
            return []
        bg = key in self.priority if background is None else background
        return await self._submit(Call("recommend", key, list(requests), topk, background=bg))

    async def _submit(self, call: Call):
        with self._cond:
            if self._closing:
                raise RunnerClosed()
            self.scheduler.submit(call, self._busy)
            self._cond.notify()
        return await asyncio.wrap_future(call.future)  # a cancelled caller's call is skipped if not started

    # ---- metrics ---------------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Requests waiting, not yet in a model call (recommend requests + encode calls)."""
        return self.scheduler.depth

    def add_listener(self, fn: Listener) -> None:
        """``fn(kind, size, seconds)`` after every model call (on the model thread: keep it quick)."""
        self._listeners.append(fn)

    def _tell(self, kind: str, size: int, seconds: float, call: bool = False) -> None:
        """Tell the listeners of a model call (``call``: count it in ``calls``)."""
        self.calls += call
        for fn in list(self._listeners):
            try:
                fn(kind, size, seconds)
            except Exception:
                log.exception("model worker listener %r failed", fn)

    # ---- the model thread ------------------------------------------------------------------------

    def _work(self) -> None:
        sched = self.scheduler
        while True:
            with self._cond:
                while True:
                    if not sched.queue and not sched.holding:
                        if self._closing:
                            return  # closing and drained
                        self._cond.wait()
                        continue
                    taken, wait_until = sched.take(time.monotonic(), self._closing)
                    if wait_until is None:
                        break
                    self._cond.wait(max(0.0, wait_until - time.monotonic()))  # for company, or a later call
                queued_background = sched.queued_background()
                self._busy = True
            t0, clock0 = time.perf_counter(), forward_clock(self.pipeline.lm)
            try:
                if taken and taken[0].kind == "recommend":
                    self._admit(taken)
                elif taken:
                    self._encode(taken)
                yielding = sched.yielding(queued_background)
                self.priority.begin_turn()
                turn = sched.turn()
                if turn is None or self._prefill(turn):
                    self._step()
                self._ground()
                self.priority.end_turn(yielding, time.perf_counter() - t0)
            except Exception as e:  # never let the model thread die: fail what it holds, serve the rest
                log.exception("the model thread failed; failing the calls it held")
                self._fail_all(taken, e)
            if self.governor is not None:
                self._govern(*(b - a for a, b in zip(clock0, forward_clock(self.pipeline.lm))))
            with self._cond:
                self._busy = sched.holding

    def _govern(self, wall_s: float, cpu_s: float) -> None:
        """Set this (the model) thread's intra-op threads to the governor's count when it changes."""
        n = self.governor.observe(wall_s, cpu_s)
        if n is not None:
            torch.set_num_threads(n)
            split = self.pipeline.lm.row_split
            if split is not None:  # row parts while another job takes the CPUs, whole forwards alone
                split.active = n < self.governor.max_threads
            log.info("model threads: %d (CPU share of the model thread %.2f)", n, self.governor.last_share)

    def _admit(self, calls: list[Call], first: bool = False) -> None:
        """The calls' requests enter generation: prompts, the memory picks that need no z_t, and the
        prefill groups (``first``: before the admissions already waiting). A failing call fails alone."""
        rec = self.recommenders[calls[0].key]
        jobs = [Job(c, rec) for c in calls]
        tags = [(job, j) for job in jobs for j in range(len(job.call.items))]
        try:
            groups = rec.begin([r for c in calls for r in c.items], tags)
        except Exception as e:
            self._retry_alone(calls, e, "prompts")
            return
        for group in groups:
            for (job, j), search in zip(group.tags, group.prefill.searches or ()):
                job.searches[j] = search
        self.scheduler.admit(calls, jobs, groups, [g.prefill.rows for g in groups], first=first)

    def _retry_alone(self, calls: list[Call], e: Exception, what: str) -> None:
        """After a failure of ``calls``' shared prefill: fail a lone call, else admit each one alone."""
        if len(calls) == 1:
            calls[0].future.set_exception(e)
            return
        log.warning("the batched %s of %d callers failed (%s: %s); admitting them one by one",
                    what, len(calls), type(e).__name__, e)
        for c in reversed(calls):  # each goes first, in the calls' order
            self._admit([c], first=True)

    def _prefill(self, turn: Turn) -> bool:
        """Feed ``turn``'s prefill group (whole, or a background chunk); a group done joins the decoding
        batch with its memory picks. A failing group takes its admission back (its rows leave the
        decoding batch) and retries its calls alone. Returns whether a decoding step follows."""
        adm = turn.admission
        group = adm.groups[0]
        t0 = time.perf_counter()
        try:
            out = adm.jobs[0].recommender.advance(group, turn.chunk)
            if out is not None:
                batch, picks = out
                for (job, j), pick in zip(group.tags, picks):
                    job.picks[j] = pick
                if self.decoding is None:
                    self.decoding = batch
                else:
                    self.decoding.merge(batch)  # builds the merged cache before changing anything
        except Exception as e:
            dropped = self.scheduler.take_back(adm)
            self._drop_rows(dropped)
            self._retry_alone([job.call for job in dropped], e, "prefill")
            return True
        seconds = time.perf_counter() - t0
        step = self.scheduler.prefill_ran(turn, seconds, group.tags if out is not None else None)
        self._tell("prefill_chunk", group.prefill.rows, seconds)  # what decoding rows waited for
        if not adm.groups:
            self._tell("recommend", sum(len(c.items) for c in adm.calls), adm.seconds, call=True)
        return step

    def _drop_rows(self, jobs: Sequence[Job]) -> None:
        """Remove the rows of ``jobs`` from the decoding batch."""
        if self.decoding is None:
            return
        drop = set(map(id, jobs))
        keep = [j for j, (job, _) in enumerate(self.decoding.tags) if id(job) not in drop]
        if len(keep) < self.decoding.rows:
            self.decoding.select(keep)
        if not self.decoding.rows:
            self.decoding = None

    def _step(self) -> None:
        """One decoding step; the requests whose rows have finished are answered to the scheduler."""
        if self.decoding is None:
            return
        lm = self.pipeline.lm
        try:
            finished = generation.step(lm, self.decoding)
        except Exception as e:  # the step is shared: every call in it fails
            log.exception("a decoding step of %d rows failed", self.decoding.rows)
            self._fail_all([], e)
            return
        if not self.decoding.rows:
            self.decoding = None
        self.scheduler.answered([(job, j, lm.text(tokens), _beam_items(job, j)) for (job, j), tokens in finished],
                                time.monotonic())

    def _ground(self) -> None:
        """Ground and answer the done calls the scheduler says, one pass per recommender."""
        for jobs in self.scheduler.to_ground(time.monotonic()):
            t0 = time.perf_counter()
            self._finish(jobs)
            self._tell("ground", sum(len(job.texts) for job in jobs), time.perf_counter() - t0)

    def _finish(self, jobs: list[Job]) -> None:
        rec = jobs[0].recommender
        topks = [job.call.topk or rec.config.topk for job in jobs]
        try:
            recs = rec.finish([r for job in jobs for r in job.call.items], [t for job in jobs for t in job.texts],
                              [b for job in jobs for b in job.beams], [p for job in jobs for p in job.picks],
                              topk=max(topks))
        except Exception as e:
            if len(jobs) > 1:
                for job in jobs:
                    self._finish([job])
                return
            jobs[0].call.future.set_exception(e)
            return
        at, now = 0, time.perf_counter()
        for job, k in zip(jobs, topks):
            n = len(job.call.items)
            job.call.future.set_result([replace(r, items=r.items[:k], distances=r.distances[:k])
                                        for r in recs[at: at + n]])
            at += n
            self.scheduler.took(now - job.started)

    def _fail_all(self, calls: list[Call], e: Exception) -> None:
        """Fail the given calls and every call being prefilled or decoded. Calls done decoding are
        still grounded and answered."""
        self.decoding = None
        for c in dict.fromkeys(list(calls) + self.scheduler.fail_all()):
            if not c.future.done():
                c.future.set_exception(e)

    def _encode(self, calls: list[Call]) -> None:
        """One encoder call of the calls' distinct windows (two requests of one user may need the same
        ones), split back by call; on failure each call alone (a bad request fails only itself)."""
        for attempt in ([calls] if len(calls) == 1 else [calls, *([c] for c in calls)]):
            t0 = time.perf_counter()
            try:
                unique = {w: j for j, w in enumerate(dict.fromkeys(tuple(w) for c in attempt for w in c.items))}
                vecs = self.elements.encode(list(unique))  # [u, H]
            except Exception as e:
                if len(attempt) == 1:
                    attempt[0].future.set_exception(e)
                elif len(calls) > 1:
                    log.warning("a batched encode call of %d callers failed (%s: %s); running them one by one",
                                len(calls), type(e).__name__, e)
                continue
            seconds = time.perf_counter() - t0
            self.scheduler.took(seconds)
            self._tell("encode", len(unique), seconds, call=True)
            for c in attempt:
                c.future.set_result(vecs[[unique[tuple(w)] for w in c.items]])  # [n_c, H]
            if attempt is calls:
                return

    # ---- shutdown --------------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking calls, let the running and the queued calls finish (up to ``timeout`` seconds,
        None = no limit), then fail what is still queued with ``RunnerClosed``. Blocking: from a
        coroutine use ``await asyncio.to_thread(worker.close, t)``. True when everything finished."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self._cond:  # grace over: the running call (if any) cannot be interrupted; drop the rest
            left = self.scheduler.drop_queued()
        for c in left:
            if c.future.set_running_or_notify_cancel():
                c.future.set_exception(RunnerClosed("the server shut down before this request reached the model"))
        log.warning("model worker closed after %.1fs with a model call still running; %d queued calls dropped",
                    timeout or 0.0, len(left))
        return False


def _beam_items(job: Job, j: int) -> list[tuple[int, float]]:
    """The items of request ``j``'s finished beam search with their titles' scores, best first ([] for a
    greedy row)."""
    search = job.searches[j]
    return search.result().scored_items if search is not None else []
