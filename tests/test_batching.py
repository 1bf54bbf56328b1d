"""Continuous batching by the model worker (``service/worker.py``) on a tiny random Llama: the batched
answer of every request is compared with ``Recommender.recommend`` on that request alone (and the
encoder's vectors with a direct encoder call), whatever joined or left the decoding batch around it.
The scheduler's decisions on their own, on plain data, are in ``tests/test_scheduler.py``.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from model import generation
from model.generation.prefill import prefill_groups
from model.grounding import CatalogueIndex
from model.llm import SplitLM
from model.pipeline import Pipeline
from model.prompts import PromptBuilder
from model.recommend import Recommendation, RecommendRequest
from model.retriever import Retriever, RetrieverConfig
from service.errors import RunnerClosed
from service.memory_elements import MemoryElements
from service.scheduler import QueueFull
from service.worker import ModelWorker
from tests.conftest import TINY_TITLES, build_tiny_lm, build_tiny_tokenizer

pytestmark = pytest.mark.anyio
K = 3
MAX_NEW = 6



@pytest.fixture(scope="module")
def pipe():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = build_tiny_tokenizer()
    lm = SplitLM.from_model(build_tiny_lm(len(tok), seed=3), tok, cut=2)
    lm.snapshot_base_upper()
    builder = PromptBuilder.for_model(lm, domain="movie", n_slots=1)
    index = CatalogueIndex.build(TINY_TITLES, lambda t: lm.embed_final(list(t)).numpy(), progress=False)
    torch.manual_seed(1)
    ret = Retriever(RetrieverConfig(hidden_size=lm.hidden_size, mlp_hidden=16)).eval()
    yield Pipeline(lm=lm, builder=builder, titles=list(TINY_TITLES), index=index, retriever=ret, k_short=K,
                   popularity=np.arange(len(TINY_TITLES)) % 5)
    torch.set_num_threads(before)


@pytest.fixture
def runners():
    """``make(pipeline, recommenders, batch_size=16, memory_dir=None, **kw)`` -> a ModelWorker, closed
    after the test."""
    made: list[ModelWorker] = []

    def make(p, recs, batch_size=16, memory_dir=None, **kw):
        made.append(ModelWorker(p, recs, MemoryElements(p, batch_size, memory_dir), **kw))
        return made[-1]

    yield make
    for r in made:
        r.close(5)


def _record(runner: ModelWorker, kinds: tuple[str, ...] = ("recommend", "encode")) -> list[tuple[str, int]]:
    """(kind, size) of the runner's model calls of these kinds ("ground": grounding passes), in order."""
    seen: list[tuple[str, int]] = []
    runner.add_listener(lambda kind, size, seconds: seen.append((kind, size)) if kind in kinds else None)
    return seen


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


def _hold_steps(pipe, monkeypatch) -> threading.Event:
    """Decoding steps wait until the returned event is set (so that later calls queue meanwhile)."""
    go, step = threading.Event(), generation.step

    def held_step(lm, batch):
        assert go.wait(10)
        return step(lm, batch)

    monkeypatch.setattr(generation, "step", held_step)
    return go


# ---- batched == one at a time, on the tiny model -----------------------------------------------------


def _requests(p: Pipeline) -> list[tuple[RecommendRequest, int]]:
    """Six requests that differ in every way a batch could mix up: context (and so prompt length),
    memory size, memory or none (filled / empty slot rows), query given or computed, exclusions, topk."""
    enc = p.memory_encoder()
    rng = np.random.default_rng(0)

    def memory(m: int) -> torch.Tensor:
        wins = [tuple(int(x) for x in rng.choice(18, size=K, replace=False)) for _ in range(m)]
        return enc.encode_windows(wins)  # [m, H]

    q = enc.encode_windows([(4, 9, 16)])[0]  # [H] a z_t given by the caller (another window's: still valid input)
    return [
        (RecommendRequest(context=[0, 1, 2], memory=memory(5), exclude={0, 1, 2}, seed=1), 5),
        (RecommendRequest(context=[3, 4, 5], memory=memory(3), exclude={3, 4}, query=q, seed=2), 3),
        (RecommendRequest(context=[6, 7], memory=None, exclude={6, 7}, seed=3), 7),
        (RecommendRequest(context=[8, 9, 10], memory=memory(1), exclude=set(), seed=4), 2),
        (RecommendRequest(context=[11, 12, 13, 14, 15, 16], memory=memory(4), exclude={11}, seed=5), 18),
        (RecommendRequest(context=[17], memory=memory(2), exclude={17, 0}, seed=6), 4),
    ]


