"""The scheduler's decisions on plain data (``service/scheduler.py``): no model, no threads, no clock but
the one passed in. The worker's execution of them on the tiny model is in ``tests/test_batching.py``."""
from __future__ import annotations

import pytest

from service.priority import BackgroundPriority
from service.scheduler import Call, Job, QueueFull, Scheduler

REC, OTHER = object(), object()  # two recommenders (opaque to the scheduler)


def _call(n: int = 1, key: str = "a", kind: str = "recommend", arrived: float = 0.0, background: bool = False) -> Call:
    return Call(kind, key if kind == "recommend" else None, list(range(n)), None, background=background, arrived=arrived)


def _queued(s: Scheduler, *calls: Call) -> list[Call]:
    for c in calls:
        s.submit(c, busy=False)
    return list(calls)


def _generating(s: Scheduler, requests: int, rec=REC, background: bool = False) -> list[Job]:
    """``requests`` one-request calls admitted and joined: their rows decode."""
    jobs = [Job(_call(background=background), rec) for _ in range(requests)]
    s.admit([j.call for j in jobs], jobs, ["g"], [requests])
    turn = s.turn()
    s.prefill_ran(turn, 0.01, [(j, 0) for j in jobs])
    return jobs


def test_the_first_call_waits_for_company_until_its_deadline_or_a_full_batch():
    s = Scheduler(max_batch=3, max_wait_s=1.0)
    a, b = _queued(s, _call(arrived=0.0), _call(arrived=0.5))
    assert s.take(now=0.6) == ([], 1.0)  # nothing generates: wait up to max_wait after the first arrival
    assert s.take(now=0.6, closing=True)[0] == [a, b]  # closing: no waiting
    c, d = _queued(s, _call(arrived=2.0), _call(arrived=2.1))
    assert s.take(now=2.2)[1] == 3.0
    _queued(s, _call(arrived=2.2))
    taken, wait = s.take(now=2.3)  # three requests: a full batch goes at once
    assert wait is None and len(taken) == 3 and s.depth == 0
    e = _queued(s, _call(arrived=5.0))[0]
    assert s.take(now=6.0) == ([e], None)  # alone, after its wait


def test_a_batch_takes_one_kind_key_and_class_oldest_first_up_to_max_batch():
    s = Scheduler(max_batch=3, max_wait_s=0.0, batch_size=4)
    order = [_call(key="b"), _call(key="a"), _call(key="b"), _call(key="a"), _call(key="a"), _call(key="a"),
             _call(kind="encode", n=2), _call(key="b", background=True), _call(key="b")]
    _queued(s, *order)
    batches = []
    while s.queue:
        taken, wait = s.take(now=10.0)
        assert wait is None
        batches.append([order.index(c) for c in taken])
    # oldest first; a batch holds one key and class, at most max_batch requests, in arrival order;
    # the background call goes after every other (nothing else live: no credit needed to wait for)
    assert batches == [[0, 2, 8], [1, 3, 4], [5], [6], [7]]


def test_encode_calls_batch_windows_up_to_batch_size_and_a_bigger_first_call_goes_whole():
    s = Scheduler(max_batch=8, max_wait_s=0.0, batch_size=4)
    big, small, more = _queued(s, _call(kind="encode", n=6), _call(kind="encode", n=1), _call(kind="encode", n=3))
    assert s.take(now=1.0)[0] == [big]
    assert s.take(now=1.0)[0] == [small, more]


def test_while_rows_decode_a_call_joins_only_when_its_requests_fit():
    s = Scheduler(max_batch=4, max_wait_s=10.0)
    _generating(s, 3)
    assert s.room() == 1
    big, small = _queued(s, _call(n=2), _call(n=1))
    assert s.take(now=0.0) == ([], None)  # the oldest does not fit: it holds the later ones; no wait
    enc = _queued(s, _call(kind="encode"))[0]
    assert s.take(now=0.0) == ([], None)  # fifo: the encode call is behind the waiting recommend call
    s.queue.remove(big)
    s.depth -= big.weight
    assert s.take(now=0.0) == ([small], None)  # fits: taken at once (rows decode: no wait for company)
    assert s.take(now=0.0) == ([enc], None)  # encode calls run between two steps


def test_room_counts_requests_being_prefilled_and_decoding_not_rows():
    s = Scheduler(max_batch=8)
    jobs = _generating(s, 2)
    assert s.decoding_requests == 2 and s.room() == 6
    more = [Job(_call(n=3), REC)]
    s.admit([more[0].call], more, ["g1", "g2"], [2, 1])  # three requests, in two prefill groups
    assert s.room() == 3
    s.prefill_ran(s.turn(), 0.1, [(more[0], 0), (more[0], 1)])
    assert s.room() == 3 and s.decoding_requests == 4  # two joined, one still being prefilled
    s.answered([(jobs[0], 0, "t", [])], now=1.0)
    assert s.room() == 4 and s.grounding == [jobs[0]]


def test_cancelled_callers_are_dropped_when_taken():
    s = Scheduler(max_batch=4, max_wait_s=0.0)
    a, b, c = _queued(s, _call(), _call(), _call())
    b.future.cancel()
    assert s.take(now=1.0)[0] == [a, c] and s.depth == 0


