"""What the one model thread does next, decided on plain data: no torch, no model, no threads.

The scheduler plans and the worker (``service/worker.py``) executes, as in vLLM v1: the worker asks
it what to take from the queue, which prefill to feed, whether a decoding step follows and which
answers to ground, runs that on the model, and reports back what happened. A call moves through

    queued     a caller's ``Call`` waits in the queue, counted against ``max_queue``
    admitted   its requests' prompts are prefilled, one prefill group at a time (``Admission``)
    decoding   its rows are in the shared decoding batch: a group's rows join when its prefill ends,
               each request's rows leave when its answer is done (``Job``)
    grounding  every row is done; it waits up to ``ground_wait_s`` for company, then is answered

Encode calls (memory elements) are run whole by the worker between two decoding steps.

Taking calls: the oldest call that can run now (``BackgroundPriority.first``: foreground calls first)
and the later calls of the same kind, key and class that fit with it, up to ``max_batch`` requests
(encode: ``batch_size`` windows). While rows decode, a recommend call is taken only when its requests
fit the batch's room; when nothing is generating, the first call waits up to ``max_wait_s`` after
its arrival for company. Background prefills run in chunks of ``BackgroundPriority.chunk_tokens``
and, beside other live work, only within their credit (``service/priority.py``).
"""
from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from service.priority import BackgroundPriority


class QueueFull(Exception):
    """``max_queue`` requests are already waiting for the model; retry after ``retry_after_s``."""

    def __init__(self, depth: int, max_queue: int, retry_after_s: float):
        super().__init__(f"{depth} requests are waiting for the model (limit {max_queue}, AUTOMR_MAX_QUEUE); "
                         f"retry in {retry_after_s:.0f}s")
        self.depth, self.max_queue, self.retry_after_s = depth, max_queue, retry_after_s


@dataclass(eq=False)
class Call:
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
class Job:
    """A recommend call in generation: its requests' answers arrive as their rows finish."""

    call: Call
    recommender: Any
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        n = len(self.call.items)
        self.texts: list[str | None] = [None] * n  # None: the request is still being generated
        self.beams: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # its beams' (item, score), once finished
        self.searches: list = [None] * n  # each request's beam search (constrained)
        self.picks: list = [None] * n  # each request's memory pick, once prefilled
        self.joined = 0  # requests whose rows are in the decoding batch (or were)
        self.finished = 0  # requests whose answer is done
        self.done_at: float | None = None  # monotonic time its last answer finished

    @property
    def done(self) -> bool:
        return self.finished == len(self.texts)

    @property
    def decoding(self) -> int:
        """Requests of this call being decoded now (a beam search counts once)."""
        return self.joined - self.finished


@dataclass(eq=False)
class Admission:
    """Calls admitted together: their prefill groups (opaque to the scheduler, run by the worker),
    each with its number of rows; a group's rows join the decoding batch when its prefill ends."""

    calls: list[Call]
    jobs: list[Job]
    groups: deque  # the worker's prefill groups, the oldest first
    group_rows: deque  # rows of each group
    seconds: float = 0.0  # model time spent on its prefills so far

    @property
    def background(self) -> bool:
        """Background calls are admitted together only (``_gather``): it yields to the others."""
        return self.calls[0].background

    @property
    def rows(self) -> int:
        """Rows not yet in the decoding batch."""
        return sum(self.group_rows)


@dataclass(frozen=True)
class Turn:
    """The prefill the worker feeds now: ``admission``'s first group, ``chunk`` padded tokens at most
    (None: whole); ``yielding``: a background prefill beside other live work (it spends credit)."""

    admission: Admission
    chunk: int | None
    yielding: bool


