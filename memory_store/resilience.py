"""What the store does when Redis fails: fail fast while it hangs, bring a dead embedded server back.

``Breaker``: a call that times out (a hung or unreachable server: SIGSTOP, a network partition, a
server stuck on a slow disk) costs ``socket_timeout``. After one, every call fails at once with
``StoreUnavailable`` for ``cooldown_s``; then one call at a time goes through as a probe until one
gets an answer. A refused connection needs no breaker: it fails in well under a millisecond.

``EmbeddedSupervisor``: the embedded redis-server is a child process; if it dies (crash, OOM kill,
``kill -9``), the first store call that fails restarts it on the same data directory and the same
unix socket or TCP port (the AOF, ``appendfsync always``, holds every acknowledged write), waits up to
``wait_s`` for it, and retries the call once; concurrent failing calls wait for the same restart. A
server that is alive but not answering is never restarted (two servers on one AOF would corrupt
it). A failed restart is tried again after a backoff (0.5 s doubling to 30 s); calls fail at once
meanwhile, naming the reason. An external Redis (REDIS_URL) is not supervised: redis-py's pool
reconnects by itself once it is back.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from redis import exceptions as rx

from .embedded import EmbeddedRedis
from .errors import StoreUnavailable

log = logging.getLogger(__name__)
EXIT_GRACE_S = 0.25  # how long a server whose connection broke may take to finish dying


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (rx.TimeoutError, TimeoutError))


class Breaker:
    """Fail fast for ``cooldown_s`` after a timed-out call; then let one probe call through at a time."""

    def __init__(self, cooldown_s: float = 1.0) -> None:
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.cooldown_s = cooldown_s
        self.opened = 0  # times a timeout opened it (tests, metrics)
        self._lock = threading.Lock()
        self._open_until = 0.0  # time.monotonic(); 0.0 = closed
        self._probing = False
        self._reason = ""

    @property
    def is_open(self) -> bool:
        return self._open_until != 0.0

    def before(self, what: str) -> bool:
        """Raise ``StoreUnavailable`` while open or while another call probes; True if this call is the probe."""
        if self._open_until == 0.0:  # closed: no lock on the normal path
            return False
        with self._lock:
            if self._open_until == 0.0:
                return False
            left = self._open_until - time.monotonic()
            if left > 0 or self._probing:
                wait = f"for {left:.2f}s more" if left > 0 else "while a probe call is in flight"
                raise StoreUnavailable(
                    f"redis unavailable in {what}: failing fast {wait} after a timeout ({self._reason})")
            self._probing = True
            return True

    def answered(self, probe: bool) -> None:
        """The server answered (success, or an error that is not about availability): close."""
        if self._open_until == 0.0 and not probe:
            return
        with self._lock:
            self._open_until, self._probing = 0.0, False

    def failed(self, exc: BaseException, probe: bool) -> None:
        """An availability error: a timeout (re)opens the breaker; a fast failure only ends the probe."""
        if is_timeout(exc):
            with self._lock:
                self._open_until = time.monotonic() + self.cooldown_s
                self._probing = False
                self._reason = f"{type(exc).__name__}: {exc}"
                self.opened += 1
        elif probe:
            with self._lock:
                self._probing = False

    def released(self, probe: bool) -> None:
        """The call ended before reaching Redis (bad input): another call may probe."""
        if probe:
            with self._lock:
                self._probing = False


class EmbeddedSupervisor:
    """Restart a dead embedded redis-server when a store call fails (see the module docstring).

    ``generation`` counts successful restarts; a caller reads it before its Redis call and passes it
    to ``recover`` after a failure, so that a call failing on the old server is retried once on the
    new one, whoever restarted it. ``on_restart(url)`` is called after each restart (the store
    re-points its client when the URL changed: a TCP port taken meanwhile)."""

    def __init__(
        self,
        server: EmbeddedRedis,
        *,
        wait_s: float = 5.0,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.server = server
        self.wait_s = wait_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_restart = on_restart
        self.generation = 0
        self.restarts = 0  # successful restarts (tests, metrics)
        self.failures = 0  # failed restart attempts
        self.last_error: str | None = None
        self.closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._backoff = min_backoff_s
        self._next_try = 0.0

    def close(self) -> None:
        """No more restarts (the store is closing; the server is about to be stopped)."""
        self.closed = True

    def recover(self, generation: int) -> bool:
        """After a failed call begun at ``generation``: True when a restart has happened since (retry
        the call), False when the server is alive (not a crash), stopped, or could not be restarted
        within ``wait_s``."""
        with self._lock:
            if self.generation != generation:
                return True
            if self.closed or self.server.stopped:
                return False
            idle = self._thread is None
        if idle and self.server.running():
            # a killed server resets its clients' connections while it is still exiting (not yet a
            # zombie): give it a moment to be gone before calling it alive (hung, not crashed)
            deadline = time.monotonic() + EXIT_GRACE_S
            while self.server.running() and time.monotonic() < deadline:
                time.sleep(0.01)
        with self._lock:
            if self.generation != generation:
                return True
            if self.closed or self.server.stopped:
                return False
            if self._thread is None:
                if self.server.running():
                    return False
                if time.monotonic() < self._next_try:
                    return False
                self._done = threading.Event()
                self._thread = threading.Thread(target=self._restart, args=(self._done,),
                                                name="automr-redis-restart", daemon=True)
                self._thread.start()
            done = self._done
        done.wait(self.wait_s)
        return self.generation != generation

    def _restart(self, done: threading.Event) -> None:
        old_pid = self.server.pid
        t0 = time.perf_counter()
        try:
            self.server.restart()
            url = self.server.url
            if self.on_restart is not None and url is not None:
                self.on_restart(url)
        except Exception as e:  # a bad AOF, a full disk, no binary: retry later, fail fast meanwhile
            with self._lock:
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._next_try = time.monotonic() + self._backoff
                log.error("could not restart the embedded redis-server on %s (next try in %.1fs): %s",
                          self.server.data_dir, self._backoff, self.last_error)
                self._backoff = min(2 * self._backoff, self.max_backoff_s)
        else:
            with self._lock:
                self.generation += 1
                self.restarts += 1
                self.last_error = None
                self._backoff = self.min_backoff_s
            log.warning("the embedded redis-server (pid %s) died; %s pid %s on %s in %.0f ms", old_pid,
                        "restarted it as" if self.server.owned else "attached to", self.server.pid,
                        self.server.url, 1e3 * (time.perf_counter() - t0))
        finally:
            with self._lock:
                self._thread = None
            done.set()

    def unavailable_detail(self) -> str:
        """Why calls fail while no restart succeeds (appended to StoreUnavailable's message)."""
        if self.last_error:
            wait = max(0.0, self._next_try - time.monotonic())
            return (f"; the embedded redis-server is down and its restart failed (next try in {wait:.1f}s): "
                    f"{self.last_error}")
        return ""