async def test_requests_join_a_decoding_batch_and_get_their_own_answers(pipe, runners, monkeypatch):
    """Continuous batching: calls that arrive while others decode join the batch between steps (of
    any recommender: automr, bigrec and full-history rows, greedy or beams over the title trie, share
    steps), leave when done, and get what each gets alone."""
    recs = {key: pipe.recommender("none" if key == "full-history" else key, full_history=key == "full-history",
                                  max_new_tokens=MAX_NEW) for key in ("learned", "none", "full-history")}
    recs["beams"] = pipe.recommender("learned", max_new_tokens=MAX_NEW, constrained=True, num_beams=3,
                                     popularity_gamma=1.0)
    reqs = _requests(pipe)
    plan = [("learned", 0), ("none", 2), ("beams", 1), ("full-history", 4), ("beams", 5), ("learned", 3)]
    alone = [recs[key].recommend([reqs[i][0]], topk=reqs[i][1])[0] for key, i in plan]

    go, seen_keys = threading.Event(), []
    step = generation.step

    def held_step(lm, batch):  # the first step waits until every other call is queued
        assert go.wait(10)
        seen_keys.append(sorted({key for job, _ in batch.tags for key, r in recs.items() if r is job.recommender}))
        return step(lm, batch)

    monkeypatch.setattr(generation, "step", held_step)
    runner = runners(pipe, recs, max_batch=4, max_wait_ms=0)
    admitted = _record(runner)
    first = asyncio.ensure_future(runner.recommend("learned", [reqs[0][0]], topk=reqs[0][1]))
    await _until(lambda: runner.calls == 1)
    rest = [asyncio.ensure_future(runner.recommend(key, [reqs[i][0]], topk=reqs[i][1])) for key, i in plan[1:]]
    await _until(lambda: runner.queue_depth() == len(rest))
    go.set()
    got = [x[0] for x in await asyncio.gather(first, *rest)]

    for want, have in zip(alone, got):
        assert have.items == want.items and have.generated == want.generated
        assert have.beam_items == want.beam_items
        np.testing.assert_allclose(have.beam_scores, want.beam_scores, rtol=1e-5, atol=1e-5)
        assert have.memory_indices == want.memory_indices
        np.testing.assert_allclose(have.distances, want.distances, rtol=1e-5, atol=1e-6)
    assert [bool(w.beam_items) for w in alone] == [key == "beams" for key, _ in plan]
    assert len(admitted) > 1 and all(kind == "recommend" for kind, _ in admitted)  # several prefills...
    assert max(len(keys) for keys in seen_keys) >= 2  # ...whose rows decoded together across recommenders
    assert any("beams" in keys and len(keys) >= 2 for keys in seen_keys)  # beams beside greedy rows
    assert runner.decoding is None and runner.queue_depth() == 0


