"""Dynamic batching in ``service/runner.py``: concurrent calls -> one model call, each caller its rows.

The model-level tests use a tiny random Llama: the batched answer of every request is compared with
``Recommender.recommend`` on that request alone (and the encoder's vectors with a direct encoder
call). The scheduling tests (max_wait, keys, queue bound, cancellation, errors, close) use a fake
recommender that records each model call and can be held on a ``threading.Event``.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from model.grounding import CatalogueIndex
from model.llm import SplitLM
from model.pipeline import Pipeline
from model.prompts import PromptBuilder
from model.recommend import Recommendation, RecommenderConfig, RecommendRequest, prefill_groups
from model.retriever import Retriever, RetrieverConfig
from service.runner import ModelRunner, QueueFull, RunnerClosed
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
    """``make(pipeline, recommenders, **kw)`` -> a ModelRunner, closed after the test."""
    made: list[ModelRunner] = []

    def make(p, recs, **kw):
        made.append(ModelRunner(p, recs, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close(5)


def _record(runner: ModelRunner, kinds: tuple[str, ...] = ("recommend", "encode")) -> list[tuple[str, int]]:
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
    go, step = threading.Event(), pipe.lm.step

    def held_step(batch):
        assert go.wait(10)
        return step(batch)

    monkeypatch.setattr(pipe.lm, "step", held_step, raising=False)
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
    step = pipe.lm.step

    def held_step(batch):  # the first step waits until every other call is queued
        assert go.wait(10)
        seen_keys.append(sorted({key for job, _ in batch.tags for key, r in recs.items() if r is job.recommender}))
        return step(batch)

    monkeypatch.setattr(pipe.lm, "step", held_step, raising=False)
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
        assert have.memory_indices == want.memory_indices
        np.testing.assert_allclose(have.distances, want.distances, rtol=1e-5, atol=1e-6)
    assert [bool(w.beam_items) for w in alone] == [key == "beams" for key, _ in plan]
    assert len(admitted) > 1 and all(kind == "recommend" for kind, _ in admitted)  # several prefills...
    assert max(len(keys) for keys in seen_keys) >= 2  # ...whose rows decoded together across recommenders
    assert any("beams" in keys and len(keys) >= 2 for keys in seen_keys)  # beams beside greedy rows
    assert runner._decoding is None and runner.queue_depth() == 0


async def test_a_failing_decoding_step_fails_its_calls_and_the_runner_goes_on(pipe, runners, monkeypatch):
    rec = pipe.recommender("none", max_new_tokens=MAX_NEW)
    req, k = _requests(pipe)[2]
    want = rec.recommend([req], topk=k)[0]
    step, failures = pipe.lm.step, [RuntimeError("out of memory in a step")]

    def flaky(batch):
        if failures:
            raise failures.pop()
        return step(batch)

    monkeypatch.setattr(pipe.lm, "step", flaky, raising=False)
    runner = runners(pipe, {"none": rec}, max_batch=4, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        await runner.recommend("none", [req], topk=k)
    got = (await runner.recommend("none", [req], topk=k))[0]  # the model thread is still serving
    assert got.items == want.items and runner._decoding is None


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
    alone = [rec.recommend([r], topk=k)[0] for r, k in reqs]  # the reference: each request by itself (HF generate)

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


class _Finisher:
    """A recommender's ``finish`` alone: one Recommendation per text."""

    config = RecommenderConfig()

    def finish(self, requests, texts, beams, picks, topk=None):
        return [Recommendation(items=[0], distances=[0.0], generated=t, memory_indices=[], memory_scores=[])
                for t in texts]


