"""The CPU budget (affinity, cgroup v1/v2 quota), the thread plan, and the serving environment."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from service import serve_env
from service.cpu_budget import cgroup_quota, cpu_budget, thread_plan


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    _write(tmp_path / "kubepods" / "cpu.max", "250000 100000\n")
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    assert cgroup_quota(tmp_path, "0::/kubepods/pod1\n") == 2.5
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "50000 100000\n")
    assert cgroup_quota(tmp_path, "0::/kubepods/pod1\n") == 0.5


def test_cgroup_v2_unlimited_and_missing_files(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_quota(tmp_path, "0::/\n") is None
    assert cgroup_quota(tmp_path / "nothing-here", "0::/a/b\n") is None


def test_cgroup_v1_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    _write(cpu / "docker" / "abc" / "cpu.cfs_quota_us", "150000\n")
    _write(cpu / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    _write(cpu / "cpu.cfs_quota_us", "-1\n")
    _write(cpu / "cpu.cfs_period_us", "100000\n")
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_quota(tmp_path, text) == 1.5


@pytest.mark.parametrize("affinity, quota, cpus", [(8, None, 8), (8, 2.5, 3), (2, 4.0, 2), (4, 0.2, 1), (1, None, 1)])
def test_budget_is_the_smaller_of_affinity_and_the_quota_rounded_up(affinity, quota, cpus):
    assert cpu_budget(affinity=affinity, quota=quota).cpus == cpus


def test_thread_plan_setting_overrides_the_budget():
    budget = cpu_budget(affinity=4, quota=None)
    assert (thread_plan(None, budget).intra_op, thread_plan(None, budget).inter_op) == (4, 1)
    plan = thread_plan(3, budget)
    assert (plan.intra_op, plan.source) == (3, "AUTOMR_TORCH_THREADS")


@pytest.mark.skipif(not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2, reason="needs taskset, 2 CPUs")
def test_one_cpu_under_taskset_gives_one_intra_op_thread():
    code = ("import json; from service.cpu_budget import apply_thread_plan, thread_plan; "
            "from service.observability import threads_info; apply_thread_plan(thread_plan(None)); "
            "print(json.dumps(threads_info(None)))")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["intra_op"] == 1 and info["inter_op"] == 1 and info["cpu_budget"]["affinity"] == 1


def test_serve_env_prefers_jemalloc_and_keeps_what_the_caller_set():
    env = serve_env.serve_environ("auto", {}, jemalloc="/lib/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and "MALLOC_CONF" in env
    env = serve_env.serve_environ("auto", {"LD_PRELOAD": "/x/libfoo.so", "MALLOC_CONF": "narenas:1"},
                                  jemalloc="/lib/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /x/libfoo.so" and "MALLOC_CONF" not in env
    assert "LD_PRELOAD" not in serve_env.serve_environ("auto", {"LD_PRELOAD": "/y/libjemalloc.so"}, jemalloc="/j")
    # OpenMP's variables are the caller's: serving sets none of them
    for malloc in ("auto", "jemalloc", "glibc", "system"):
        assert not [k for k in serve_env.serve_environ(malloc, {}, jemalloc="/j") if "OMP" in k]


def test_serve_env_without_jemalloc_keeps_glibc_tunes_it_on_request_or_fails_when_asked_for_it():
    assert not set(serve_env.GLIBC_TUNED) & set(serve_env.serve_environ("auto", {}, jemalloc=""))
    env = serve_env.serve_environ("glibc", {"MALLOC_ARENA_MAX": "4"}, jemalloc="/j")
    assert "LD_PRELOAD" not in env and env["MALLOC_MMAP_THRESHOLD_"] and "MALLOC_ARENA_MAX" not in env
    assert not set(serve_env.GLIBC_TUNED) & set(serve_env.serve_environ("system", {}, jemalloc=""))
    with pytest.raises(RuntimeError, match="libjemalloc2"):
        serve_env.serve_environ("jemalloc", {}, jemalloc="")
    assert serve_env.describe({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})["malloc"] == "jemalloc"


# ---- the adaptive thread governor (service/thread_governor.py) ----------------------------------------

from service.thread_governor import ThreadGovernor  # noqa: E402


def _feed(g: ThreadGovernor, share: float, seconds: float, turn_s: float = 0.5) -> list[int]:
    """Turns of ``turn_s`` wall seconds at CPU share ``share``; the thread counts the governor set."""
    out = []
    for _ in range(round(seconds / turn_s)):
        n = g.observe(turn_s, share * turn_s)
        if n is not None:
            out.append(n)
    return out


def test_governor_keeps_all_threads_while_the_cpus_are_its_own():
    g = ThreadGovernor(2)
    assert _feed(g, 0.97, 120) == [] and g.threads == 2 and g.last_share == pytest.approx(0.97)


def test_governor_drops_to_one_thread_when_preempted_and_probes_back_with_backoff():
    g = ThreadGovernor(2, probe_s=20, max_probe_s=80)
    assert _feed(g, 0.5, 2) == [1]  # one window of preemption
    assert _feed(g, 0.66, 18) == []  # at one thread beside the other job: stay until the probe
    assert _feed(g, 0.66, 2) == [2]  # the probe ...
    assert _feed(g, 0.5, 2) == [1]  # ... fails at once: back to one, next probe after 40 s
    assert _feed(g, 0.66, 38) == [] and _feed(g, 0.66, 2) == [2]
    assert _feed(g, 0.5, 2) == [1]  # fails again: 80 s (the cap)
    assert _feed(g, 0.66, 78) == [] and _feed(g, 0.66, 2) == [2]
    assert _feed(g, 0.95, 10) == [] and g.threads == 2  # the other job left: the probe holds
    assert _feed(g, 0.5, 2) == [1] and _feed(g, 0.66, 18) == [] and _feed(g, 0.66, 2) == [2]  # backoff reset


def test_governor_is_inert_with_one_thread_and_ignores_empty_turns():
    g = ThreadGovernor(1)
    assert not g.active and _feed(g, 0.1, 60) == [] and g.threads == 1
    g = ThreadGovernor(4)
    assert g.observe(0.0, 0.0) is None and g.threads == 4
    with pytest.raises(ValueError):
        ThreadGovernor(0)


def test_reexec_replaces_the_process_with_the_serving_environment():
    """``reexec_for_serving`` execs ``python -m service.cli ARGV`` with the variables added (here the
    glibc tuning, which needs no library) and a mark, so the new process does not exec again."""
    code = ("import os; os.environ.pop('_AUTOMR_SERVE_ENV', None); from service import serve_env; "
            "serve_env.reexec_for_serving('glibc', ['--help']); print('not replaced')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "not replaced" not in out.stdout and "usage: automr" in out.stdout
    code = ("import os; os.environ['_AUTOMR_SERVE_ENV'] = '1'; from service import serve_env; "
            "serve_env.reexec_for_serving('glibc', ['--help']); print('not replaced')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "not replaced"


@pytest.mark.skipif(serve_env.find_jemalloc() is None, reason="libjemalloc2 is not installed")
def test_the_jemalloc_settings_are_the_ones_jemalloc_runs_with():
    """jemalloc warns about and ignores a setting it does not know: read back what it runs with (the
    decay of freed pages, and no arena of its own for large buffers, which it would purge at once)."""
    code = ("import ctypes, json; je = ctypes.CDLL(None)\n"
            "def get(name):\n"
            "    v = ctypes.c_ssize_t(0); n = ctypes.c_size_t(ctypes.sizeof(v))\n"
            "    assert je.mallctl(name.encode(), ctypes.byref(v), ctypes.byref(n), None, ctypes.c_size_t(0)) == 0\n"
            "    return v.value\n"
            "print(json.dumps({k: get('opt.' + k) for k in ('dirty_decay_ms', 'muzzy_decay_ms', 'oversize_threshold')}))")
    env = {**os.environ, **serve_env.serve_environ("auto", {}, jemalloc=serve_env.find_jemalloc())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "<jemalloc>" not in out.stderr
    assert json.loads(out.stdout) == {"dirty_decay_ms": 60_000, "muzzy_decay_ms": 0, "oversize_threshold": 0}