async def test_a_failing_decoding_step_fails_its_calls_and_the_runner_goes_on(pipe, runners, monkeypatch):
    rec = pipe.recommender("none", max_new_tokens=MAX_NEW)
    req, k = _requests(pipe)[2]
    want = rec.recommend([req], topk=k)[0]
    step, failures = generation.step, [RuntimeError("out of memory in a step")]

    def flaky(lm, batch):
        if failures:
            raise failures.pop()
        return step(lm, batch)

    monkeypatch.setattr(generation, "step", flaky)
    runner = runners(pipe, {"none": rec}, max_batch=4, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        await runner.recommend("none", [req], topk=k)
    got = (await runner.recommend("none", [req], topk=k))[0]  # the model thread is still serving
    assert got.items == want.items and runner.decoding is None


@pytest.mark.parametrize("key,draft,beams", [("learned", 0, 0), ("semantic", 0, 0), ("random", 0, 0),
                                             ("none", 0, 0), ("full-history", 0, 0), ("learned", 8, 0),
                                             ("full-history", 8, 0), ("learned", 0, 4), ("none", 8, 2)])
async def test_batched_recommend_equals_one_at_a_time(pipe, runners, key, draft, beams):
    """Six requests batched by the runner get the answers each gets alone through ``recommend``, also
    with speculative steps (``draft``: catalogue-drafted tokens while <= 8 rows decode) and with beams
    over the title trie (``beams``: a request's beams are rows of the shared decoding batch)."""
    policy = "none" if key == "full-history" else key
    rec = pipe.recommender(policy, full_history=key == "full-history", max_new_tokens=MAX_NEW,
                           draft_tokens=draft, draft_max_rows=8, constrained=beams > 0, num_beams=max(beams, 1))
    reqs = _requests(pipe)
    alone = [rec.recommend([r], topk=k)[0] for r, k in reqs]  # the reference: each request by itself

    runner = runners(pipe, {key: rec}, max_batch=len(reqs), max_wait_ms=5000)
    seen = _record(runner)
    together = await asyncio.gather(*(runner.recommend(key, [r], topk=k) for r, k in reqs))

    assert seen == [("recommend", len(reqs))] and runner.calls == 1  # one model call for all six
    for (r, k), [got], want in zip(reqs, together, alone):
        assert len(want.items) == min(k, 18 - len(r.exclude)) and not set(want.items) & r.exclude
        assert got.items == want.items
        assert got.generated == want.generated
        assert got.beam_items == want.beam_items and bool(want.beam_items) == (beams > 0)
        assert got.memory_indices == want.memory_indices
        np.testing.assert_allclose(got.memory_scores, want.memory_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.distances, want.distances, rtol=1e-5, atol=1e-6)
    # the requests really differ (a runner answering every caller with one row would fail above)
    assert len({tuple(w.items) for w in alone}) == len(reqs)
    if key in ("learned", "semantic", "random"):
        assert [bool(w.memory_indices) for w in alone] == [True, True, False, True, True, True]


async def _six_answers(pipe, runners, monkeypatch, **kw):
    """The six requests as six calls, answered by a runner made with ``kw``: the first is admitted
    alone and its first step waits until the other five are queued, so they join one step later and
    end one step after it. Returns (answers, the same requests answered alone, the grounding passes)."""
    rec = pipe.recommender("learned", max_new_tokens=MAX_NEW)
    reqs = _requests(pipe)
    alone = [rec.recommend([r], topk=k)[0] for r, k in reqs]
    go = _hold_steps(pipe, monkeypatch)
    runner = runners(pipe, {"learned": rec}, max_batch=8, max_wait_ms=0, **kw)
    passes = _record(runner, ("ground",))
    first = asyncio.ensure_future(runner.recommend("learned", [reqs[0][0]], topk=reqs[0][1]))
    await _until(lambda: runner.calls == 1)
    rest = [asyncio.ensure_future(runner.recommend("learned", [r], topk=k)) for r, k in reqs[1:]]
    await _until(lambda: runner.queue_depth() == len(rest))
    go.set()
    got = await asyncio.gather(first, *rest)
    # a pass is told to the listeners after it answers its calls: wait for the last one's record
    await _until(lambda: sum(n for _, n in passes) == len(reqs))
    monkeypatch.undo()
    return [g[0] for g in got], alone, passes


async def test_done_answers_wait_for_company_and_are_grounded_together(pipe, runners, monkeypatch):
    """With a grounding wait, answers done at different steps are grounded in one pass once nothing
    else decodes; without one, each step's done answers are grounded right after it. Same answers."""
    now, alone, passes_now = await _six_answers(pipe, runners, monkeypatch, ground_wait_ms=0)
    later, _, passes_later = await _six_answers(pipe, runners, monkeypatch, ground_wait_ms=60_000)
    assert len(passes_now) > 1 and sum(n for _, n in passes_now) == 6  # the rows end at different steps
    assert passes_later == [("ground", 6)]
    for a, b, want in zip(now, later, alone):
        assert a.items == b.items == want.items and a.generated == b.generated == want.generated
        np.testing.assert_allclose(b.distances, want.distances, rtol=1e-5, atol=1e-6)


async def test_a_lone_answer_does_not_wait_for_grounding_company(pipe, runners):
    rec = pipe.recommender("none", max_new_tokens=MAX_NEW)
    req, k = _requests(pipe)[2]
    runner = runners(pipe, {"none": rec}, max_batch=2, max_wait_ms=0, ground_wait_ms=60_000)
    passes = _record(runner, ("ground",))
    t0 = time.monotonic()
    [got] = await runner.recommend("none", [req], topk=k)  # alone: grounded as soon as it is done
    assert time.monotonic() - t0 < 30
    await _until(lambda: passes == [("ground", 1)])  # a pass is told to the listeners after it answers
    assert got.items == rec.recommend([req], topk=k)[0].items


def test_prefill_groups_sorted_within_the_token_budget():
    lengths = [30, 10, 500, 12, 31, 11, 200]
    groups = prefill_groups(lengths, 64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    assert groups == [[1, 5, 3], [0, 4], [6], [2]]  # by length; 3 x 12 <= 64 < 4 x 30; long rows alone
    assert all(len(g) * max(lengths[i] for i in g) <= 64 or len(g) == 1 for g in groups)
    assert prefill_groups(lengths, 10_000) == [[1, 5, 3, 0, 4, 6, 2]] and prefill_groups([], 8) == []


@pytest.mark.parametrize("budget", [1, 60])
async def test_prefill_in_groups_equals_one_at_a_time(pipe, runners, monkeypatch, budget):
    """A prefill split by the token budget (every row alone, or a few groups) merges into one
    decoding batch whose answers are those of each request alone."""
    rec = pipe.recommender("learned", max_new_tokens=MAX_NEW, prefill_max_tokens=budget)
    reqs = _requests(pipe)
    alone = [pipe.recommender("learned", max_new_tokens=MAX_NEW).recommend([r], topk=k)[0] for r, k in reqs]
    lengths = [len(p.input_ids) for p in rec.prompts([r for r, _ in reqs])]
    starts, begin = [], generation.begin

    def counted(lm, prompts, *args, **kwargs):
        starts.append(len(prompts))
        return begin(lm, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "begin", counted)
    runner = runners(pipe, {"learned": rec}, max_batch=len(reqs), max_wait_ms=5000)
    got = await asyncio.gather(*(runner.recommend("learned", [r], topk=k) for r, k in reqs))
    assert starts == [len(g) for g in prefill_groups(lengths, budget)] and len(starts) > 1
    for [g], want in zip(got, alone):
        assert g.items == want.items and g.generated == want.generated and g.memory_indices == want.memory_indices
        np.testing.assert_allclose(g.distances, want.distances, rtol=1e-5, atol=1e-6)


def _trace(pipe, monkeypatch) -> tuple[list[str], list[int], list[int]]:
    """What the model thread does, in order: "chunk" (a prefill chunk), "prefill" (a prefill's last
    chunk) and "step" (a decoding step); the rows of each step; the prompt length of each prefill
    done, in order."""
    events, rows, done = [], [], []
    advance, complete, step = generation.advance, generation.complete, generation.step

    def traced_advance(lm, prefill, max_tokens=None):
        out = advance(lm, prefill, max_tokens)
        if out is None:
            events.append("chunk")
        return out

    def traced_complete(lm, prefill, *args, **kwargs):
        out = complete(lm, prefill, *args, **kwargs)
        events.append("prefill")
        done.append(prefill.prompt_len)
        return out

    def traced_step(lm, batch):
        events.append("step")
        rows.append(batch.rows)
        return step(lm, batch)

    monkeypatch.setattr(generation, "advance", traced_advance)
    monkeypatch.setattr(generation, "complete", traced_complete)
    monkeypatch.setattr(generation, "step", traced_step)
    return events, rows, done


def _mixed(pipe, max_new: int = MAX_NEW):
    """A short mode (automr) and full-history, its long request (every title) and its prompt length."""
    recs = {"learned": pipe.recommender("learned", max_new_tokens=max_new),
            "full-history": pipe.recommender("none", full_history=True, max_new_tokens=MAX_NEW)}
    long_ = (RecommendRequest(context=list(range(18)), exclude={0}, seed=9), 5)
    return recs, long_, len(recs["full-history"].prompts([long_[0]])[0].input_ids)


def _same(got: Recommendation, want: Recommendation) -> None:
    assert got.items == want.items and got.generated == want.generated and got.memory_indices == want.memory_indices


async def _second_while_first_runs(runner, first, second, running, go: threading.Event) -> list[Recommendation]:
    """Send ``first`` = (key, (request, k)); once ``running()``, send ``second``; once it is queued,
    set ``go``. The two answers."""
    calls = []
    for (key, (r, k)), ready in ((first, running), (second, lambda: runner.queue_depth() == 1)):
        calls.append(asyncio.ensure_future(runner.recommend(key, [r], topk=k)))
        await _until(ready)
    go.set()
    return [x[0] for x in await asyncio.gather(*calls)]


@pytest.mark.parametrize("keys,asked,yields", [(("full-history",), None, True),  # the mode is background
                                               ((), True, True),  # the request asks for it
                                               (("full-history",), False, False)])  # the request declines
async def test_background_calls_go_after_the_others_and_get_the_same_answers(pipe, runners, monkeypatch,
                                                                               keys, asked, yields):
    """A full-history call queued before a short call: background (by its mode, or by its request's
    own say), it is taken after it, though only one of them fits beside the decoding row, so the
    short call's prefill runs first; marked interactive, first come, first served. Every call gets
    its answer alone."""
    recs, long_, n_tokens = _mixed(pipe)
    reqs = _requests(pipe)
    plan = [("learned", reqs[0], None), ("full-history", long_, asked), ("learned", reqs[1], None)]
    want = [recs[key].recommend([r], topk=k)[0] for key, (r, k), _ in plan]
    _, _, done = _trace(pipe, monkeypatch)
    go = _hold_steps(pipe, monkeypatch)  # the first step waits until both later calls are queued
    runner = runners(pipe, recs, max_batch=2, max_wait_ms=0, background=keys,  # room for one of them
                     background_share=0.5, background_chunk_tokens=10_000)  # once taken, it would prefill at once
    first = asyncio.ensure_future(runner.recommend("learned", [reqs[0][0]], topk=reqs[0][1]))
    await _until(lambda: runner.calls == 1)
    rest = [asyncio.ensure_future(runner.recommend(key, [r], topk=k, background=bg)) for key, (r, k), bg in plan[1:]]
    await _until(lambda: runner.queue_depth() == 2)
    go.set()
    got = [x[0] for x in await asyncio.gather(first, *rest)]
    for g, w in zip(got, want):
        _same(g, w)
    assert len(done) == 3
    if yields:
        assert done[-1] == n_tokens != done[1]  # the later short call was prefilled first
    else:
        assert done[1] == n_tokens != done[-1]  # in the order they came
    assert runner.decoding is None and not runner.scheduler.admitting


@pytest.mark.parametrize("share", [0.0, 0.9])
async def test_background_prefill_takes_its_share_while_other_rows_decode(pipe, runners, monkeypatch, share):
    """``background_share`` 0: a full-history prefill waits until no short row decodes; 0.9: its
    chunks (at most ``background_chunk_tokens``) run between the short rows' steps. Either way both
    answers are those of each call alone."""
    recs, long_, n_tokens = _mixed(pipe, max_new=16)
    short = _requests(pipe)[0]
    want = [recs["learned"].recommend([short[0]], topk=short[1])[0],
            recs["full-history"].recommend([long_[0]], topk=long_[1])[0]]
    go, advance, beside = _hold_steps(pipe, monkeypatch), generation.advance, []

    def watched_advance(lm, prefill, max_tokens=None):  # does a long-prompt chunk run beside a short row?
        if prefill.prompt_len == n_tokens:
            dec = runner.decoding
            beside.append((dec is not None and any(job.call.key == "learned" for job, _ in dec.tags), max_tokens))
        return advance(lm, prefill, max_tokens)

    monkeypatch.setattr(generation, "advance", watched_advance)
    runner = runners(pipe, recs, max_batch=4, max_wait_ms=0, background=("full-history",),
                     background_share=share, background_chunk_tokens=4)
    got = await _second_while_first_runs(runner, ("learned", short), ("full-history", long_),
                                         lambda: runner.calls == 1, go)
    for g, w in zip(got, want):
        _same(g, w)
    assert beside and any(b for b, _ in beside) == (share > 0)
    assert all(m == 4 for b, m in beside if b)  # beside a short row: chunks of 4 padded tokens
    assert (runner.background_seconds["beside_others"] > 0) == (share > 0) and runner.background_seconds["alone"] > 0


async def test_a_call_arriving_during_a_background_prefill_waits_for_one_chunk(pipe, runners, monkeypatch):
    """Nothing else live: a full-history prefill runs in chunks of ``background_chunk_tokens``. A short
    call that arrives during the first chunk is prefilled right after it, before the rest."""
    recs, long_, n_tokens = _mixed(pipe)
    short = _requests(pipe)[0]
    want = [recs["full-history"].recommend([long_[0]], topk=long_[1])[0],
            recs["learned"].recommend([short[0]], topk=short[1])[0]]
    events, _, done = _trace(pipe, monkeypatch)
    started, go, advance = threading.Event(), threading.Event(), generation.advance

    def held_advance(lm, prefill, max_tokens=None):  # the long prompt's first chunk waits for the short call
        if prefill.prompt_len == n_tokens and not started.is_set():
            started.set()
            assert go.wait(10)
        return advance(lm, prefill, max_tokens)

    monkeypatch.setattr(generation, "advance", held_advance)
    runner = runners(pipe, recs, max_batch=4, max_wait_ms=0, background=("full-history",), background_chunk_tokens=8)
    got = await _second_while_first_runs(runner, ("full-history", long_), ("learned", short), started.is_set, go)
    for g, w in zip(got, want):
        _same(g, w)
    assert events[:2] == ["chunk", "prefill"] and done[0] != n_tokens == done[1]


async def test_a_background_prefill_alone_runs_its_chunks_back_to_back(pipe, runners, monkeypatch):
    """Only full-history rows decode: a second full-history prefill runs its chunks with no decoding
    step between them, as one whole prefill would; its rows then decode with the first call's."""
    recs, long_, n_tokens = _mixed(pipe)
    other = (RecommendRequest(context=list(range(1, 17)), exclude={1}, seed=7), 4)
    want = [recs["full-history"].recommend([r], topk=k)[0] for r, k in (long_, other)]
    events, _, done = _trace(pipe, monkeypatch)
    go = _hold_steps(pipe, monkeypatch)
    runner = runners(pipe, recs, max_batch=4, max_wait_ms=0, background=("full-history",), background_chunk_tokens=8)
    got = await _second_while_first_runs(runner, ("full-history", long_), ("full-history", other),
                                         lambda: runner.decoding is not None, go)
    for g, w in zip(got, want):
        _same(g, w)
    # the first prefill's chunks, one step (held while the second call queued), then the second's
    # chunks and its last forward with no step between, then steps of both
    k = events.index("prefill")
    assert set(events[:k]) == {"chunk"} and events[k + 1] == "step"
    j = events.index("prefill", k + 1)
    assert set(events[k + 2: j]) == {"chunk"} and j - k - 2 > 1
    assert done == [n_tokens, len(recs["full-history"].prompts([other[0]])[0].input_ids)]


@pytest.mark.parametrize("share", [0.0, 0.9])
async def test_a_background_call_is_not_starved_when_the_others_fill_every_row(pipe, runners, monkeypatch, share):
    """One row of room, taken by short calls one after another: a full-history call queued before
    two short ones is taken once its credit allows (``background_share`` 0.9), or after every short
    call (0: strict priority). Every call gets its answer alone."""
    recs, long_, n_tokens = _mixed(pipe)
    reqs = _requests(pipe)
    plan = [("learned", reqs[0]), ("full-history", long_), ("learned", reqs[1]), ("learned", reqs[2])]
    want = [recs[key].recommend([r], topk=k)[0] for key, (r, k) in plan]
    _, _, done = _trace(pipe, monkeypatch)
    go = _hold_steps(pipe, monkeypatch)
    runner = runners(pipe, recs, max_batch=1, max_wait_ms=0, background=("full-history",), background_share=share)
    calls = [asyncio.ensure_future(runner.recommend(plan[0][0], [plan[0][1][0]], topk=plan[0][1][1]))]
    await _until(lambda: runner.decoding is not None)
    for n, (key, (r, k)) in enumerate(plan[1:], start=1):
        calls.append(asyncio.ensure_future(runner.recommend(key, [r], topk=k)))
        await _until(lambda: runner.queue_depth() == n)
    go.set()
    got = [x[0] for x in await asyncio.gather(*calls)]
    for g, w in zip(got, want):
        _same(g, w)
    assert done.index(n_tokens) == (1 if share else 3)


def test_background_settings_are_checked(pipe, runners):
    recs = {"learned": pipe.recommender("learned", max_new_tokens=MAX_NEW)}
    with pytest.raises(ValueError, match="full-history"):
        runners(pipe, recs, background=("full-history",))
    with pytest.raises(ValueError, match="background_share"):
        runners(pipe, recs, background_share=1.0)


async def test_a_failing_prefill_takes_its_rows_back_and_retries_its_calls_alone(pipe, runners, monkeypatch):
    """Two calls admitted together, in two prefill groups: the first group joins the decoding batch,
    the second fails (a memory of the wrong width); the first call's rows are taken back and both calls
    run alone: the good one is answered as alone, the bad one fails by itself."""
    rec = pipe.recommender("learned", max_new_tokens=MAX_NEW, prefill_max_tokens=1)  # every row alone
    good = _requests(pipe)[0]
    bad = RecommendRequest(context=list(range(9)), memory=torch.zeros(3, pipe.lm.hidden_size + 1), seed=5)
    want = rec.recommend([good[0]], topk=good[1])[0]
    events, rows, _ = _trace(pipe, monkeypatch)
    runner = runners(pipe, {"learned": rec}, max_batch=2, max_wait_ms=5000)  # 2 calls fill it
    got = await asyncio.gather(runner.recommend("learned", [good[0]], topk=good[1]),
                               runner.recommend("learned", [bad], topk=3), return_exceptions=True)
    assert isinstance(got[1], RuntimeError) and not isinstance(got[0], BaseException)
    assert got[0][0].items == want.items and got[0][0].generated == want.generated
    # the good row prefilled, stepped once, was taken back when the bad group failed, then ran alone
    assert events[:2] == ["prefill", "step"] and events.count("prefill") == 2
    assert set(rows) == {1}  # the row taken back never decoded beside its retry
    assert runner.decoding is None and not runner.scheduler.admitting and runner.queue_depth() == 0


async def test_batched_encode_splits_back(pipe, runners):
    enc = pipe.memory_encoder()
    calls = [[(0, 1, 2), (3, 4, 5)], [(6,), (7, 8), (9, 10, 11)], [(12, 13, 14), (0, 1, 2)],
             [(15, 16, 17), (6,), (2, 3), (5, 6, 7)]]  # 11 windows, 9 distinct
    runner = runners(pipe, {}, batch_size=16, max_batch=len(calls), max_wait_ms=1000)
    seen = _record(runner)
    got = await asyncio.gather(*(runner.encode(ws) for ws in calls))
    assert seen == [("encode", 9)]  # one encoder call of the nine distinct windows
    for ws, g in zip(calls, got):
        want = enc.encode_windows(ws).numpy()  # [n, H] the direct encoder, this caller's windows only
        assert g.shape == want.shape == (len(ws), pipe.lm.hidden_size) and g.dtype == np.float32
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
    # windows past one encoder batch (batch_size) are not merged: a call of 20 runs alone, then the other
    big = [(i % 18, (i + 1) % 18, (i + 2) % 18) for i in range(20)]
    a, b = await asyncio.gather(runner.encode(big), runner.encode([(4, 5, 6)]))
    assert seen[1:] == [("encode", 18), ("encode", 1)]  # windows 18 and 19 repeat 0 and 1: encoded once
    np.testing.assert_allclose(a, enc.encode_windows(big).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, enc.encode_windows([(4, 5, 6)]).numpy(), rtol=1e-4, atol=1e-5)
    assert (await runner.encode([])).shape == (0, pipe.lm.hidden_size)


# ---- the queue, close and failures, with the model thread held ------------------------------------------


class Gate:
    """Holds the model thread at the start of ``rec``'s next calls (``begin``: their prompts and picks)
    until ``open``; ``started`` is set when the first one arrives."""

    def __init__(self, rec):
        self.started, self.go, begin = threading.Event(), threading.Event(), rec.begin

        def held(*args, **kwargs):
            self.started.set()
            assert self.go.wait(20)
            return begin(*args, **kwargs)

        rec.begin = held

    def open(self) -> None:
        self.go.set()


async def _held_runner(pipe, runners, **kw):
    """A worker whose first call (request 2 of ``_requests``) is held at its start until the gate opens."""
    rec = pipe.recommender("none", max_new_tokens=MAX_NEW)
    gate = Gate(rec)
    runner = runners(pipe, {"none": rec}, **kw)
    req, k = _requests(pipe)[2]
    held = asyncio.ensure_future(runner.recommend("none", [req], topk=k))
    await asyncio.to_thread(gate.started.wait, 10)
    return gate, rec, runner, held


async def test_queue_full_at_the_bound(pipe, runners):
    gate, rec, runner, held = await _held_runner(pipe, runners, max_batch=1, max_wait_ms=0, max_queue=3)
    reqs = _requests(pipe)
    assert runner.queue_depth() == 0  # the running call is not waiting
    waiting = [asyncio.ensure_future(runner.recommend("none", [reqs[i][0]], topk=reqs[i][1])) for i in (0, 1, 3)]
    await _until(lambda: runner.queue_depth() == 3)
    with pytest.raises(QueueFull) as e:
        await runner.recommend("none", [reqs[4][0]], topk=1)
    # no call has finished yet: 1 s per call (the floor) x (3 queued batches of 1 + the running one)
    assert e.value.retry_after_s == 4.0 and e.value.depth == 3
    with pytest.raises(QueueFull):
        await runner.encode([(1, 2, 3)])  # encode calls share the bound
    assert runner.queue_depth() == 3
    gate.open()
    out = await asyncio.gather(held, *waiting)
    for (r, k), [got] in zip([reqs[i] for i in (2, 0, 1, 3)], out):
        assert got.items == rec.recommend([r], topk=k)[0].items
    assert runner.queue_depth() == 0
    assert len(await runner.recommend("none", [reqs[5][0]], topk=2)) == 1  # room again


async def test_cancelled_caller_is_skipped_and_errors_stay_with_their_request(pipe, runners):
    """Queued behind a held call: one caller goes away (its call never reaches the model), one request
    is bad (a memory of the wrong width). The batch they were taken in fails at its prefill and is
    retried a call at a time: the bad call fails alone, the good ones get their answers alone."""
    gate, _, runner, held = await _held_runner(pipe, runners, max_batch=4, max_wait_ms=0)
    rec = runner.recommenders["none"]
    reqs = _requests(pipe)
    bad = RecommendRequest(context=[1, 2], memory=torch.zeros(3, pipe.lm.hidden_size + 1), seed=5)
    runner.recommenders["learned"] = learned = pipe.recommender("learned", max_new_tokens=MAX_NEW)
    gone = asyncio.ensure_future(runner.recommend("learned", [reqs[0][0]], topk=2))
    good = asyncio.ensure_future(runner.recommend("learned", [reqs[1][0]], topk=2))
    wrong = asyncio.ensure_future(runner.recommend("learned", [bad], topk=2))
    good2 = asyncio.ensure_future(runner.recommend("learned", [reqs[3][0]], topk=2))
    await _until(lambda: runner.queue_depth() == 4)
    gone.cancel()
    await asyncio.sleep(0.01)
    seen = _record(runner, ("recommend",))
    gate.open()
    assert (await held)[0].items == rec.recommend([reqs[2][0]], topk=reqs[2][1])[0].items
    assert (await good)[0].items == learned.recommend([reqs[1][0]], topk=2)[0].items
    assert (await good2)[0].items == learned.recommend([reqs[3][0]], topk=2)[0].items
    with pytest.raises(RuntimeError):
        await wrong
    assert gone.cancelled()
    assert [n for _, n in seen] == [1, 1, 1]  # the held call, then the two good calls, each alone after the failure
    with pytest.raises(KeyError):
        await runner.recommend("nope", [reqs[0][0]], topk=1)


async def test_close_drains_then_refuses(pipe, runners):
    gate, rec, runner, held = await _held_runner(pipe, runners, max_batch=1, max_wait_ms=0)
    reqs = _requests(pipe)
    queued = [asyncio.ensure_future(runner.recommend("none", [reqs[i][0]], topk=2)) for i in (0, 1)]
    await _until(lambda: runner.queue_depth() == 2)
    closing = asyncio.ensure_future(asyncio.to_thread(runner.close, 20))
    await _until(lambda: runner.closing)
    with pytest.raises(RunnerClosed) as e:
        await runner.recommend("none", [reqs[3][0]], topk=1)
    assert e.value.status == 503 and e.value.code == "shutting_down"
    gate.open()
    assert await closing is True  # everything finished
    assert [len((await t)[0].items) for t in queued] == [2, 2] and (await held)[0].items


async def test_close_after_grace_fails_the_queued(pipe, runners):
    gate, rec, runner, held = await _held_runner(pipe, runners, max_batch=1, max_wait_ms=0)
    queued = asyncio.ensure_future(runner.recommend("none", [_requests(pipe)[0][0]], topk=1))
    await _until(lambda: runner.queue_depth() == 1)
    t0 = time.monotonic()
    assert await asyncio.to_thread(runner.close, 0.3) is False  # the model call is still held
    assert 0.3 <= time.monotonic() - t0 < 5.0
    with pytest.raises(RunnerClosed):
        await queued
    gate.open()
    assert (await held)[0].items  # the running call was not interrupted


async def test_item_elements_are_warmed_once_and_cached_on_disk(pipe, runners, tmp_path):
    """Item elements: ``MemoryElements.warm`` encodes every title at start-up into ARTEFACTS/memory; a
    restart (new elements on the same folder) encodes none; the worker's ``encode`` then serves the
    warmed table (float16, as the store keeps them), equal to a direct encoding of the bare titles so
    rounded, and the encoder's cache is let go (the vectors are held once)."""
    from dataclasses import replace

    items = replace(pipe, element="item")
    assert MemoryElements(items, 16, tmp_path / "memory").warm() == len(TINY_TITLES)
    assert any((tmp_path / "memory").glob("item-*/part-*.safetensors"))
    again = runners(items, {}, batch_size=16, memory_dir=tmp_path / "memory")
    assert again.elements.warm() == 0
    seen = _record(again)
    assert again.elements.encoder is None and again.elements.warm() == 0  # warm once
    got = await again.encode([(0, 1, 5), (7,), (2, 3)])  # an item element is the window's last item
    want = items.memory_encoder().encode_items([5, 7, 3]).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, again.elements.table[[5, 7, 3]].astype(np.float32))
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-4)
    assert seen == [("encode", 3)]
    assert MemoryElements(pipe, 16, tmp_path / "memory").warm() == 0  # window elements: nothing to warm