def test_grounding_policy_waits_until_a_batch_is_full_the_wait_is_over_or_nothing_decodes(pipe, runners):
    """``_ground`` on its own (the model thread sleeps: nothing was submitted)."""
    from service.runner import _Call, _Job

    runner = runners(pipe, {}, max_batch=3, ground_wait_ms=60_000)
    passes = _record(runner, ("ground",))
    fin = _Finisher()

    def done_job(rows: int, waited_s: float = 0.0) -> _Job:
        job = _Job(_Call("recommend", "fake", [_req(j) for j in range(rows)], None), fin)
        job.texts = [f"t{j}" for j in range(rows)]
        job.done_at = time.monotonic() - waited_s
        runner._grounding.append(job)
        return job

    runner._decoding = object()  # other rows are decoding
    a = done_job(1)
    runner._ground()
    assert passes == [] and not a.call.future.done()  # waits for company
    b = done_job(2)
    runner._ground()  # 3 rows = max_batch
    assert passes == [("ground", 3)] and a.call.future.done() and b.call.future.done()
    c = done_job(1, waited_s=61)
    runner._ground()  # waited longer than ground_wait_ms
    assert passes[-1] == ("ground", 1) and c.call.future.result()[0].generated == "t0"
    runner._decoding = None
    d = done_job(1)
    runner._ground()  # nothing else decodes
    assert passes[-1] == ("ground", 1) and d.call.future.done() and runner._grounding == []


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
    starts, begin = [], pipe.lm.begin

    def counted(prompts, *args, **kwargs):
        starts.append(len(prompts))
        return begin(prompts, *args, **kwargs)

    monkeypatch.setattr(pipe.lm, "begin", counted, raising=False)
    runner = runners(pipe, {"learned": rec}, max_batch=len(reqs), max_wait_ms=5000)
    got = await asyncio.gather(*(runner.recommend("learned", [r], topk=k) for r, k in reqs))
    assert starts == [len(g) for g in prefill_groups(lengths, budget)] and len(starts) > 1
    for [g], want in zip(got, alone):
        assert g.items == want.items and g.generated == want.generated and g.memory_indices == want.memory_indices
        np.testing.assert_allclose(g.distances, want.distances, rtol=1e-5, atol=1e-6)


def _trace(pipe, monkeypatch) -> tuple[list[str], list[int], list[int]]:
    """What the model thread does, in order: "chunk" (a prefill chunk), "prefill" (a prefill's last
    forward) and "step" (a decoding step); the rows of each step; the prompt length of each prefill
    done, in order."""
    events, rows, done, advance, step = [], [], [], pipe.lm.advance, pipe.lm.step

    def traced_advance(prefill, max_tokens=None):
        out = advance(prefill, max_tokens)
        events.append("chunk" if out is None else "prefill")
        if out is not None:
            done.append(prefill.prompt_len)
        return out

    def traced_step(batch):
        events.append("step")
        rows.append(batch.rows)
        return step(batch)

    monkeypatch.setattr(pipe.lm, "advance", traced_advance, raising=False)
    monkeypatch.setattr(pipe.lm, "step", traced_step, raising=False)
    return events, rows, done


async def test_a_long_prefill_runs_in_chunks_between_the_steps_of_decoding_rows(pipe, runners, monkeypatch):
    """Chunked prefill: a full-history call arriving while a call decodes is prefilled a chunk at a
    time, with a decoding step after each chunk; a short call queued after it is prefilled between
    two of its chunks (round robin); all get the answers they get alone."""
    recs = {"learned": pipe.recommender("learned", max_new_tokens=MAX_NEW),
            "full-history": pipe.recommender("none", full_history=True, max_new_tokens=MAX_NEW)}
    reqs = _requests(pipe)
    short, long_, later = reqs[0], (RecommendRequest(context=list(range(18)), exclude={0}, seed=9), 5), reqs[1]
    want = [recs[key].recommend([r], topk=k)[0] for key, (r, k) in
            (("learned", short), ("full-history", long_), ("learned", later))]
    n_tokens = len(recs["full-history"].prompts([long_[0]])[0].input_ids)
    events, _, done = _trace(pipe, monkeypatch)
    go = _hold_steps(pipe, monkeypatch)  # the first step waits until the long call is queued
    runner = runners(pipe, recs, max_batch=4, max_wait_ms=0, prefill_chunk_tokens=8)
    first = asyncio.ensure_future(runner.recommend("learned", [short[0]], topk=short[1]))
    await _until(lambda: runner.calls == 1)
    second = asyncio.ensure_future(runner.recommend("full-history", [long_[0]], topk=long_[1]))
    await _until(lambda: runner.queue_depth() == 1)
    third = asyncio.ensure_future(runner.recommend("learned", [later[0]], topk=later[1]))
    await _until(lambda: runner.queue_depth() == 2)
    go.set()
    got = [x[0] for x in await asyncio.gather(first, second, third)]
    for w, g in zip(want, got):
        assert g.items == w.items and g.generated == w.generated and g.memory_indices == w.memory_indices
    assert done[1] < n_tokens == done[2]  # the later short call's prefill was done before the long one's
    # the first prefill ran whole (nothing was decoding), the long one in chunks of 8 columns with the
    # short row's steps between them, as long as it was decoding
    assert events[0] == "prefill" and n_tokens > 5 * 8
    chunks = [j for j, e in enumerate(events) if e == "chunk"]
    assert len(chunks) >= 3 and all(events[j + 1] == "step" for j in chunks[:3])
    assert runner._decoding is None and not runner._admitting


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
    assert runner._decoding is None and not runner._admitting


