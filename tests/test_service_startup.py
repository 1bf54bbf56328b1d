"""`automr serve` end to end: artefacts on disk, uvicorn on a real port, loading after listening.

A tiny random Llama + tokenizer saved as an HF directory, a retriever saved with ``Retriever.save``,
the prepared tiny dataset of test_service.py; nothing injected: ``create_app(settings)`` loads it all
(``load_components``: model, index built and saved on first start, retriever, popularity, seeding).
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from memory_store.embedded import free_tcp_port
from model.data.prepared import prepare
from model.data.protocol import ProtocolConfig
from model.retriever import Retriever, RetrieverConfig
from service.app import create_app
from service.cli import build_parser, uvicorn_options
from service.components import load_components
from service.settings import Settings
from tests.conftest import build_tiny_lm, build_tiny_tokenizer
from tests.redis_fixtures import memory_store, redis_server, redis_url  # noqa: F401
from tests.test_service import K, USERS, _write_raw


@pytest.fixture
def on_disk(tmp_path):
    hist = _write_raw(tmp_path / "raw")
    prepare("csv", tmp_path / "raw", tmp_path / "data",
            ProtocolConfig(min_item=1, min_user=1, k_short=K, max_history=100), domain="movie", progress=False)
    tok = build_tiny_tokenizer()
    build_tiny_lm(len(tok), seed=5).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    Retriever(RetrieverConfig(hidden_size=64, mlp_hidden=16)).save(tmp_path / "art" / "retriever")
    return tmp_path, hist


def test_serve_subcommand_is_registered():
    args = build_parser().parse_args(["serve", "--port", "9123"])
    assert args.func.__name__ == "cmd_serve" and args.port == 9123 and args.host is None


@pytest.mark.parametrize("keep_alive_s, open_after_idle", [(0.2, False), (3.0, True)])
def test_idle_keep_alive_connection_lasts_keep_alive_s(tmp_path, keep_alive_s, open_after_idle):
    """AUTOMR_KEEP_ALIVE_S reaches uvicorn (``serve`` runs it with ``uvicorn_options``): an idle
    connection is closed after it, not after uvicorn's own 5 s."""
    settings = Settings(home=tmp_path, host="127.0.0.1", port=free_tcp_port(), keep_alive_s=keep_alive_s,
                        log_level="warning")
    release = threading.Event()

    def never_loads():  # /healthz answers while loading: no model is needed here
        release.wait(60)
        raise RuntimeError("not loaded in this test")

    server = uvicorn.Server(uvicorn.Config(create_app(settings, components=never_loads), **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        conn = http.client.HTTPConnection(settings.host, settings.port, timeout=10)
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and not r.will_close
        r.read()
        time.sleep(1.0)  # idle
        conn.sock.setblocking(False)
        try:
            closed = conn.sock.recv(1, socket.MSG_PEEK) == b""  # EOF: the server closed it
        except BlockingIOError:
            closed = False  # still open, nothing to read
        assert closed is not open_after_idle
        if open_after_idle:  # and it still serves
            conn.sock.setblocking(True)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        conn.close()
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_uvicorn_listens_before_ready_then_serves(on_disk, memory_store, redis_url):
    root, hist = on_disk
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = Settings(home=root, data_dir=root / "data", artefacts_dir=root / "art", model_path=root / "model",
                        cut_layer=2, dtype="float32", redis_url=redis_url, max_new_tokens=4, encode_on_write=False,
                        host="127.0.0.1", port=free_tcp_port())
    # the real loading path (load_components from disk), held until the test has seen a 503, so that
    # "answers while loading" does not depend on how fast the machine loads the tiny model
    seen_503 = threading.Event()

    def gated_load():
        seen_503.wait(60)
        return load_components(settings)

    app = create_app(settings, components=gated_load)
    server = uvicorn.Server(uvicorn.Config(app, **{**uvicorn_options(settings), "log_level": "warning"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://{settings.host}:{settings.port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            statuses = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    r = client.get("/readyz")
                except httpx.TransportError:
                    time.sleep(0.01)  # not listening yet
                    continue
                statuses.append(r.status_code)
                if r.status_code == 200:
                    break
                assert r.json()["error"] == "not_ready"
                assert client.get("/healthz").status_code == 200
                seen_503.set()
                time.sleep(0.01)
            assert statuses[0] == 503 and statuses[-1] == 200  # answered while loading, then ready
            ready = r.json()
            assert ready["slot_policy"] == "learned" and ready["k_short"] == K
            assert "ret:" in ready["model_version"] and "ret:none" not in ready["model_version"]
            # the index was built on first start and saved into the artefact folder
            meta = json.loads((root / "art" / "index" / "index.json").read_text())
            assert meta["n_items"] == 18
            # seeded from the prepared dataset, then served end to end
            h = client.get("/users/u1/history").json()["events"]
            assert [(e["item_id"], e["timestamp"]) for e in h] == sorted(hist["u1"], key=lambda x: (x[1], x[0]))
            r = client.post("/recommend", json={"user_id": "u1", "k": 3})  # 18 items, 14 seen
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["memory"]["used"] is True and body["memory"]["elements"] == USERS["u1"] - K
            assert len(body["items"]) == 3
            r = client.post("/recommend", content=b"{", headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    finally:
        server.should_exit = True
        thread.join(30)
        torch.set_num_threads(before)
    assert not thread.is_alive()


def test_evaluate_defaults_to_the_served_generation(monkeypatch):
    """`automr evaluate` of an LLM method generates as the service does (``Settings.generation``);
    an --option still wins."""
    import service.cli as cli
    import model.eval.run as run

    seen = {}
    monkeypatch.setattr(run, "run_evaluation", lambda *a, **k: seen.update(k["options"]))
    args = build_parser().parse_args(["evaluate", "--data", "d", "--method", "bigrec", "--option", "draft_tokens=0"])
    settings = Settings(draft_max_rows=3, prefill_max_tokens=99, ground_memo=False)
    assert cli.cmd_evaluate(args, settings) == 0
    assert seen == {**settings.generation(), "draft_tokens": 0, "cut": settings.cut_layer, "dtype": settings.dtype}
    assert (seen["draft_max_rows"], seen["prefill_max_tokens"], seen["ground_memo"]) == (3, 99, False)
