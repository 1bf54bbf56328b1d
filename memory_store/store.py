"""MemoryStore: a user's last ``cap`` events and their memory vectors in Redis.

Every write is one Lua script on one user's keys (atomic, also on a Redis Cluster); a read of a
user's state is one script call (one round trip). See keys.py for the schema, codec.py for the
encodings and scripts.py for the scripts and the invariants they keep.

Element key: a memory vector is stored under the event id of the interaction that *ends* its window
(METHOD.md §3: z_m is built from the K items ending at m). Vectors of trimmed events are deleted
with them; an out-of-order event deletes the vectors of every later event in the window (their
windows changed), and ``put_vectors`` refuses keys that are not in the window any more.

Retries: the client never retries a timed-out command (it may have run) and retries a broken
connection once. Both are safe anyway: appends are idempotent by event id, ``put_vectors`` and
``delete_user`` are idempotent by nature.

Failures (resilience.py): every public call raises ``StoreUnavailable`` when Redis cannot answer,
after at most ``socket_timeout`` (a refused connection: at once). After a timeout the ``Breaker``
fails calls at once for ``breaker_s``. With an embedded server, an ``EmbeddedSupervisor`` restarts a
dead one and the failed call is retried once on it. The connection pool reconnects by itself: no
restart of the app is ever needed once Redis is back.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry
from tqdm.auto import tqdm

from . import scripts
from .codec import decode_member, event_member, pack_vector, to_float16, unpack_payload, vector_header
from .errors import StoreUnavailable, is_unavailable
from .resilience import Breaker, EmbeddedSupervisor
from .keys import DEFAULT_NAMESPACE, MAX_EVENT_ID_CHARS, check_namespace, check_text, user_keys
from .types import AppendResult, Event, LoadResult, PutResult, UserState

DEFAULT_CAP = 100
_TRUE = {"1", "true", "yes", "on"}

F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """Re-raise "Redis is unavailable" errors as StoreUnavailable (the service's 503), through the
    store's breaker and, for an embedded server, its supervisor (``MemoryStore._guard``)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        return self._guard(fn.__name__, functools.partial(fn, self, *args, **kwargs))

    return wrapper  # type: ignore[return-value]


def split_cluster_flag(url: str) -> tuple[str, bool]:
    """Remove a ``cluster=1|true|yes`` query parameter from a Redis URL; return (url, flag)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k == "cluster" for k, _ in query):
        return url, False  # untouched (urlunsplit would turn unix:///path into unix:/path)
    flag = any(k == "cluster" and v.lower() in _TRUE for k, v in query)
    rest = [(k, v) for k, v in query if k != "cluster"]
    base = url.split("?", 1)[0]
    return (base + "?" + urlencode(rest) if rest else base), flag


def make_client(
    url: str,
    *,
    cluster: bool | None = None,
    socket_timeout: float = 5.0,
    socket_connect_timeout: float = 2.0,
) -> redis.Redis | RedisCluster:
    """A redis-py client for ``url`` (``redis://``, ``rediss://``, ``unix://``). A Redis Cluster
    when ``cluster`` is True or, if it is None, when the URL carries ``?cluster=true``."""
    url, flag = split_cluster_flag(url)
    if cluster is None:
        cluster = flag
    if cluster:
        # The cluster client retries MOVED/failover/connection errors itself (timeouts included:
        # harmless, every write here is idempotent).
        return RedisCluster.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        )
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        retry_on_timeout=False,  # a timed-out command may have run: do not send it again blindly
        # one reconnect on a broken connection (every pooled connection breaks once after a restart)
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        health_check_interval=30,  # PING a connection idle this long before using it
    )


class MemoryStore:
    """Per-user event windows and memory vectors in Redis. Thread-safe (redis-py's pool)."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        cap: int = DEFAULT_CAP,
        breaker_s: float = 1.0,
        supervisor: EmbeddedSupervisor | None = None,
    ) -> None:
        if not isinstance(cap, int) or cap < 1:
            raise ValueError(f"cap must be a positive int, got {cap!r}")
        if client.get_encoder().decode_responses:
            raise ValueError("the redis client must have decode_responses=False (vectors are bytes)")
        self.client = client
        self.namespace = check_namespace(namespace)
        self.cap = cap
        self.is_cluster = isinstance(client, RedisCluster)
        self.breaker = Breaker(breaker_s)
        self.supervisor = supervisor
        self._client_options: dict[str, Any] | None = None  # set by from_url: how to re-point the client
        self._url: str | None = None
        self._repoint_lock = threading.Lock()
        self._append = client.register_script(scripts.APPEND)
        self._put = client.register_script(scripts.PUT_VECTORS)
        self._read = client.register_script(scripts.READ_STATE)
        self._delete = client.register_script(scripts.DELETE_USER)

    @classmethod
    def from_url(cls, url: str, *, cluster: bool | None = None, socket_timeout: float = 5.0,
                 socket_connect_timeout: float = 2.0, namespace: str = DEFAULT_NAMESPACE,
                 cap: int = DEFAULT_CAP, breaker_s: float = 1.0) -> "MemoryStore":
        options = dict(cluster=cluster, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout)
        store = cls(make_client(url, **options), namespace=namespace, cap=cap, breaker_s=breaker_s)
        store._client_options, store._url = options, url
        return store

    def repoint(self, url: str) -> None:
        """Use a server at another URL from now on (a restarted embedded server that could not get
        its old TCP port back). No-op for the current URL."""
        if self._client_options is None:
            raise RuntimeError("repoint() needs a store made by MemoryStore.from_url")
        with self._repoint_lock:
            if url == self._url:
                return
            old, self.client = self.client, make_client(url, **self._client_options)
            self._url = url
        old.close()

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()  # the owner stops the server next: do not bring it back
        self.client.close()

    # --- failure handling --------------------------------------------------------------------
    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run one public call: breaker first; an availability error becomes StoreUnavailable, after
        one retry when the supervisor restarted a dead embedded server meanwhile."""
        probe = self.breaker.before(what)
        sup = self.supervisor
        generation = sup.generation if sup is not None else 0
        try:
            try:
                out = call()
            except StoreUnavailable:
                raise
            except Exception as e:
                if not is_unavailable(e):
                    raise
                if sup is None or not sup.recover(generation):
                    raise self._unavailable(what, e, probe) from e
                try:
                    out = call()  # once, on the restarted server (every call here is idempotent)
                except Exception as e2:
                    if is_unavailable(e2):
                        raise self._unavailable(what, e2, probe) from e2
                    raise
        except redis.exceptions.RedisError:
            self.breaker.answered(probe)  # not about availability (a script error): the server answered
            raise
        except BaseException:
            self.breaker.released(probe)  # bad input (before any I/O), StoreUnavailable (already counted)
            raise
        self.breaker.answered(probe)
        return out

    def _unavailable(self, what: str, exc: BaseException, probe: bool) -> StoreUnavailable:
        self.breaker.failed(exc, probe)
        extra = self.supervisor.unavailable_detail() if self.supervisor is not None else ""
        return StoreUnavailable(f"redis unavailable in {what}: {type(exc).__name__}: {exc}{extra}")

    # --- script calls ------------------------------------------------------------------------
    def _call(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA; EVAL on NOSCRIPT (a restarted or flushed server forgets scripts; EVAL caches it again)."""
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return self.client.eval(script.script, len(keys), *keys, *args)

    def _call_pipelined(self, calls: list[tuple[Script, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Many script calls in one pipeline (non-transactional; each script is atomic by itself).
        Calls that hit NOSCRIPT are sent again after SCRIPT LOAD: safe, they did not run."""

        def send(indices: list[int]) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for i in indices:
                script, keys, args = calls[i]
                # execute_command: ClusterPipeline blocks its evalsha() method, not the command
                # (routed by the script's keys, which share one slot)
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return pipe.execute(raise_on_error=False)

        results = send(list(range(len(calls))))
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                self.client.script_load(script.script)  # a cluster client loads it on every primary
            for i, r in zip(missing, send(missing)):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def _keys(self, user_id: str):
        return user_keys(user_id, self.namespace)

    @staticmethod
    def _packed(fingerprint: str, vectors: Mapping[str, np.ndarray]) -> dict[str, bytes]:
        """Key -> stored blob of each float32 [H] vector: checked, float16, behind ``fingerprint``'s
        header; every vector of one call has the same H."""
        header = vector_header(fingerprint)
        out: dict[str, bytes] = {}
        dim = None
        for key, vec in vectors.items():
            check_text(key, "element key", MAX_EVENT_ID_CHARS)
            v16 = to_float16(key, vec)
            if dim is None:
                dim = v16.shape[0]
            elif v16.shape[0] != dim:
                raise ValueError(f"vector {key!r} has {v16.shape[0]} dims, the others in this call have {dim}")
            out[key] = pack_vector(header, v16)
        return out

    def _append_call(self, user_id: str, events: Sequence[Event], vectors: Mapping[str, np.ndarray] | None = None,
                     fingerprint: str | None = None) -> tuple[Script, list[str], list[Any]]:
        k = self._keys(user_id)
        blobs: dict[str, bytes] = {}
        if vectors:
            if fingerprint is None:
                raise ValueError("vectors given without the fingerprint of their encoder")
            blobs = self._packed(fingerprint, vectors)
            unknown = set(blobs) - {ev.event_id for ev in events}
            if unknown:
                raise ValueError(f"vectors for events not in this append: {sorted(unknown)[:5]}")
        args: list[Any] = [self.cap, fingerprint or ""]
        for ev in events:
            args += (*event_member(ev), blobs.get(ev.event_id, b""))
        return self._append, [k.events, k.eids, k.vec, k.meta], args

    # --- events ------------------------------------------------------------------------------
    @_guarded
    def append_events(self, user_id: str, events: Sequence[Event], vectors: Mapping[str, np.ndarray] | None = None,
                      fingerprint: str | None = None) -> AppendResult:
        """Append events to one user's window atomically: ids already in the window are skipped,
        the rest inserted in (timestamp, item_id, event_id) order, then the window is capped.

        ``vectors`` (event id -> float32 [H]) are memory vectors that depend on their event alone
        (item elements), stored as float16 under ``fingerprint`` in the same script for the events
        that are new and still in the window (a duplicate id keeps its stored event and vector)."""
        script, keys, args = self._append_call(user_id, events, vectors, fingerprint)
        if len(args) == 2:
            return AppendResult(0, 0)
        return AppendResult(*self._call(script, keys, args))

    @_guarded
    def append_many(self, batch: Mapping[str, Sequence[Event]] | Iterable[tuple[str, Event]],
                    vectors: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                    fingerprint: str | None = None) -> dict[str, AppendResult]:
        """Append events of many users: grouped by user, one script call per user, one pipeline.
        ``vectors``: user -> (event id -> vector), as in ``append_events``."""
        groups: dict[str, list[Event]] = {}
        pairs = ((u, ev) for u, evs in batch.items() for ev in evs) if isinstance(batch, Mapping) else batch
        for user_id, ev in pairs:
            groups.setdefault(user_id, []).append(ev)
        vectors = vectors or {}
        stray = set(vectors) - set(groups)
        if stray:
            raise ValueError(f"vectors for users without events in this append: {sorted(stray)[:5]}")
        calls = [self._append_call(u, evs, vectors.get(u), fingerprint) for u, evs in groups.items()]
        results = self._call_pipelined(calls) if calls else []
        return {u: AppendResult(*r) for u, r in zip(groups, results)}

    @_guarded
    def history(self, user_id: str) -> list[Event]:
        """The user's window, oldest first."""
        return [decode_member(m) for m in self.client.zrange(self._keys(user_id).events, 0, -1)]

    @_guarded
    def load_histories(
        self,
        histories: Iterable[tuple[str, Iterable[Event]]],
        *,
        users_per_pipeline: int = 256,
        progress: bool = False,
    ) -> LoadResult:
        """Seed many users (start-up). Same end state as append_events per user; each history is
        de-duplicated by event id here and only its newest ``cap`` events are sent (older ones would
        be trimmed anyway: the window is the newest ``cap`` of stored + given events). Counts in the
        result include the events de-duplicated and trimmed client-side."""
        total = LoadResult()
        calls: list[tuple[Script, list[str], list[Any]]] = []

        def flush() -> None:
            for added, dups, trimmed, _, too_old, _ in self._call_pipelined(calls):
                total.added += added
                total.duplicates += dups
                total.trimmed += trimmed + too_old
            calls.clear()

        for user_id, events in tqdm(histories, desc="load histories", unit="user", disable=not progress):
            k = self._keys(user_id)
            first: dict[bytes, bytes] = {}  # event id -> member, first occurrence wins (as in the script)
            n = 0
            for ev in events:
                eid, member = event_member(ev)
                first.setdefault(eid, member)
                n += 1
            pairs = sorted(first.items(), key=lambda p: p[1])
            total.users += 1
            total.events += n
            total.duplicates += n - len(pairs)
            total.trimmed += max(0, len(pairs) - self.cap)
            args: list[Any] = [self.cap, ""]
            for eid, member in pairs[-self.cap:]:
                args += (eid, member, b"")
            calls.append((self._append, [k.events, k.eids, k.vec, k.meta], args))
            if len(calls) >= users_per_pipeline:
                flush()
        if calls:
            flush()
        return total

    # --- vectors -----------------------------------------------------------------------------
    @_guarded
    def put_vectors(self, user_id: str, fingerprint: str, vectors: Mapping[str, np.ndarray]) -> PutResult:
        """Store float32 [H] vectors as float16 under ``fingerprint`` (the encoder's: model, L,
        element type). Keys must be event ids in the user's window; others are rejected."""
        k = self._keys(user_id)
        args: list[Any] = [fingerprint]
        for key, blob in self._packed(fingerprint, vectors).items():
            args += (key, blob)
        if len(args) == 1:
            return PutResult(0, [])
        stored, rejected = self._call(self._put, [k.vec, k.eids, k.meta], args)
        return PutResult(int(stored), [r.decode() for r in rejected])

    @_guarded
    def get_user_state(self, user_id: str, fingerprint: str) -> UserState:
        """Events (oldest first) and the vectors stored under ``fingerprint``, in one round trip
        (one script: a consistent snapshot). Vectors under another fingerprint come back only as
        ``stale_keys``."""
        k = self._keys(user_id)
        header = vector_header(fingerprint)
        members, fresh, stale = self._call(self._read, [k.events, k.vec], [header])
        vectors = {fresh[i].decode(): unpack_payload(fresh[i + 1]) for i in range(0, len(fresh), 2)}
        return UserState(
            events=[decode_member(m) for m in members],
            vectors=vectors,
            stale_keys=[s.decode() for s in stale],
        )

    # --- users -------------------------------------------------------------------------------
    @_guarded
    def delete_user(self, user_id: str) -> bool:
        """Erase every key of the user (one DEL, atomic). True if anything existed."""
        return bool(self._call(self._delete, self._keys(user_id).all(), []))

    @_guarded
    def user_meta(self, user_id: str) -> dict[str, str]:
        raw = self.client.hgetall(self._keys(user_id).meta)
        return {key.decode(): v.decode() for key, v in raw.items()}

    # --- markers -----------------------------------------------------------------------------
    @_guarded
    def get_marker(self, key: str) -> str | None:
        """A plain string key outside the per-user schema (e.g. the service's "seeded" marker)."""
        raw = self.client.get(key)
        return None if raw is None else raw.decode()

    @_guarded
    def set_marker(self, key: str, value: str) -> None:
        self.client.set(key, value.encode())

    # --- health ------------------------------------------------------------------------------
    @_guarded
    def ping(self) -> bool:
        """True, or StoreUnavailable."""
        return bool(self.client.ping())

    @_guarded
    def health(self) -> dict[str, Any]:
        """{ok, latency_ms, mode, redis_version, aof_enabled} (the last two for a single server)."""
        t0 = time.perf_counter()
        self.client.ping()
        out: dict[str, Any] = {"ok": True, "latency_ms": round((time.perf_counter() - t0) * 1e3, 3),
                               "mode": "cluster" if self.is_cluster else "standalone"}
        if not self.is_cluster:
            info = self.client.info("server") | self.client.info("persistence")
            out["redis_version"] = info.get("redis_version")
            out["aof_enabled"] = bool(info.get("aof_enabled"))
        return out