@pytest.mark.parametrize("share", [0.0, 0.9])
async def test_background_prefill_takes_its_share_while_other_rows_decode(pipe, runners, monkeypatch, share):
    """``background_share`` 0: a full-history prefill waits until no short row decodes; 0.9: its
    chunks (at most ``background_chunk_tokens``) run between the short rows' steps. Either way both
    answers are those of each call alone."""
    recs, long_, n_tokens = _mixed(pipe, max_new=16)
    short = _requests(pipe)[0]
    want = [recs["learned"].recommend([short[0]], topk=short[1])[0],
            recs["full-history"].recommend([long_[0]], topk=long_[1])[0]]
    go, advance, beside = _hold_steps(pipe, monkeypatch), pipe.lm.advance, []

    def watched_advance(prefill, max_tokens=None):  # does a long-prompt chunk run beside a short row?
        if prefill.prompt_len == n_tokens:
            dec = runner._decoding
            beside.append((dec is not None and any(job.call.key == "learned" for job, _ in dec.tags), max_tokens))
        return advance(prefill, max_tokens)

    monkeypatch.setattr(pipe.lm, "advance", watched_advance, raising=False)
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
    started, go, advance = threading.Event(), threading.Event(), pipe.lm.advance

    def held_advance(prefill, max_tokens=None):  # the long prompt's first chunk waits for the short call
        if prefill.prompt_len == n_tokens and not started.is_set():
            started.set()
            assert go.wait(10)
        return advance(prefill, max_tokens)

    monkeypatch.setattr(pipe.lm, "advance", held_advance, raising=False)
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
                                         lambda: runner._decoding is not None, go)
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
    await _until(lambda: runner._decoding is not None)
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
    runner = runners(pipe, {"learned": rec}, max_batch=2, max_wait_ms=5000, prefill_chunk_tokens=1000)  # 2 calls fill it
    got = await asyncio.gather(runner.recommend("learned", [good[0]], topk=good[1]),
                               runner.recommend("learned", [bad], topk=3), return_exceptions=True)
    assert isinstance(got[1], RuntimeError) and not isinstance(got[0], BaseException)
    assert got[0][0].items == want.items and got[0][0].generated == want.generated
    # the good row prefilled, stepped once, was taken back when the bad group failed, then ran alone
    assert events[:2] == ["prefill", "step"] and events.count("prefill") == 2
    assert set(rows) == {1}  # the row taken back never decoded beside its retry
    assert runner._decoding is None and not runner._admitting and runner.queue_depth() == 0


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


# ---- scheduling, with a fake recommender ---------------------------------------------------------------


class FakeRec:
    """Records each model call (start time, each request's ``context[0]``, topk); the ranking of a
    request is ``context[0] + i`` for i < topk. Held on ``gate`` when given; a request whose
    ``context[0]`` is negative makes the call fail."""

    def __init__(self, gate: threading.Event | None = None):
        self.config = RecommenderConfig(topk=20)
        self.gate = gate
        self.started = threading.Event()
        self.batches: list[tuple[float, list[int], int]] = []

    def recommend(self, requests, topk=None):
        self.batches.append((time.monotonic(), [r.context[0] for r in requests], topk))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(20)
        if any(r.context[0] < 0 for r in requests):
            raise ValueError("bad request")
        return [Recommendation(items=[r.context[0] + i for i in range(topk)], distances=[float(i) for i in range(topk)],
                               generated=f"t{r.context[0]}", memory_indices=[], memory_scores=[]) for r in requests]


def _req(x: int) -> RecommendRequest:
    return RecommendRequest(context=[x])


