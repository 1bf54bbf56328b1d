"""How many CPUs this process may use, and the model's thread counts that follow from it.

torch's default intra-op thread count is the host's core count: it ignores the process's CPU affinity
(``taskset``, a cpuset) and a container's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``).
More threads than CPUs make OpenMP's threads wait on each other at every barrier while the scheduler
runs someone else, which is the collapse docs/BENCHMARKS.md measures beside another CPU job.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuBudget:
    affinity: int  # CPUs in the process's affinity mask
    quota: float | None  # cgroup CPU quota in CPUs (quota / period); None: no limit
    cpus: int  # min(affinity, ceil(quota)), at least 1

    def as_dict(self) -> dict:
        return asdict(self)


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) of this process, from /proc/self/cgroup's lines."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, path: str) -> list[Path]:
    """The cgroup directory of ``path`` under ``root`` and every parent up to ``root``; a quota anywhere
    above the process limits it. Inside a container, ``path`` is "/" and ``root`` is its own cgroup."""
    out, p = [], Path(path.strip() or "/")
    while True:
        out.append(root / str(p).lstrip("/"))
        if p == p.parent:
            return out
        p = p.parent


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_quota(sys_fs_cgroup: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup path, v2 or v1; None when unlimited."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    v2, v1 = _cgroup_paths(proc_cgroup)
    quotas: list[float] = []
    if v2 is not None:
        quotas += [q for d in _ancestors(sys_fs_cgroup, v2) if (q := _v2_quota(d)) is not None]
    if v1 is not None:
        for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            if (sys_fs_cgroup / mount).is_dir():
                quotas += [q for d in _ancestors(sys_fs_cgroup / mount, v1) if (q := _v1_quota(d)) is not None]
                break
    return min(quotas) if quotas else None


def cpu_budget(affinity: int | None = None, quota: float | None | str = "read") -> CpuBudget:
    """This process's CPU budget: the affinity mask's size and the cgroup quota, rounded up."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    q = cgroup_quota() if quota == "read" else quota
    cpus = affinity if q is None else min(affinity, math.ceil(q - 1e-9))
    return CpuBudget(affinity=affinity, quota=q, cpus=max(1, cpus))


@dataclass(frozen=True)
class ThreadPlan:
    intra_op: int
    inter_op: int
    source: str  # "AUTOMR_TORCH_THREADS" or "cpu budget"
    budget: CpuBudget

    def as_dict(self) -> dict:
        return {"intra_op": self.intra_op, "inter_op": self.inter_op, "source": self.source,
                "cpu_budget": self.budget.as_dict()}


def thread_plan(torch_threads: int | None, budget: CpuBudget | None = None) -> ThreadPlan:
    """Intra-op threads = the CPU budget unless AUTOMR_TORCH_THREADS says otherwise; one inter-op
    thread (the service runs one model call at a time, so inter-op parallelism only adds threads)."""
    budget = budget or cpu_budget()
    if torch_threads:
        return ThreadPlan(torch_threads, 1, "AUTOMR_TORCH_THREADS", budget)
    return ThreadPlan(budget.cpus, 1, "cpu budget", budget)


def apply_thread_plan(plan: ThreadPlan) -> dict:
    """Set torch's thread pools to the plan (before the first model call: the inter-op pool can be
    sized once only) and return what torch reports afterwards."""
    import torch

    torch.set_num_threads(plan.intra_op)
    try:
        torch.set_num_interop_threads(plan.inter_op)
    except RuntimeError:  # already started (an embedding program ran torch before): keep its pool
        pass
    return {**plan.as_dict(), "intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}
