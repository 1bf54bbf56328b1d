"""Redis failures under the real app: killed, hung, restarted; nothing acknowledged is ever lost.

The app is the real one (``create_app``) on a tiny random Llama, a tiny prepared dataset and a real
redis-server with ``appendfsync always``; no fakes. An event counts as acknowledged when
``POST /interactions`` answered 200 for it; after a crash and a restart every acknowledged event must
be in the user's history, and nothing that was never sent may be.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from memory_store import EmbeddedRedis, EmbeddedSupervisor, Event, MemoryStore, StoreUnavailable
from memory_store.embedded import pid_alive
from model.baselines.popularity import popularity_counts
from model.data.prepared import prepare
from model.data.protocol import ProtocolConfig
from model.grounding import CatalogueIndex
from model.llm import SplitLM
from model.pipeline import Pipeline
from model.prompts import PromptBuilder
from model.retriever import Retriever, RetrieverConfig
from service.app import create_app
from service.components import Components
from service.settings import Settings
from tests.conftest import build_tiny_lm, build_tiny_tokenizer, write_tiny_csv_dataset
from tests.redis_fixtures import crashable_redis, kill9  # noqa: F401

pytestmark = pytest.mark.anyio
K = 3
TIMEOUT_S = 1.0  # AUTOMR_REDIS_TIMEOUT_S of these apps: no answer may take longer than this + slack



# ---- a tiny world: prepared dataset + tiny pipeline with a retriever (automr, bigrec, full-history) ----

def build_tiny_components(root: Path, n_users: int = 6, per_user: int = 14, seed: int = 3) -> Components:
    """Components over a tiny CSV dataset (users ``u0..``): a 4-layer random Llama cut at L=2, a
    random retriever, grounding over the catalogue; every request mode is available."""
    write_tiny_csv_dataset(root / "raw", n_users=n_users, per_user=per_user, seed=seed)
    ds = prepare("csv", root / "raw", root / "prepared",
                 ProtocolConfig(min_item=1, min_user=1, k_short=K, max_history=100), domain="movie", progress=False)
    tok = build_tiny_tokenizer()
    lm = SplitLM.from_model(build_tiny_lm(len(tok), seed=0), tok, cut=2)
    lm.snapshot_base_upper()
    titles = ds.catalogue.titles
    index = CatalogueIndex.build(titles, lambda t: lm.embed_final(list(t)).numpy(), progress=False)
    torch.manual_seed(1)
    retriever = Retriever(RetrieverConfig(hidden_size=lm.hidden_size, mlp_hidden=16)).eval()
    pipeline = Pipeline(lm=lm, builder=PromptBuilder.for_model(lm, domain=ds.domain, n_slots=1), titles=titles,
                        index=index, retriever=retriever, k_short=K,
                        popularity=popularity_counts(ds.split("train"), len(titles)))
    return Components.from_dataset(ds, pipeline, model_version="tiny-recovery")


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_components(tmp_path_factory.mktemp("recovery"))
    torch.set_num_threads(before)


def _settings(tmp_path: Path, redis_url: str | None, **kw) -> Settings:
    base = dict(redis_url=redis_url, home=tmp_path / "home", max_new_tokens=4, encode_on_write=False,
                seed_store=True, redis_timeout_s=TIMEOUT_S)
    return Settings(**{**base, **kw})


@asynccontextmanager
async def serve(settings: Settings, components: Components):
    app = create_app(settings, components=components)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://automr") as client:
            await app.state.automr.wait_ready(30)
            yield client, app.state.automr


def _is_store_unavailable(r: httpx.Response) -> bool:
    if r.status_code != 503:
        return False
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == "store_unavailable" and body["detail"], body
    assert r.headers.get("retry-after") == "1"
    return True


# ---- writers: single-event POST /interactions in a loop, recording what was acknowledged ------------

@dataclass
class Writers:
    """``n`` concurrent writers; writer ``j`` sends events ``w<j>-<seq>`` of user ``w<j>.<seq // 40>`` (a
    new user every 40 events keeps every window under the cap of 100: nothing is trimmed)."""

    client: httpx.AsyncClient
    items: list[str]
    n: int = 4
    acked: dict[str, tuple[str, Event]] = field(default_factory=dict)  # event id -> (user, event)
    failed: dict[str, tuple[str, Event]] = field(default_factory=dict)  # 503: may or may not be stored
    statuses: list[int] = field(default_factory=list)
    slowest_503_s: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(j)) for j in range(self.n)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def count(self, status: int) -> int:
        return sum(1 for s in self.statuses if s == status)

    async def _run(self, j: int) -> None:
        seq = 0
        while not self._stop.is_set():
            user = f"w{j}.{seq // 40}"
            ev = Event(item_id=self.items[(j + seq) % len(self.items)], timestamp=1_000 + seq, event_id=f"w{j}-{seq}")
            t0 = time.perf_counter()
            r = await self.client.post("/interactions", json={"events": [
                {"user_id": user, "item_id": ev.item_id, "timestamp": ev.timestamp, "event_id": ev.event_id}]})
            took = time.perf_counter() - t0
            self.statuses.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["added"] + r.json()["duplicates"] == 1, r.text
                self.acked[ev.event_id] = (user, ev)
            else:
                assert _is_store_unavailable(r), r.text
                self.slowest_503_s = max(self.slowest_503_s, took)
                self.failed[ev.event_id] = (user, ev)
                await asyncio.sleep(0.01)
            seq += 1

    async def wait(self, cond, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out; statuses so far {self.statuses[-20:]}"
            await asyncio.sleep(0.01)

    async def check_nothing_acknowledged_was_lost(self) -> None:
        """Every acknowledged event is stored, in order; nothing stored was never sent."""
        users = {u for u, _ in self.acked.values()} | {u for u, _ in self.failed.values()}
        sent = {**self.failed, **self.acked}
        for u in sorted(users):
            r = await self.client.get(f"/users/{u}/history")
            assert r.status_code in (200, 404), r.text
            stored = {e["event_id"]: e for e in r.json()["events"]} if r.status_code == 200 else {}
            acked = {eid for eid, (uu, _) in self.acked.items() if uu == u}
            assert acked <= set(stored), f"user {u}: acknowledged events lost: {sorted(acked - set(stored))}"
            assert set(stored) <= {eid for eid, (uu, _) in sent.items() if uu == u}
            for eid, e in stored.items():
                assert (e["item_id"], e["timestamp"]) == (sent[eid][1].item_id, sent[eid][1].timestamp)
            ts = [e["timestamp"] for e in r.json()["events"]] if stored else []
            assert ts == sorted(ts)


# ---- external Redis (REDIS_URL): killed, then brought back by someone else --------------------------

async def test_external_redis_killed_mid_run_503s_then_recovers_without_losing_acked_events(
        comps, crashable_redis, tmp_path):
    server = crashable_redis
    url, aof_dir = server.url, server.data_dir
    async with serve(_settings(tmp_path, url), comps) as (client, state):
        assert state.store.supervisor is None  # an external Redis is not restarted by the app
        seeded = (await client.get("/users/u1/history")).json()["events"]
        assert len(seeded) == 14
        w = Writers(client, list(comps.catalogue.item_ids))
        w.start()
        await w.wait(lambda: len(w.acked) >= 40)

        server.kill()  # SIGKILL mid-run, writers still sending
        await w.wait(lambda: w.count(503) >= 8)
        t0 = time.perf_counter()
        for r in (await client.post("/recommend", json={"user_id": "u1"}),
                  await client.post("/recommend", json={"user_id": "u1", "mode": "bigrec", "recent_items": ["1"]}),
                  await client.get("/users/u1/history"),
                  await client.delete("/users/u1")):
            assert _is_store_unavailable(r), r.text
        assert time.perf_counter() - t0 < TIMEOUT_S  # a refused connection fails at once
        assert (await client.get("/healthz")).status_code == 200  # the process stays up

        server.start()  # a new redis-server on the same port and AOF; the app is NOT restarted
        assert server.url == url and server.data_dir == aof_dir and server.owned
        acked_before_restart = len(w.acked)
        await w.wait(lambda: len(w.acked) >= acked_before_restart + 20)
        await w.stop()

        assert w.slowest_503_s < TIMEOUT_S + 0.5, w.slowest_503_s  # never a hang beyond the redis timeout
        assert w.count(200) + w.count(503) == len(w.statuses)  # only acks and store_unavailable
        await w.check_nothing_acknowledged_was_lost()
        assert (await client.get("/users/u1/history")).json()["events"] == seeded  # the seeded data survived
        r = await client.post("/recommend", json={"user_id": "u1", "mode": "automr", "k": 3})
        assert r.status_code == 200 and r.json()["fallback"] is None and len(r.json()["items"]) == 3
    check = MemoryStore.from_url(url)
    assert check.client.config_get("appendfsync") == {"appendfsync": "always"}
    check.close()


async def test_hung_redis_answers_503_within_the_timeout_then_fails_fast_then_recovers(
        comps, crashable_redis, tmp_path):
    server = crashable_redis
    async with serve(_settings(tmp_path, server.url), comps) as (client, state):
        assert (await client.get("/users/u2/history")).status_code == 200
        os.kill(server.pid, signal.SIGSTOP)  # alive, accepting connections, answering nothing
        try:
            t0 = time.perf_counter()
            assert _is_store_unavailable(await client.get("/users/u2/history"))
            waited = time.perf_counter() - t0
            assert TIMEOUT_S - 0.05 < waited < TIMEOUT_S + 0.75, waited  # one socket timeout, no retry of it
            t0 = time.perf_counter()
            r = await client.post("/recommend", json={"user_id": "u2"})
            assert _is_store_unavailable(r) and "failing fast" in r.json()["detail"], r.text
            assert time.perf_counter() - t0 < 0.2  # the breaker: no second wait for a hung server
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.sleep(state.store.breaker.cooldown_s + 0.05)
        assert (await client.get("/users/u2/history")).status_code == 200
        assert not state.store.breaker.is_open and state.store.breaker.opened == 1


# ---- the embedded server (no REDIS_URL): the store restarts it -------------------------------------

async def test_embedded_server_killed_is_restarted_by_the_store_no_503_no_loss(comps, tmp_path):
    async with serve(_settings(tmp_path, None), comps) as (client, state):
        server, sup = state.server, state.store.supervisor
        assert server is not None and server.owned and isinstance(sup, EmbeddedSupervisor)
        assert server.appendfsync == "always"
        url, old_pid = server.url, server.pid
        w = Writers(client, list(comps.catalogue.item_ids))
        w.start()
        await w.wait(lambda: len(w.acked) >= 40)
        kill9(old_pid)  # a crash: the app's EmbeddedRedis object still names the dead pid
        n_at_kill = len(w.statuses)
        await w.wait(lambda: len(w.statuses) >= n_at_kill + 40)
        await w.stop()

        assert sup.restarts == 1 and sup.failures == 0
        assert server.pid != old_pid and pid_alive(server.pid) and server.url == url and server.owned
        assert set(w.statuses) == {200}  # the failed calls were retried on the restarted server
        await w.check_nothing_acknowledged_was_lost()
        assert len((await client.get("/users/u3/history")).json()["events"]) == 14
        new_pid = server.pid
    assert not pid_alive(new_pid)  # the app stopped the server it restarted, and did not bring it back


@contextmanager
def _squat(port: int, timeout: float = 3.0):
    """Listen on ``port``. The dead server's sides of old connections (FIN-WAIT-2, TIME-WAIT) can
    refuse the bind for a moment even with SO_REUSEADDR: retry until they are gone."""
    deadline = time.monotonic() + timeout
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:
            try:
                sock.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        sock.listen()
        yield sock


def test_supervisor_backoff_port_reuse_and_repoint(tmp_path):
    """Store level: a failed restart fails fast until its backoff ends; a restart gets the same TCP
    port back, or another one (the store re-points); a stopped or closed store is never restarted."""
    server = EmbeddedRedis(tmp_path / "r", transport="tcp").start()  # port chosen by the OS
    port = server.bound_port
    store = MemoryStore.from_url(server.url, socket_timeout=0.5)
    store.supervisor = sup = EmbeddedSupervisor(server, wait_s=2.0, min_backoff_s=0.3, on_restart=store.repoint)
    events = [Event(f"i{t}", t, f"e{t}") for t in range(5)]
    store.append_events("u", events[:3])

    exe = server.executable
    kill9(server.pid)
    server.executable = Path("/bin/false")  # the restart fails (as with a corrupt AOF or a full disk)
    with pytest.raises(StoreUnavailable, match="restart failed"):
        store.append_events("u", events[3:4])
    t0 = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="next try in"):
        store.history("u")
    assert time.perf_counter() - t0 < 0.1 and sup.failures == 1  # no second attempt during the backoff
    server.executable = exe
    time.sleep(0.35)
    assert store.append_events("u", events[3:4]).added == 1  # restarted by this call, on the same port
    assert sup.restarts == 1 and server.bound_port == port and server.url == f"redis://127.0.0.1:{port}/0"

    kill9(server.pid)
    with _squat(port):  # someone takes the port meanwhile: the restart binds another one
        assert store.append_events("u", events[4:]).added == 1
    assert sup.restarts == 2 and server.bound_port != port and store.client.connection_pool.connection_kwargs[
        "port"] == server.bound_port
    assert store.history("u") == events

    server.stop()  # stopped on purpose: not brought back
    with pytest.raises(StoreUnavailable):
        store.history("u")
    assert sup.restarts == 2 and not server.running()
    server.start()
    store.close()  # closing ends the supervision
    kill9(server.pid)
    with pytest.raises(StoreUnavailable):
        store.history("u")
    assert sup.restarts == 2
