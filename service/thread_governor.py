"""Intra-op threads that follow the CPU the model actually gets.

Alone on its CPUs the model is fastest with one intra-op thread per CPU. Beside another CPU job, every
OpenMP barrier waits for whichever thread the scheduler has just preempted, and throughput collapses
far below a fair share (docs/BENCHMARKS.md, threads); one thread does not wait on anyone. No static
setting is best in both cases, so the model thread measures the share of the wall time it gets on a
CPU during its own work (its thread CPU time over the wall time of its turns): close to 1 when the
CPUs are its own, well below when others take them. Below ``low`` it drops to one thread; at one
thread it tries its full count again after ``probe_s``, and backs off (doubling, up to ``max_probe_s``)
each time the share drops at once again.

The governor is plain data (no torch, no clock of its own): the runner calls ``observe`` after each turn
with that turn's wall and CPU seconds and sets the thread count it returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ThreadGovernor:
    max_threads: int
    low: float = 0.75  # CPU share below which the model is being preempted (one thread alone: ~1.0)
    window_s: float = 2.0  # wall seconds of work per decision
    probe_s: float = 20.0  # at one thread, try max_threads again after this long
    max_probe_s: float = 300.0
    threads: int = field(init=False)
    _wall: float = field(default=0.0, init=False)
    _cpu: float = field(default=0.0, init=False)
    _since_change: float = field(default=0.0, init=False)
    _backoff: float = field(init=False)
    _probing: bool = field(default=False, init=False)
    changes: int = field(default=0, init=False)
    last_share: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {self.max_threads}")
        self.threads = self.max_threads
        self._backoff = self.probe_s

    @property
    def active(self) -> bool:
        return self.max_threads > 1

    def observe(self, wall_s: float, cpu_s: float) -> int | None:
        """Account one turn of model work; returns the new thread count when it changes, else None."""
        if not self.active or wall_s <= 0:
            return None
        self._wall += wall_s
        self._cpu += min(cpu_s, wall_s)
        self._since_change += wall_s
        if self._wall < self.window_s:
            return None
        share, self._wall, self._cpu = self._cpu / self._wall, 0.0, 0.0
        self.last_share = share
        if self.threads > 1:
            if share >= self.low:
                if self._probing:  # the probe held for a window: the CPUs are ours again
                    self._probing, self._backoff = False, self.probe_s
                return None
            # preempted: one thread; a probe that failed at once waits twice as long next time
            if self._probing:
                self._backoff = min(self.max_probe_s, self._backoff * 2)
            self._probing = False
            return self._set(1)
        if self._since_change >= self._backoff:
            self._probing = True
            return self._set(self.max_threads)
        return None

    def _set(self, n: int) -> int:
        self.threads, self._since_change = n, 0.0
        self.changes += 1
        return n
