"""Real Redis servers for tests (no fakes): import the fixtures you need into a test module,

    from tests.redis_fixtures import redis_server, memory_store  # noqa: F401

``redis_server`` is one embedded redis-server per test session (AOF on, ``everysec`` for speed:
durability itself is tested on a server of its own); ``memory_store`` is a MemoryStore on it,
flushed before each test. ``EmbeddedCluster`` starts a small Redis Cluster of embedded servers.
``crashable_redis`` is a server of a test's own (TCP, fixed port, ``appendfsync always``) to kill and
bring back; ``kill9(pid)`` crashes a server without telling the object that runs it.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis

from memory_store import EmbeddedRedis, MemoryStore

N_SLOTS = 16384


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> EmbeddedRedis:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendfsync="everysec").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def memory_store(redis_server) -> MemoryStore:
    store = MemoryStore.from_url(redis_server.url)
    store.client.flushall()
    yield store
    store.close()


def _port_pair_free(port: int) -> bool:
    """True if ``port`` and its cluster bus port ``port + 10000`` can both be bound on 127.0.0.1."""
    socks = []
    try:
        for p in (port, port + 10000):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def _cluster_ports(n: int) -> list[int]:
    ports: list[int] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # start from an OS-chosen port, fold below 55535
        s.bind(("127.0.0.1", 0))
        port = 20000 + s.getsockname()[1] % 30000
    while len(ports) < n:
        if _port_pair_free(port):
            ports.append(port)
        port += 1
    return ports


class EmbeddedCluster:
    """``n`` embedded redis-servers joined into a Redis Cluster (no replicas), slots split evenly."""

    def __init__(self, base_dir: Path, n: int = 3, timeout: float = 20.0) -> None:
        self.nodes = [
            EmbeddedRedis(
                Path(base_dir) / f"node{i}", transport="tcp", port=port, appendfsync="everysec",
                extra_config={"cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
                              "cluster-node-timeout": "5000"},
            )
            for i, port in enumerate(_cluster_ports(n))
        ]
        self.timeout = timeout

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0?cluster=true"

    def start(self) -> "EmbeddedCluster":
        for node in self.nodes:
            node.start()
        clients = [node.client() for node in self.nodes]
        bounds = [round(i * N_SLOTS / len(self.nodes)) for i in range(len(self.nodes) + 1)]
        for c, lo, hi in zip(clients, bounds, bounds[1:]):
            c.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
        for node in self.nodes[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + self.timeout
        while not all(c.cluster("INFO")["cluster_state"] == "ok" and
                      int(c.cluster("INFO")["cluster_known_nodes"]) == len(self.nodes) for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the embedded cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        for c in clients:
            c.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> EmbeddedCluster:
    cluster = EmbeddedCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


def kill9(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL a redis-server as a crash would (the EmbeddedRedis object that runs it is left as is)
    and wait until it is gone (reaped, or a zombie: ``pid_alive`` is False for both)."""
    from memory_store.embedded import pid_alive

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} still alive {timeout}s after SIGKILL")
        time.sleep(0.005)


@pytest.fixture
def crashable_redis(tmp_path) -> EmbeddedRedis:
    """A redis-server of its own for crash tests: TCP on a fixed port, ``appendfsync always`` (the
    embedded default), data in ``tmp_path/crashable-redis``. ``.kill()`` (SIGKILL) then ``.start()``
    brings it back on the same port and AOF. Stopped at the end if running."""
    port = _cluster_ports(1)[0]
    server = EmbeddedRedis(tmp_path / "crashable-redis", transport="tcp", port=port, appendfsync="always").start()
    yield server
    if server.running():
        server.stop()


__all__ = ["EmbeddedCluster", "crashable_redis", "kill9", "memory_store", "redis_cluster", "redis_server", "redis_url"]
