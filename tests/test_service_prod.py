"""Production layers of the service: API key, body limit, request id, structured logs, /metrics,
/version, 429 under a full model queue. Real Redis, the tiny model and world of tests/test_service.py.

Counts in /metrics are checked against the requests each test makes (a fresh app, so a fresh
registry, per test); the model's batch sizes against the calls the test forces by holding the
model thread on an event.
"""
from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import json
import math
import platform
import re
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

from service.components import Components
from service.modes import MODE_RECOMMENDERS
from service.errors import retry_after
from service.settings import Settings
from tests.conftest import build_tiny_tokenizer
from tests.redis_fixtures import memory_store, redis_server, redis_url  # noqa: F401
from tests.test_service import K, USERS, _assert_error, _pipeline, _settings, prepared_world, serve

pytestmark = pytest.mark.anyio
HEX32 = re.compile(r"[0-9a-f]{32}")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return prepared_world(tmp_path_factory.mktemp("service_prod"))


@pytest.fixture(scope="module")
def comp(world):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    p = _pipeline(world["ds"], build_tiny_tokenizer(), cut=2, retriever=True)
    yield Components.from_dataset(world["ds"], p, model_version="tiny-prod")
    torch.set_num_threads(before)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0.0 when absent, as Prometheus reads it)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


class ModelGate:
    """Holds the model thread inside the recommender ``key``'s next calls until ``release``."""

    def __init__(self, state, key: str = "none"):
        self.rec = state.runner.recommenders[key]
        self.entered, self.released = threading.Event(), threading.Event()
        for name in self.METHODS:  # whole calls, or the prefill of step-wise (continuous) batching
            setattr(self.rec, name, self._held(getattr(self.rec, name)))

    METHODS = ("recommend", "begin")

    def _held(self, orig):
        def held(*args, **kwargs):
            self.entered.set()
            assert self.released.wait(30), "the test never released the model"
            return orig(*args, **kwargs)

        return held

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 20), "the model call never started"

    def release(self) -> None:
        self.released.set()
        for name in self.METHODS:
            delattr(self.rec, name)  # back to the class's methods