async def test_max_wait_is_respected(pipe, runners):
    rec = FakeRec()
    runner = runners(pipe, {"a": rec}, max_batch=8, max_wait_ms=1000)
    t0 = time.monotonic()
    first = asyncio.ensure_future(runner.recommend("a", [_req(10)], topk=2))
    await asyncio.sleep(0.05)  # well inside the first call's 1 s: joins it
    second = asyncio.ensure_future(runner.recommend("a", [_req(20)], topk=3))
    r1, r2 = await first, await second
    assert [b[1:] for b in rec.batches] == [([10, 20], 3)]
    assert rec.batches[0][0] - t0 >= 1.0  # waited the full max_wait for company (the batch was not full)
    assert r1[0].items == [10, 11] and r2[0].items == [20, 21, 22]  # each its own rows, cut to its own topk
    # a lone call waits max_wait too, then goes alone
    t1 = time.monotonic()
    [r3] = await runner.recommend("a", [_req(30)], topk=1)
    assert rec.batches[1][1:] == ([30], 1) and 1.0 <= rec.batches[1][0] - t1 < 6.0
    assert r3.items == [30]
    # a full batch does not wait
    fast = runners(pipe, {"a": FakeRec()}, max_batch=2, max_wait_ms=30_000)
    t2 = time.monotonic()
    out = await asyncio.gather(fast.recommend("a", [_req(1)], topk=1), fast.recommend("a", [_req(2)], topk=1))
    assert time.monotonic() - t2 < 10.0 and [o[0].items for o in out] == [[1], [2]]


async def test_keys_and_kinds_not_mixed_and_fifo(pipe, runners):
    gate = threading.Event()
    block, a, b = FakeRec(gate), FakeRec(), FakeRec()
    runner = runners(pipe, {"block": block, "a": a, "b": b}, max_batch=3, max_wait_ms=0)
    seen = _record(runner)
    held = asyncio.ensure_future(runner.recommend("block", [_req(0)], topk=1))
    await asyncio.to_thread(block.started.wait, 10)  # the model thread is busy; the rest queues
    order = [("b", 1), ("a", 2), ("b", 3), ("a", 4), ("a", 5), ("a", 6), ("b", 7)]
    tasks = [asyncio.ensure_future(runner.recommend(k, [_req(x)], topk=1)) for k, x in order]
    enc = asyncio.ensure_future(runner.encode([(1, 2, 3)]))
    await _until(lambda: runner.queue_depth() == len(order) + 1)
    gate.set()
    results = await asyncio.gather(held, *tasks, enc)
    # oldest first; a batch takes only its own key, at most max_batch (3) requests, in arrival order
    assert [x[1] for x in b.batches] == [[1, 3, 7]]
    assert [x[1] for x in a.batches] == [[2, 4, 5], [6]]
    assert seen == [("recommend", 1), ("recommend", 3), ("recommend", 3), ("recommend", 1), ("encode", 1)]
    assert [r[0].items for r in results[1:-1]] == [[x] for _, x in order]
    assert results[-1].shape == (1, pipe.lm.hidden_size)
    assert runner.queue_depth() == 0 and runner.calls == 5


async def test_queue_full_at_the_bound(pipe, runners):
    gate = threading.Event()
    rec = FakeRec(gate)
    runner = runners(pipe, {"a": rec}, max_batch=1, max_wait_ms=0, max_queue=3)
    held = asyncio.ensure_future(runner.recommend("a", [_req(0)], topk=1))
    await asyncio.to_thread(rec.started.wait, 10)
    assert runner.queue_depth() == 0  # the running call is not waiting
    waiting = [asyncio.ensure_future(runner.recommend("a", [_req(x)], topk=1)) for x in (1, 2, 3)]
    await _until(lambda: runner.queue_depth() == 3)
    with pytest.raises(QueueFull) as e:
        await runner.recommend("a", [_req(4)], topk=1)
    # no call has finished yet: 1 s per call (the floor) x (3 queued batches of 1 + the running one)
    assert e.value.retry_after_s == 4.0 and e.value.depth == 3
    with pytest.raises(QueueFull):
        await runner.encode([(1, 2, 3)])  # encode calls share the bound
    assert runner.queue_depth() == 3
    gate.set()
    out = await asyncio.gather(held, *waiting)
    assert [o[0].items for o in out] == [[0], [1], [2], [3]]
    assert runner.queue_depth() == 0
    assert (await runner.recommend("a", [_req(5)], topk=1))[0].items == [5]  # room again


