"""Graceful shutdown of the service (``AppState.stop``): real Redis, the tiny model of test_service.py.

The model call of the first request is held on a ``threading.Event`` (its recommender's prefill held
on the model thread), so that shutdown starts while it is in flight with more work queued behind it.
"""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from model.recommend import RecommendRequest
from service.app import create_app
from service.errors import RunnerClosed
from tests.redis_fixtures import memory_store, redis_server, redis_url  # noqa: F401
from tests.test_service import GEN, K, MAX_NEW, _expected_events, _settings, comps, threads1, world  # noqa: F401

pytestmark = pytest.mark.anyio



class Held:
    """Holds the recommender's calls at their start (``begin``, on the model thread) until ``gate`` is
    set; ``started`` is set when the first one arrives."""

    def __init__(self, rec):
        self.started, self.gate = threading.Event(), threading.Event()
        begin = rec.begin

        def held(*args, **kwargs):
            self.started.set()
            assert self.gate.wait(20)
            return begin(*args, **kwargs)

        rec.begin = held


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def _bigrec_items(world, comp, user: str, k: int) -> list[str]:
    """The answer of /recommend mode=bigrec for a seeded user, computed directly."""
    cat = world["ds"].catalogue
    items = [cat.index_of(e.item_id) for e in _expected_events(world, user)]
    rec = comp.pipeline.recommender("none", **GEN).recommend(
        [RecommendRequest(context=items[-K:], exclude=set(items))], topk=k)[0]
    return [cat.item_ids[i] for i in rec.items]


def _events(user: str, items: list[str]) -> dict:
    return {"events": [{"user_id": user, "item_id": it, "timestamp": 100 + j, "event_id": f"{user}{j}"}
                       for j, it in enumerate(items)]}


async def test_shutdown_finishes_in_flight_and_queued_work(world, comps, memory_store, redis_url, tmp_path):
    comp = comps["learned"]
    settings = _settings(redis_url, tmp_path, encode_on_write=True, shutdown_grace_s=30)
    app = create_app(settings, components=comp)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://automr") as client:
            state = app.state.automr
            await state.wait_ready(30)
            runner, encoder, fp = state.runner, state.encoder, state.users.fingerprint
            held = Held(runner.recommenders["none"])

            # in flight: u2's model call is held; queued behind it: u4's request, then w's background encoding
            first = asyncio.ensure_future(client.post("/recommend", json={"user_id": "u2", "k": 3, "mode": "bigrec"}))
            await asyncio.to_thread(held.started.wait, 10)
            second = asyncio.ensure_future(client.post("/recommend", json={"user_id": "u4", "k": 3, "mode": "bigrec"}))
            await _until(lambda: runner.queue_depth() == 1)
            assert (await client.post("/interactions", json=_events("w", ["1", "2", "3", "4", "5"]))).status_code == 200
            await _until(lambda: runner.queue_depth() == 2)  # the encoder's call for w
            assert encoder.lag_s() == 0.0  # w was taken from the encoder's queue; nothing else waits
            assert (await client.post("/interactions", json=_events("v", ["6", "7", "8", "9"]))).status_code == 200
            await asyncio.sleep(0.05)
            assert encoder.lag_s() >= 0.05  # v waits in the encoder's queue behind w

            stopping = asyncio.ensure_future(state.stop())
            await _until(lambda: state.phase == "stopping")
            # no new work: readiness and the API answer 503, while the old work waits for the model
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == "not_ready" and "stopping" in r.json()["detail"]
            r = await client.post("/recommend", json={"user_id": "u1", "k": 3})
            assert r.status_code == 503 and r.json()["error"] == "not_ready"
            await asyncio.sleep(0.1)
            assert not first.done() and not second.done() and not stopping.done()

            held.gate.set()
            r1, r2 = await first, await second
            assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
            assert [x["item_id"] for x in r1.json()["items"]] == _bigrec_items(world, comp, "u2", 3)
            assert [x["item_id"] for x in r2.json()["items"]] == _bigrec_items(world, comp, "u4", 3)
            await asyncio.wait_for(stopping, 30)

            # the encoder's queue was drained before the runner closed: every event of w and v has its vector
            for user, n in (("w", 5), ("v", 4)):
                assert set(memory_store.get_user_state(user, fp).vectors) == {f"{user}{j}" for j in range(n)}
            assert encoder.lag_s() == 0.0 and runner.queue_depth() == 0
            assert runner.calls == 4  # u2, u4, w's windows, v's windows
            with pytest.raises(RunnerClosed):
                await runner.encode([(1, 2, 3)])
            await state.stop()  # idempotent (the lifespan exit calls it again too)


async def test_shutdown_grace_bounds_the_wait(world, comps, memory_store, redis_url, tmp_path):
    settings = _settings(redis_url, tmp_path, shutdown_grace_s=0.5)
    app = create_app(settings, components=comps["learned"])
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://automr") as client:
            state = app.state.automr
            await state.wait_ready(30)
            runner = state.runner
            held = Held(runner.recommenders["none"])
            first = asyncio.ensure_future(client.post("/recommend", json={"user_id": "u2", "k": 3, "mode": "bigrec"}))
            await asyncio.to_thread(held.started.wait, 10)
            second = asyncio.ensure_future(client.post("/recommend", json={"user_id": "u4", "k": 3, "mode": "bigrec"}))
            await _until(lambda: runner.queue_depth() == 1)
            t0 = time.monotonic()
            await state.stop()
            assert 0.5 <= time.monotonic() - t0 < 5.0  # waited the grace, not for the held model call
            r2 = await second
            assert r2.status_code == 503 and r2.json()["error"] == "shutting_down"
            assert r2.headers["retry-after"] == "1"
            held.gate.set()  # the model call in flight cannot be interrupted; it still answers
            r1 = await first
            assert r1.status_code == 200 and [x["item_id"] for x in r1.json()["items"]] == _bigrec_items(
                world, comps["learned"], "u2", 3)
