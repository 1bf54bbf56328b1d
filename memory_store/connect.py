"""One entry point for the service: an external Redis (or Cluster) when a URL is given, else the
embedded redis-server on ``<home>/redis``."""
from __future__ import annotations

from pathlib import Path

from .embedded import EmbeddedRedis
from .keys import DEFAULT_NAMESPACE
from .resilience import EmbeddedSupervisor
from .store import DEFAULT_CAP, MemoryStore


def open_store(
    redis_url: str | None,
    home: str | Path,
    *,
    cluster: bool | None = None,
    appendfsync: str = "always",
    socket_timeout: float = 5.0,
    namespace: str = DEFAULT_NAMESPACE,
    cap: int = DEFAULT_CAP,
    breaker_s: float = 1.0,
    supervise: bool = True,
) -> tuple[MemoryStore, EmbeddedRedis | None]:
    """Return ``(store, server)``. ``redis_url`` (the service's REDIS_URL; ``?cluster=true`` or
    ``cluster=True`` for a Redis Cluster) wins; without it an embedded server is started on
    ``home/redis`` (or attached to, if one already runs there) and returned so the caller can stop it
    (after ``store.close()``, which ends the supervision).

    Failures: calls raise ``StoreUnavailable`` within ``socket_timeout``; after a timeout they fail at
    once for ``breaker_s``. With ``supervise`` (embedded only), a dead embedded server is restarted on
    the same socket/port and data directory by the first call that fails (resilience.py)."""
    server = None
    if not redis_url:
        server = EmbeddedRedis(Path(home) / "redis", appendfsync=appendfsync).start()  # type: ignore[arg-type]
        redis_url, cluster = server.url, False
    store = MemoryStore.from_url(redis_url, cluster=cluster, socket_timeout=socket_timeout,
                                 socket_connect_timeout=min(2.0, socket_timeout), namespace=namespace, cap=cap,
                                 breaker_s=breaker_s)
    if server is not None and supervise:
        store.supervisor = EmbeddedSupervisor(server, wait_s=socket_timeout, on_restart=store.repoint)
    return store, server