async def test_cancelled_caller_is_skipped_and_errors_stay_with_their_request(pipe, runners):
    gate = threading.Event()
    block, a = FakeRec(gate), FakeRec()
    runner = runners(pipe, {"block": block, "a": a}, max_batch=4, max_wait_ms=0)
    held = asyncio.ensure_future(runner.recommend("block", [_req(0)], topk=1))
    await asyncio.to_thread(block.started.wait, 10)
    gone = asyncio.ensure_future(runner.recommend("a", [_req(1)], topk=1))
    good = asyncio.ensure_future(runner.recommend("a", [_req(2)], topk=1))
    bad = asyncio.ensure_future(runner.recommend("a", [_req(-3)], topk=1))
    good2 = asyncio.ensure_future(runner.recommend("a", [_req(4)], topk=1))
    await _until(lambda: runner.queue_depth() == 4)
    gone.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    await held
    assert (await good)[0].items == [2] and (await good2)[0].items == [4]
    with pytest.raises(ValueError, match="bad request"):
        await bad
    assert gone.cancelled()
    # the cancelled call never reached the model; the failed batch was retried one call at a time
    assert [x[1] for x in a.batches] == [[2, -3, 4], [2], [-3], [4]]
    with pytest.raises(KeyError):
        await runner.recommend("nope", [_req(1)], topk=1)


async def _held(pipe, runners):
    """A runner whose first model call (request 0) is held on ``gate`` until the test sets it."""
    gate = threading.Event()
    rec = FakeRec(gate)
    runner = runners(pipe, {"a": rec}, max_batch=1, max_wait_ms=0)
    held = asyncio.ensure_future(runner.recommend("a", [_req(0)], topk=1))
    await asyncio.to_thread(rec.started.wait, 10)
    return gate, rec, runner, held


async def test_close_drains_then_refuses(pipe, runners):
    gate, rec, runner, held = await _held(pipe, runners)
    queued = [asyncio.ensure_future(runner.recommend("a", [_req(x)], topk=1)) for x in (1, 2)]
    await _until(lambda: runner.queue_depth() == 2)
    closing = asyncio.ensure_future(asyncio.to_thread(runner.close, 20))
    await _until(lambda: runner.closing)
    with pytest.raises(RunnerClosed) as e:
        await runner.recommend("a", [_req(9)], topk=1)
    assert e.value.status == 503 and e.value.code == "shutting_down"
    gate.set()
    assert await closing is True  # everything finished
    assert [(await t)[0].items for t in (held, *queued)] == [[0], [1], [2]]


async def test_close_after_grace_fails_the_queued(pipe, runners):
    gate, rec, runner, held = await _held(pipe, runners)
    queued = asyncio.ensure_future(runner.recommend("a", [_req(1)], topk=1))
    await _until(lambda: runner.queue_depth() == 1)
    t0 = time.monotonic()
    assert await asyncio.to_thread(runner.close, 0.3) is False  # the model call is still held
    assert 0.3 <= time.monotonic() - t0 < 5.0
    with pytest.raises(RunnerClosed):
        await queued
    gate.set()
    assert (await held)[0].items == [0]  # the running call was not interrupted
    assert [x[1] for x in rec.batches] == [[0]]


async def test_item_elements_are_warmed_once_and_cached_on_disk(pipe, runners, tmp_path):
    """Item elements: ``warm_items`` encodes every title at start-up into ARTEFACTS/memory; a restart
    (a new runner on the same folder) encodes none; ``encode`` then serves the warmed table (float16,
    as the store keeps them), equal to a direct encoding of the bare titles so rounded, and the
    encoder's cache is let go (the vectors are held once)."""
    from dataclasses import replace

    items = replace(pipe, element="item")
    first = runners(items, {}, batch_size=16, memory_dir=tmp_path / "memory")
    assert first.warm_items() == len(TINY_TITLES)
    assert any((tmp_path / "memory").glob("item-*/part-*.safetensors"))
    again = runners(items, {}, batch_size=16, memory_dir=tmp_path / "memory")
    assert again.warm_items() == 0
    seen = _record(again)
    assert again.encoder is None and again.warm_items() == 0  # warm once
    got = await again.encode([(0, 1, 5), (7,), (2, 3)])  # an item element is the window's last item
    want = items.memory_encoder().encode_items([5, 7, 3]).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, again.item_table[[5, 7, 3]].astype(np.float32))
    np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float32), rtol=1e-3, atol=1e-4)
    assert seen == [("encode", 3)]
    assert runners(pipe, {}, memory_dir=tmp_path / "memory").warm_items() == 0  # window elements: nothing to warm
