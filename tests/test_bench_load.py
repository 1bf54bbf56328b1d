"""bench/bench_load.py end to end: a real uvicorn server on a free port running the real app (tiny
model, real Redis), and a stub app behind a real server for the 429/503/refused accounting."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from bench.bench_load import BenchConfig, main, percentile, run_bench, users_from_dataset
from memory_store.embedded import free_tcp_port
from service.app import create_app
from service.settings import Settings
from tests.redis_fixtures import memory_store, redis_server, redis_url  # noqa: F401
from tests.test_redis_recovery import build_tiny_components


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    yield build_tiny_components(root, n_users=6, per_user=14), root / "prepared"
    torch.set_num_threads(before)


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app) -> None:
        self.port = free_tcp_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_percentile_nearest_rank():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(xs, q) for q in (0.0, 0.2, 0.5, 0.99, 1.0)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    assert percentile(list(range(1, 101)), 0.99) == 99 and percentile(list(range(1, 101)), 0.5) == 50


def test_bench_against_a_real_server_every_cell_and_cleanup(tiny, memory_store, redis_url, tmp_path):
    comps, data_dir = tiny
    users = users_from_dataset(data_dir)
    assert users == [f"u{j}" for j in range(6)]  # 14 interactions each (> 10)
    settings = Settings(redis_url=redis_url, home=tmp_path, max_new_tokens=4, encode_on_write=True)
    out = tmp_path / "load.json"
    with ThreadedServer(create_app(settings, components=comps)) as url:
        report = main(["--url", url, "--data", str(data_dir), "--concurrency", "1,4", "--requests", "4",
                       "--warmup", "1", "--append-concurrency", "1,4", "--append-requests", "8",
                       "--bench-users", "3", "--wait-ready", "30", "--api-key", "s3cret", "--mixed", "1,1",
                       "--json", str(out)])
        keys_after = set(memory_store.client.keys("*"))
        seeded = {u: memory_store.history(u) for u in users}
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert "s3cret" not in out.read_text() and report["config"]["api_key_set"] is True
    i = report["command"].index("--api-key")
    assert report["command"][i + 1] == "***"
    assert report["machine"]["cpu_count"] == os.cpu_count() and report["machine"]["platform"]
    assert report["server"]["status"] == "ready" and report["config"]["n_users"] == 6
    # the dtype the injected model runs in (not the settings' CPU-dependent default)
    assert report["version"]["settings"]["dtype"] == str(comps.pipeline.lm.dtype).removeprefix("torch.")
    assert "native_bf16" in report["machine"]["cpu"]

    assert report["prime"]["ok"] == 6 and report["prime"]["anomalies"] == {}  # one automr request per user
    assert set(report["recommend"]) == {"automr", "bigrec", "full-history"}
    for mode, cells in report["recommend"].items():
        assert set(cells) == {"1", "4"}
        for c, s in cells.items():
            assert (s["requests"], s["ok"], s["status_429"], s["errors"], s["exceptions"], s["anomalies"]) == \
                (4, 4, 0, {}, {}, {}), (mode, c, s)
            assert 0 < s["p50_ms"] <= s["p99_ms"] and s["throughput_rps"] > 0 and s["concurrency"] == int(c)
            assert s["throughput_rps"] == pytest.approx(4 / s["wall_s"], rel=0.01)
    assert set(report["append"]) == {"1", "4"}
    for s in report["append"].values():
        assert (s["requests"], s["ok"], s["anomalies"], s["errors"]) == (8, 8, {}, {})  # each added exactly 1 event
    # the mixed cell: 4 automr answers while full-history requests ran beside them (and stopped after)
    mixed = report["mixed"]
    assert (mixed["automr"]["ok"], mixed["automr"]["requests"], mixed["automr"]["anomalies"]) == (4, 4, {})
    assert mixed["full-history"]["ok"] >= 1 and mixed["full-history"]["anomalies"] == {}
    assert mixed["full-history"]["requests"] == mixed["full-history"]["ok"]
    r = report["ratios"]
    assert set(r) == {"automr/bigrec p50", "automr/full-history p50", "throughput c4/c1", "append throughput c4/c1",
                      "mixed automr / automr p50", "mixed automr / automr p99"}
    assert r["mixed automr / automr p50"] == pytest.approx(
        mixed["automr"]["p50_ms"] / report["recommend"]["automr"]["1"]["p50_ms"], rel=1e-3)
    for c in ("1", "4"):
        assert r["automr/bigrec p50"][c] == pytest.approx(
            report["recommend"]["automr"][c]["p50_ms"] / report["recommend"]["bigrec"][c]["p50_ms"], rel=1e-3)
    assert set(r["throughput c4/c1"]) == {"automr", "bigrec", "full-history"}

    # the bench users are gone, the dataset users untouched (their memory vectors may have been cached)
    prefix = report["cleanup"]["prefix"]
    assert report["cleanup"] == {"bench_users": 3, "deleted": 3, "prefix": prefix}
    assert not [k for k in keys_after if prefix.encode() in k]
    for u in users:
        assert len(seeded[u]) == 14


def _stub_app() -> FastAPI:
    """/recommend: 200 for most users, 429 (Retry-After 0) for 'u429', 503 for 'u503'."""
    app = FastAPI()

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    @app.post("/recommend")
    async def recommend(request: Request):
        body = await request.json()
        if body["user_id"] == "u429":
            return JSONResponse({"error": "overloaded", "detail": "queue full"}, 429, headers={"Retry-After": "0"})
        if body["user_id"] == "u503":
            return JSONResponse({"error": "store_unavailable", "detail": "down"}, 503)
        return {"mode": body["mode"], "fallback": None}

    @app.post("/interactions")
    async def interactions():
        return {"added": 1}

    @app.delete("/users/{user_id}")
    async def delete(user_id: str):
        return Response(status_code=204)

    return app


def test_429s_and_errors_are_counted_not_fatal():
    cfg = BenchConfig(users=["u1", "u429", "u503"], items=["1"], concurrency=(1, 2), requests=6, warmup=0,
                      append_concurrency=(1,), append_requests=3, bench_users=2)
    with ThreadedServer(_stub_app()) as url:
        cfg.url = url
        res = asyncio.run(run_bench(cfg))
    assert res["prime"]["ok"] == 1 and res["prime"]["status_429"] == 1 and res["prime"]["errors"] == {"503": 1}
    for mode in ("automr", "bigrec", "full-history"):
        for c in ("1", "2"):
            s = res["recommend"][mode][c]
            assert (s["ok"], s["status_429"], s["errors"], s["anomalies"]) == (2, 2, {"503": 2}, {}), s
            # wall_s is rounded to the microsecond, so the ratio holds to well under 1% even for a ~2 ms cell
            assert s["throughput_rps"] == pytest.approx(2 / s["wall_s"], rel=0.01)
    assert res["append"]["1"]["ok"] == 3 and res["cleanup"]["deleted"] == 2


def test_a_refused_connection_is_counted_as_an_exception():
    port = free_tcp_port()  # nothing listens there

    async def go():
        from bench.bench_load import HttpClient, run_cell
        client = HttpClient(f"http://127.0.0.1:{port}", timeout_s=5)
        try:
            return await run_cell(client, 2, 3, lambda i: ("GET", "/healthz", None))
        finally:
            await client.aclose()

    cell = asyncio.run(go())
    assert cell.latencies_s == [] and sum(cell.exceptions.values()) == 3 and not cell.statuses


def test_soak_mixed_load_bad_input_retries_and_no_acknowledged_event_lost(tiny, memory_store, redis_url, tmp_path):
    """bench/soak.py for a few seconds against the real app: every window sampled, bad appends
    rejected with 4xx, retries counted as duplicates, every acknowledged event stored exactly once."""
    from bench.soak import main as soak_main

    comps, data_dir = tiny
    settings = Settings(redis_url=redis_url, home=tmp_path, max_new_tokens=4, encode_on_write=True)
    out = tmp_path / "soak"
    with ThreadedServer(create_app(settings, components=comps)) as url:
        s = soak_main(["--url", url, "--data", str(data_dir), "--minutes", "0.1", "--interval", "2",
                       "--concurrency", "4", "--ratio", "1", "--bad-every", "3", "--dup-every", "2",
                       "--wait-ready", "30", "--pid", str(os.getpid()), "--out", str(out)])
    assert s["answered"] > 10 and (s["errors"], s["http_5xx"], s["unexpected"]) == (0, 0, {})
    assert s["bad_input_statuses"] and all(400 <= int(k) < 500 for k in s["bad_input_statuses"])
    assert s["acknowledged_events"] > 0 and (s["missing"], s["stored_twice"]) == (0, 0)
    assert s["trimmed_by_the_window"] < s["acknowledged_events"]
    assert s["retries_not_counted_as_duplicate"] == 0 and s["rss_mb_end"] > 0
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("t_s,rss_mb,rss_peak_mb,") and len(rows) - 1 >= 3  # a sample every 2 s for 6 s
    # the peak of each window (VmHWM since the previous sample) is at least the RSS sampled in it
    assert all(float(r.split(",")[2]) >= float(r.split(",")[1]) > 0 for r in rows[1:])
    assert s["rss_peak_mb_max"] >= s["rss_peak_mb_end"] > 0 and s["req_per_s_between_answers"] > 0
    assert out.with_suffix(".png").stat().st_size > 0 and json.loads(out.with_suffix(".json").read_text())["minutes"] == 0.1