async def until(cond, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# ---- API key ------------------------------------------------------------------------------------------


async def test_api_key_missing_wrong_right(world, comp, memory_store, redis_url, tmp_path):
    key = "s3cret-key"
    ok = {"Authorization": f"Bearer {key}"}
    async with serve(_settings(redis_url, tmp_path, api_key=key), comp) as (client, state):
        # health probes and the scrape stay open
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200

        body = {"user_id": "nobody", "k": 3}
        r = await client.post("/recommend", json=body)
        b = _assert_error(r, 401, "unauthorized")
        assert "Authorization" in b["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert HEX32.fullmatch(r.headers["x-request-id"])
        r = await client.post("/recommend", json=body, headers={"Authorization": "Bearer wrong"})
        _assert_error(r, 401, "unauthorized")
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        _assert_error(await client.post("/recommend", json=body, headers={"Authorization": f"Basic {key}"}),
                      401, "unauthorized")
        _assert_error(await client.post("/recommend", json=body, headers={"Authorization": f"Bearer {key}x"}),
                      401, "unauthorized")
        r = await client.post("/recommend", json=body, headers=ok)
        assert r.status_code == 200 and r.json()["fallback"] == "popularity" and len(r.json()["items"]) == 3

        # every other endpoint is protected, the docs included; nothing happens without the key
        for method, path in (("GET", "/version"), ("GET", "/openapi.json"), ("GET", "/docs"),
                             ("GET", "/users/u5/history"), ("DELETE", "/users/u5"), ("GET", "/nothing")):
            _assert_error(await client.request(method, path), 401, "unauthorized")
        _assert_error(await client.post("/interactions", content=b"x" * 5000), 401, "unauthorized")  # before 413
        r = await client.get("/users/u5/history", headers=ok)
        assert r.status_code == 200 and len(r.json()["events"]) == USERS["u5"]  # the DELETE did not run

        schema = (await client.get("/openapi.json", headers=ok)).json()
        assert schema["components"]["securitySchemes"]["bearerAuth"] == {
            "type": "http", "scheme": "bearer", "description": "AUTOMR_API_KEY"}
        assert schema["paths"]["/recommend"]["post"]["security"] == [{"bearerAuth": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]
        for status in ("401", "413", "429"):
            assert status in schema["paths"]["/recommend"]["post"]["responses"]

        text = (await client.get("/metrics")).text
        assert metric(text, "automr_http_requests_total", endpoint="/recommend", method="POST", status="401") == 4
        assert metric(text, "automr_http_requests_total", endpoint="/recommend", method="POST", status="200") == 1
        assert metric(text, "automr_http_errors_total", endpoint="/users/{user_id}", error="unauthorized") == 1


async def test_no_api_key_means_open(world, comp, memory_store, redis_url, tmp_path):
    async with serve(_settings(redis_url, tmp_path, seed_store=False), comp) as (client, _):
        assert (await client.get("/version")).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert "securitySchemes" not in schema.get("components", {})
        assert "security" not in schema["paths"]["/recommend"]["post"]


# ---- body limit ---------------------------------------------------------------------------------------


def _events_body(user: str, n: int, size: int) -> bytes:
    """A valid /interactions body of exactly ``size`` bytes (JSON padded with trailing spaces)."""
    body = json.dumps({"events": [{"user_id": user, "item_id": str(1 + j), "timestamp": 100 + j, "event_id": f"b{j}"}
                                  for j in range(n)]}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def test_body_limit_413(world, comp, memory_store, redis_url, tmp_path):
    limit = 1024
    headers = {"content-type": "application/json"}
    async with serve(_settings(redis_url, tmp_path, max_body_bytes=limit, seed_store=False), comp) as (client, _):
        r = await client.post("/interactions", content=_events_body("big", 3, limit + 1), headers=headers)
        _assert_error(r, 413, "body_too_large")
        assert str(limit) in r.json()["detail"] and HEX32.fullmatch(r.headers["x-request-id"])
        _assert_error(await client.get("/users/big/history"), 404, "unknown_user")  # nothing stored

        # chunked (no Content-Length): counted while read, same answer
        async def chunks():
            body = _events_body("big", 3, 3 * limit)
            for i in range(0, len(body), 500):
                yield body[i:i + 500]

        r = await client.post("/interactions", content=chunks(), headers=headers)
        assert "content-length" not in r.request.headers
        _assert_error(r, 413, "body_too_large")
        _assert_error(await client.get("/users/big/history"), 404, "unknown_user")

        # exactly at the limit: accepted, chunked or not
        r = await client.post("/interactions", content=_events_body("big", 3, limit), headers=headers)
        assert r.status_code == 200 and r.json()["added"] == 3

        async def small():
            yield _events_body("big2", 2, limit)

        r = await client.post("/interactions", content=small(), headers=headers)
        assert r.status_code == 200 and r.json()["added"] == 2
        text = (await client.get("/metrics")).text
        assert metric(text, "automr_http_errors_total", endpoint="/interactions", error="body_too_large") == 2


# ---- request id and logs ------------------------------------------------------------------------------


async def test_request_id_echoed_generated_and_logged(world, comp, memory_store, redis_url, tmp_path, capsys):
    async with serve(_settings(redis_url, tmp_path, log_json=True), comp) as (client, state):
        capsys.readouterr()
        r = await client.get("/users/u4/history", headers={"X-Request-ID": "req-abc.123"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc.123"
        ids = set()
        for bad in (None, "x" * 129, "has space", "tab\there", ""):
            r = await client.get("/users/u4/history", headers={} if bad is None else {"X-Request-ID": bad})
            assert HEX32.fullmatch(r.headers["x-request-id"]), (bad, r.headers["x-request-id"])
            ids.add(r.headers["x-request-id"])
        assert len(ids) == 5  # a new one each time
        assert (await client.get("/healthz", headers={"X-Request-ID": "x" * 128})).headers["x-request-id"] == "x" * 128

        # on every error response, the middleware's last-resort 500 included
        for r in (await client.get("/nothing", headers={"X-Request-ID": "e1"}),
                  await client.post("/recommend", json={"k": 0}, headers={"X-Request-ID": "e2"})):
            assert r.status_code in (404, 422) and r.headers["x-request-id"] in ("e1", "e2")

        async def broken(user_id):
            raise RuntimeError("boom")

        state.users.history = broken
        r = await client.get("/users/u4/history", headers={"X-Request-ID": "boom-1"})
        _assert_error(r, 500, "internal_error")
        assert r.headers["x-request-id"] == "boom-1" and "RuntimeError" in r.json()["detail"]
        del state.users.history
        err = capsys.readouterr().err

    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [x for x in lines if x["logger"] == "automr.access"]
    first = next(x for x in access if x["request_id"] == "req-abc.123")
    assert first["method"] == "GET" and first["path"] == "/users/u4/history" and first["status"] == 200
    assert first["endpoint"] == "/users/{user_id}/history" and first["duration_ms"] > 0 and first["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert len(access) == 10  # one line per request
    crash = next(x for x in lines if x["logger"] == "service.observability")
    assert crash["request_id"] == "boom-1" and crash["level"] == "error" and "RuntimeError: boom" in crash["exc"]
    assert next(x for x in access if x["request_id"] == "boom-1")["status"] == 500


# ---- /metrics -----------------------------------------------------------------------------------------


async def test_metrics_request_counts_and_latency(world, comp, memory_store, redis_url, tmp_path):
    # greedy ranking: the step-wise path whose prefill metrics this reads (beam calls run whole)
    async with serve(_settings(redis_url, tmp_path, constrained=False, num_beams=1), comp) as (client, _):
        for u in ("nobody", "ghost", "u1"):
            assert (await client.post("/recommend", json={"user_id": u, "k": 2, "mode": "bigrec"})).status_code == 200
        _assert_error(await client.post("/recommend", json={"user_id": "u1", "k": 0}), 422, "validation_error")
        for u in ("u2", "u3"):
            assert (await client.get(f"/users/{u}/history")).status_code == 200
        _assert_error(await client.get("/users/none/history"), 404, "unknown_user")
        _assert_error(await client.get("/no/such/route"), 404, "not_found")
        _assert_error(await client.get("/recommend"), 405, "method_not_allowed")
        r = await client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text

    req = lambda ep, m, s: metric(text, "automr_http_requests_total", endpoint=ep, method=m, status=s)  # noqa: E731
    assert req("/recommend", "POST", "200") == 3
    assert req("/recommend", "POST", "422") == 1
    assert req("/users/{user_id}/history", "GET", "200") == 2  # the template, not the user ids
    assert req("/users/{user_id}/history", "GET", "404") == 1
    assert req("unmatched", "GET", "404") == 1
    assert req("/recommend", "GET", "405") == 1
    assert metric(text, "automr_http_request_duration_seconds_count", endpoint="/recommend", method="POST") == 4
    assert metric(text, "automr_http_request_duration_seconds_bucket", endpoint="/recommend", method="POST",
                  le="+Inf") == 4
    assert metric(text, "automr_http_request_duration_seconds_sum", endpoint="/recommend", method="POST") > 0
    assert metric(text, "automr_http_errors_total", endpoint="/users/{user_id}/history", error="unknown_user") == 1
    assert metric(text, "automr_http_errors_total", endpoint="/recommend", error="validation_error") == 1
    # the one model call (u1, bigrec; the two unknown users got the popularity fallback)
    assert metric(text, "automr_model_batch_size_count", kind="recommend") == 1
    assert metric(text, "automr_model_batch_size_sum", kind="recommend") == 1
    assert metric(text, "automr_model_call_seconds_count", kind="recommend") == 1
    assert metric(text, "automr_model_batch_size_sum", kind="prefill_chunk") == 1  # one forward of its one row
    # its one answer was grounded through the memo, one way or another
    assert sum(metric(text, "automr_ground_memo_texts", source=src) for src in ("catalogue", "recent", "embedded")) == 1
    assert metric(text, "automr_ready") == 1
    # no full-history request: no background prefill time
    assert metric(text, "automr_background_prefill_seconds", state="beside_others") == 0
    assert metric(text, "automr_background_prefill_seconds", state="alone") == 0
    assert metric(text, "automr_http_requests_in_flight") == 1  # the scrape itself
    assert not any(u in text for u in ('"u2"', '"u3"', "ghost"))  # no user ids in labels


async def test_metrics_background_prefill_time(world, comp, memory_store, redis_url, tmp_path):
    """A full-history request (a background mode by default) alone: its prefill time counts as alone."""
    # greedy ranking: the step-wise path whose prefill metrics this reads (beam calls run whole)
    async with serve(_settings(redis_url, tmp_path, constrained=False, num_beams=1), comp) as (client, _):
        r = await client.post("/recommend", json={"user_id": "u1", "k": 2, "mode": "full-history"})
        assert r.status_code == 200 and r.json()["mode"] == "full-history"
        text = (await client.get("/metrics")).text
    assert metric(text, "automr_background_prefill_seconds", state="alone") > 0
    assert metric(text, "automr_background_prefill_seconds", state="beside_others") == 0


async def test_metrics_redis_errors(world, comp, tmp_path):
    from memory_store import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", appendfsync="everysec").start()
    try:
        async with serve(_settings(server.url, tmp_path, redis_timeout_s=1.0), comp) as (client, _):
            assert (await client.get("/users/u2/history")).status_code == 200
            server.stop()
            _assert_error(await client.get("/users/u2/history"), 503, "store_unavailable")
            _assert_error(await client.delete("/users/u2"), 503, "store_unavailable")
            text = (await client.get("/metrics")).text
            assert metric(text, "automr_redis_errors_total") == 2
            assert metric(text, "automr_http_errors_total", endpoint="/users/{user_id}", error="store_unavailable") == 1
    finally:
        server.stop()


async def test_metrics_queue_depth_batches_and_encoder_lag(world, comp, memory_store, redis_url, tmp_path):
    # each user's own items, so that no two windows are the same (the runner encodes a window once per call)
    ev = lambda u, j: {"user_id": u, "item_id": str(2 * int(u[1:]) + j), "timestamp": 100 + j,  # noqa: E731
                       "event_id": f"{u}-{j}"}
    settings = _settings(redis_url, tmp_path, encode_on_write=True, batch_max_wait_ms=0)
    async with serve(settings, comp) as (client, state):
        gate = ModelGate(state)
        try:
            held = asyncio.create_task(client.post("/recommend", json={"user_id": "u1", "mode": "bigrec"}))
            await gate.wait_entered()
            # w1's two new events: the encoder takes w1 and its encode call waits behind the held model
            assert (await client.post("/interactions", json={"events": [ev("w1", 0), ev("w1", 1)]})).status_code == 200
            await until(lambda: state.runner.queue_depth() == 1 and state.encoder.queue.qsize() == 0)
            # w2, w3 (two events each) wait in the encoder's queue
            for u in ("w2", "w3"):
                assert (await client.post("/interactions", json={"events": [ev(u, 0), ev(u, 1)]})).status_code == 200
            await asyncio.sleep(0.05)
            text = (await client.get("/metrics")).text
            assert metric(text, "automr_model_queue_depth") == 1
            assert metric(text, "automr_encoder_queue_size") == 2
            assert 0.05 <= metric(text, "automr_encoder_lag_seconds") < 20
        finally:
            gate.release()
        assert (await held).status_code == 200
        await asyncio.wait_for(state.encoder.idle(), 20)
        text = (await client.get("/metrics")).text
    assert metric(text, "automr_model_queue_depth") == 0
    assert metric(text, "automr_encoder_queue_size") == 0 and metric(text, "automr_encoder_lag_seconds") == 0
    # encode calls: w1's 2 windows, then w2 + w3 together (4 windows); recommend: the held call
    assert metric(text, "automr_model_batch_size_count", kind="encode") == 2
    assert metric(text, "automr_model_batch_size_sum", kind="encode") == 6
    assert metric(text, "automr_model_batch_size_bucket", kind="encode", le="2.0") == 1
    assert metric(text, "automr_model_batch_size_bucket", kind="encode", le="4.0") == 2
    assert metric(text, "automr_model_batch_size_count", kind="recommend") == 1
    assert metric(text, "automr_model_call_seconds_count", kind="encode") == 2


# ---- 429 ----------------------------------------------------------------------------------------------


def test_retry_after_header_value():
    assert [retry_after(x) for x in (0.0, 0.2, 1.0, 1.01, 2.9, None, math.nan, math.inf, "junk")] == [
        "1", "1", "1", "2", "3", "1", "1", "1", "1"]


async def test_429_when_the_model_queue_is_full(world, comp, memory_store, redis_url, tmp_path):
    settings = _settings(redis_url, tmp_path, max_queue=1, batch_max_size=1, batch_max_wait_ms=0)
    body = {"user_id": "u1", "k": 2, "mode": "bigrec"}
    async with serve(settings, comp) as (client, state):
        gate = ModelGate(state)
        try:
            running = asyncio.create_task(client.post("/recommend", json=body))
            await gate.wait_entered()  # in the model
            waiting = asyncio.create_task(client.post("/recommend", json=body))
            await until(lambda: state.runner.queue_depth() == 1)  # in the queue: it is full
            r = await client.post("/recommend", json=body, headers={"X-Request-ID": "over"})
            b = _assert_error(r, 429, "overloaded")
            assert "AUTOMR_MAX_QUEUE" in b["detail"] and r.headers["x-request-id"] == "over"
            assert re.fullmatch(r"[1-9]\d*", r.headers["retry-after"])
            # the memory-free endpoints still answer
            assert (await client.get("/users/u2/history")).status_code == 200
            assert (await client.post("/recommend", json={"user_id": "nobody"})).status_code == 200  # popularity
            text = (await client.get("/metrics")).text
            assert metric(text, "automr_model_queue_depth") == 1
        finally:
            gate.release()
        first, second = await running, await waiting
        assert first.status_code == second.status_code == 200 and first.json()["items"] == second.json()["items"]
        assert (await client.post("/recommend", json=body)).status_code == 200  # room again
        text = (await client.get("/metrics")).text
    assert metric(text, "automr_http_requests_total", endpoint="/recommend", method="POST", status="429") == 1
    assert metric(text, "automr_http_errors_total", endpoint="/recommend", error="overloaded") == 1
    assert metric(text, "automr_model_batch_size_count", kind="recommend") == 3  # max batch 1: one call each


# ---- /version -----------------------------------------------------------------------------------------


async def test_version(world, comp, memory_store, redis_url, tmp_path, monkeypatch):
    gate = threading.Event()

    def slow():
        assert gate.wait(20)
        return comp

    monkeypatch.delenv("AUTOMR_GIT_SHA", raising=False)
    repo = Path(__file__).resolve().parents[1]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    async with serve(_settings(redis_url, tmp_path), slow, wait=False) as (client, state):
        v = (await client.get("/version")).json()  # before the model is loaded
        assert v["ready"] is False and v["model_version"] is None
        assert v["settings"]["cut_layer"] == 20 and v["settings"]["slot_policy"] is None  # configured values
        gate.set()
        await state.wait_ready(20)
        served_by = {mode: state.users.choose(mode).recommender for mode in MODE_RECOMMENDERS}
        v = (await client.get("/version")).json()
        monkeypatch.setenv("AUTOMR_GIT_SHA", "0123abc")
        assert (await client.get("/version")).json()["git_sha"] == "0123abc"
    assert v["version"] == importlib.metadata.version("automr") == "0.1.0"
    assert v["model_version"] == "tiny-prod" and v["ready"] is True and v["dataset"] == world["ds"].name
    assert v["git_sha"] == (git.stdout.strip() if git.returncode == 0 else None)
    assert v["python"] == platform.python_version()
    assert v["torch"] == torch.__version__ and v["transformers"] == transformers.__version__
    # the thread pools as torch reports them, beside the CPU budget (service/cpu_budget.py)
    t = v["threads"]
    assert t["intra_op"] == torch.get_num_threads() and t["inter_op"] == torch.get_num_interop_threads()
    assert t["source"] == "cpu budget" and 1 <= t["planned"] == t["cpu_budget"]["cpus"] <= t["cpu_budget"]["affinity"]
    assert v["process"]["malloc"] in ("glibc", "jemalloc", "tcmalloc")
    s = v["settings"]
    # the loaded model's values (the injected tiny model is cut at L = 2, float32, K = 3)
    assert (s["cut_layer"], s["dtype"], s["slot_policy"], s["memory_element"], s["k_short"]) == (
        2, "float32", "learned", "window", K)
    assert s["memory_fingerprint"] == comp.pipeline.memory_fingerprint()
    assert s["api_key_required"] is False and s["max_queue"] == 64
    assert (s["draft_tokens"], s["draft_max_rows"], s["draft_learn"]) == (8, 2, 50_000)
    # the served pipeline's draft table learns from answers, within the configured bound
    assert comp.pipeline.drafter.max_recent == 50_000
    # every recommender grounds through the pipeline's one memo (catalogue rows + 10,000 recent answers)
    assert (s["ground_memo"], s["ground_memo_recent"]) == (True, 10_000)
    assert s["prefill_max_tokens"] == 2048 and "prefill_chunk_tokens" not in s
    assert comp.pipeline.ground_memo.max_recent == 10_000
    assert all(r._ground_memo is comp.pipeline.ground_memo for r in state.runner.recommenders.values())
    # full-history requests yield to the others (the runner's priority between modes)
    assert (s["background_modes"], s["background_share"], s["background_chunk_tokens"]) == (["full-history"], 0.25, 256)
    assert s["keep_alive_s"] == 75.0
    assert state.runner.background == {"full-history"}
    # the mode -> recommender keys table the priority reads agrees with what serves each mode
    assert all(served_by[mode] in keys for mode, keys in MODE_RECOMMENDERS.items())


async def test_gc_freeze_at_ready(world, comp, memory_store, redis_url, tmp_path):
    """``AUTOMR_GC_FREEZE`` (on for a served process; the tests' conftest turns it off): once ready,
    the loaded objects leave the collector's generations, so a full collection does not walk them."""
    assert Settings().gc_freeze is False  # conftest: apps in one test process must not freeze each other
    gc.unfreeze()
    try:
        async with serve(_settings(redis_url, tmp_path, gc_freeze=True), comp) as (client, state):
            frozen = gc.get_freeze_count()
            assert (await client.post("/recommend", json={"user_id": "u1"})).status_code == 200
        assert frozen > 1000
    finally:
        gc.unfreeze()
    async with serve(_settings(redis_url, tmp_path), comp) as (client, state):
        assert gc.get_freeze_count() == 0