def test_queue_full_at_the_bound_with_a_retry_after_from_recent_calls():
    s = Scheduler(max_batch=2, max_queue=3)
    _queued(s, _call(n=2), _call())
    with pytest.raises(QueueFull) as e:
        s.submit(_call(), busy=True)
    # 1 s per call (the floor, no call timed yet) x (2 queued batches + the running one)
    assert (e.value.depth, e.value.retry_after_s) == (3, 3.0)
    s.took(4.0)
    assert s.retry_after(busy=False) == 8.0
    lone = Scheduler(max_queue=2)
    lone.submit(_call(n=5), busy=False)  # alone in the queue: always taken, whatever its size
    assert lone.depth == 5


def _done_job(s: Scheduler, rows: int, done_at: float, rec=REC) -> Job:
    job = Job(_call(n=rows), rec)
    s.jobs.append(job)
    job.joined = rows
    s.answered([(job, j, f"t{j}", []) for j in range(rows)], now=done_at)
    return job


def test_grounding_waits_until_a_batch_is_full_the_wait_is_over_or_nothing_decodes():
    s = Scheduler(max_batch=3, ground_wait_s=60.0)
    decoding = _generating(s, 1)  # another row decodes
    a = _done_job(s, 1, done_at=0.0)
    assert s.to_ground(now=1.0) == []  # waits for company
    b = _done_job(s, 2, done_at=1.0, rec=OTHER)
    assert s.to_ground(now=1.0) == [[a], [b]]  # 3 rows = max_batch: one pass per recommender
    c = _done_job(s, 1, done_at=0.0)
    assert s.to_ground(now=61.0) == [[c]]  # waited longer than ground_wait_s
    s.answered([(decoding[0], 0, "t", [])], now=62.0)  # nothing decodes now: the last answer goes at once
    assert s.to_ground(now=62.0) == [[decoding[0]]] and s.grounding == []


def test_foreground_prefills_go_first_and_background_ones_alone_or_within_credit():
    prio = BackgroundPriority(keys=("fh",), share=0.5, chunk_tokens=16)
    s = Scheduler(max_batch=8, priority=prio)
    bg = Job(_call(background=True), REC)
    s.admit([bg.call], [bg], ["long"], [1])
    fg = Job(_call(), REC)
    s.admit([fg.call], [fg], ["short-1", "short-2"], [1, 1])
    turn = s.turn()
    assert turn.admission.jobs == [fg] and turn.chunk is None  # foreground first, its group whole
    assert s.prefill_ran(turn, 0.1, [(fg, 0)]) is True  # a decoding step follows
    turn = s.turn()
    assert turn.admission.jobs == [fg]  # its second group: background still yields (no credit)
    s.prefill_ran(turn, 0.1, [(fg, 0)])
    assert s.turn() is None  # foreground rows decode, no credit: the background prefill waits
    prio.credit = 0.05
    turn = s.turn()
    assert turn.admission.jobs == [bg] and turn.chunk == 16 and turn.yielding
    assert s.prefill_ran(turn, 0.04, None) is True  # a chunk beside other work: a step follows
    assert prio.seconds["beside_others"] == pytest.approx(0.04)
    s.answered([(fg, 0, "a", [])], now=1.0)  # nothing else live: the background prefill runs alone
    turn = s.turn()
    assert turn.admission.jobs == [bg] and not turn.yielding
    assert s.prefill_ran(turn, 0.2, None) is False  # alone: its chunks run back to back, no step between
    assert s.prefill_ran(s.turn(), 0.2, [(bg, 0)]) is True and not s.admitting


def test_admissions_take_turns_a_group_each():
    s = Scheduler(max_batch=8)
    a, b = Job(_call(n=2), REC), Job(_call(), REC)
    s.admit([a.call], [a], ["a1", "a2"], [1, 1])
    s.admit([b.call], [b], ["b1"], [1])
    order = []
    while (turn := s.turn()) is not None:
        order.append(turn.admission.groups[0])
        job = turn.admission.jobs[0]
        s.prefill_ran(turn, 0.0, [(job, 0)])
    assert order == ["a1", "b1", "a2"]


def test_a_failed_admission_is_taken_back_and_a_failed_step_fails_everything_held():
    s = Scheduler(max_batch=8)
    decoding = _generating(s, 2)
    done = Job(_call(), REC)
    failing = Job(_call(), REC)
    adm = s.admit([done.call, failing.call], [done, failing], ["g1", "g2"], [1, 1])
    s.prefill_ran(s.turn(), 0.0, [(done, 0)])
    s.answered([(done, 0, "t", [])], now=0.0)
    assert s.take_back(adm) == [failing]  # the done call stays to be grounded; the other is retried
    assert done in s.grounding and failing not in s.jobs and not s.admitting
    queued = Job(_call(), REC)
    s.admit([queued.call], [queued], ["g"], [1])
    assert s.fail_all() == [decoding[0].call, decoding[1].call, queued.call]
    assert not s.generating and s.holding  # the done call is still answered