class Scheduler:
    """The queue, the calls in generation and the decisions over them (see the module docstring)."""

    def __init__(self, *, max_batch: int = 8, max_wait_s: float = 0.005, max_queue: int = 64, batch_size: int = 16,
                 ground_wait_s: float = 0.0, priority: BackgroundPriority | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0 or ground_wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0, ground_wait_ms >= 0; got "
                             f"{max_batch}, {max_queue}, {max_wait_s * 1e3}, {ground_wait_s * 1e3}")
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.batch_size, self.ground_wait_s = batch_size, ground_wait_s
        self.priority = priority or BackgroundPriority()
        self.queue: deque[Call] = deque()
        self.depth = 0  # sum of the queued calls' weights
        self.admitting: deque[Admission] = deque()  # admitted calls whose prefills are not all done
        self.jobs: list[Job] = []  # calls in generation (admitted, decoding), not yet done
        self.grounding: list[Job] = []  # calls whose answers are all done, waiting to be grounded together
        self.call_s: float | None = None  # moving average of a call's model time (Retry-After)

    # ---- the queue ---------------------------------------------------------------------------------

    def submit(self, call: Call, busy: bool) -> None:
        """Queue ``call``, or raise ``QueueFull`` when the queue would pass ``max_queue`` requests (a
        call alone in the queue is always taken, whatever its size). ``busy``: a model call runs."""
        if self.depth > 0 and self.depth + call.weight > self.max_queue:
            raise QueueFull(self.depth, self.max_queue, self.retry_after(busy))
        self.queue.append(call)
        self.depth += call.weight

    def retry_after(self, busy: bool) -> float:
        """Seconds until the queue has room, roughly: batches ahead x recent call time (>= 1)."""
        ahead = math.ceil(self.depth / self.max_batch) + (1 if busy else 0)
        return max(1.0, (self.call_s or 1.0) * ahead)

    def took(self, seconds: float) -> None:
        """A call's model time, for ``retry_after``."""
        self.call_s = seconds if self.call_s is None else 0.7 * self.call_s + 0.3 * seconds

    def take(self, now: float, closing: bool = False) -> tuple[list[Call], float | None]:
        """The calls to run now, and when nothing can be taken yet, until when to wait for company
        (None: no wait; the calls already generating go on meanwhile; never while ``closing``). Calls
        whose caller went away are dropped (their future was cancelled)."""
        if not self.queue:
            return [], None
        first = self.priority.first(self.queue, self.takeable)  # a call that does not fit yet holds the later ones
        if not self.takeable(first):
            return [], None
        batch = self._gather(first)
        full = sum(len(c.items) for c in batch) >= self._limit(first) or len(batch) >= self.max_batch
        deadline = first.arrived + self.max_wait_s
        if not self.generating and not full and not closing and now < deadline:
            return [], deadline
        taken = []
        for c in batch:
            self.queue.remove(c)
            self.depth -= c.weight
            if c.future.set_running_or_notify_cancel():  # False: the caller went away
                taken.append(c)
        return taken, None

    def drop_queued(self) -> list[Call]:
        """Empty the queue (shutdown after its grace): the calls that were waiting."""
        left, self.depth = list(self.queue), 0
        self.queue.clear()
        return left

    def takeable(self, c: Call) -> bool:
        """Can ``c`` run now? While rows are generated, a recommend call joins only if its requests fit."""
        return not self.generating or c.kind != "recommend" or len(c.items) <= self.room()

    def _limit(self, first: Call) -> int:
        """Items per model call: requests that fit the decoding batch (recommend) or windows (encode);
        the first call is whole."""
        if first.kind == "recommend":
            return max(self.room(), len(first.items))
        return max(self.batch_size, len(first.items))

    def _gather(self, first: Call) -> list[Call]:
        batch, size, limit = [first], len(first.items), self._limit(first)
        for c in self.queue:
            if len(batch) >= self.max_batch or size >= limit:
                break
            if c is first or c.kind != first.kind or c.key != first.key or c.background != first.background:
                continue
            if size + len(c.items) <= limit:
                batch.append(c)
                size += len(c.items)
        return batch

    # ---- generation ----------------------------------------------------------------------------------

    @property
    def generating(self) -> bool:
        """Are rows being prefilled or decoded?"""
        return bool(self.admitting) or self.decoding_requests > 0

    @property
    def holding(self) -> bool:
        """Are calls taken and not yet answered (prefilling, decoding or waiting to be grounded)?"""
        return self.generating or bool(self.grounding)

    @property
    def decoding_requests(self) -> int:
        return sum(job.decoding for job in self.jobs)

    def room(self) -> int:
        """Requests that can still join the decoding batch (those being prefilled count as in it)."""
        return self.max_batch - self.decoding_requests - sum(a.rows for a in self.admitting)

    def admit(self, calls: list[Call], jobs: list[Job], groups: Sequence[Any], group_rows: Sequence[int],
              first: bool = False) -> Admission:
        """``calls`` enter generation with these prefill groups (``first``: before the admissions already
        waiting, as a retried call does)."""
        adm = Admission(calls, jobs, deque(groups), deque(group_rows))
        self.jobs.extend(jobs)
        if first:
            self.admitting.appendleft(adm)
        else:
            self.admitting.append(adm)
        return adm

    def turn(self) -> Turn | None:
        """The prefill to feed now (None: none may run; a decoding step follows). Admissions take turns,
        a group or a background chunk each, so a short prompt admitted while a long background one is
        fed in chunks waits for one chunk, not for the rest."""
        live = self.others_live()
        adm = self.priority.turn(self.admitting, live)
        if adm is None:
            return None
        return Turn(adm, self.priority.chunk(None) if adm.background else None, adm.background and live)

    def prefill_ran(self, turn: Turn, seconds: float, joined: Sequence[tuple[Job, int]] | None) -> bool:
        """The worker fed ``turn``'s prefill for ``seconds``; ``joined``: the (job, request) pairs of its
        group, whose rows joined the decoding batch (None: a chunk before the last). Returns whether a
        decoding step follows: not after a background chunk alone, so that its chunks run back to back
        as one whole prefill would."""
        adm = turn.admission
        adm.seconds += seconds
        if adm.background:
            self.priority.ran(seconds, beside_others=turn.yielding)
        if joined is not None:
            adm.groups.popleft()
            adm.group_rows.popleft()
            for job, _ in joined:
                job.joined += 1
        self.admitting.remove(adm)
        if adm.groups:
            self.admitting.append(adm)  # the other admissions' prefills go first
        return not (adm.background and not turn.yielding and joined is None)

    def answered(self, rows: Sequence[tuple[Job, int, str, list[tuple[int, float]]]], now: float) -> None:
        """Requests whose answers are done: (job, request, generated text, its beams' (item, score))."""
        for job, j, text, beams in rows:
            job.texts[j], job.beams[j] = text, beams
            job.finished += 1
        for job in dict.fromkeys(job for job, *_ in rows):
            if job.done:
                job.done_at = now
                self.jobs.remove(job)
                self.grounding.append(job)

    def to_ground(self, now: float) -> list[list[Job]]:
        """The done calls to ground and answer now, in groups of one recommender each. A grounding pass
        embeds the generated titles with the whole base model: while other rows decode, a done call
        waits up to ``ground_wait_s`` for company; at once when nothing decodes or a batch is full."""
        if not self.grounding:
            return []
        rows = sum(len(job.texts) for job in self.grounding)
        waited = now - self.grounding[0].done_at
        if self.decoding_requests > 0 and rows < self.max_batch and waited < self.ground_wait_s:
            return []
        jobs, self.grounding = self.grounding, []
        by_rec: dict[int, list[Job]] = {}
        for job in jobs:
            by_rec.setdefault(id(job.recommender), []).append(job)
        return list(by_rec.values())

    def take_back(self, adm: Admission) -> list[Job]:
        """A prefill of ``adm`` failed: it leaves, with the jobs that are not done (their rows leave the
        decoding batch: the worker drops them). Returns those jobs."""
        self.admitting.remove(adm)
        dropped = [job for job in adm.jobs if not job.done]
        self.jobs = [job for job in self.jobs if job not in dropped]
        return dropped

    def fail_all(self) -> list[Call]:
        """Everything being prefilled or decoded fails (a shared step failed): the calls held there.
        Calls done decoding are still grounded and answered."""
        held = [job.call for job in self.jobs] + [c for adm in self.admitting for c in adm.calls]
        self.jobs.clear()
        self.admitting.clear()
        return list(dict.fromkeys(held))

    # ---- priority --------------------------------------------------------------------------------------

    def others_live(self) -> bool:
        """Is work of a call that is not background being prefilled or decoded?"""
        return (any(not adm.background for adm in self.admitting)
                or any(job.decoding > 0 and not job.call.background for job in self.jobs))

    def queued_background(self) -> bool:
        return any(c.background for c in self.queue)

    def yielding(self, queued: bool) -> bool:
        """Does background work (``queued`` calls, or admitted prefills) wait beside other live work
        (the credit counts)?"""
        waits = queued or any(adm.background for adm in self.admitting)
        return waits and self.others_live()

