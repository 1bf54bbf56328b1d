"""Throughput at c = 16 alone and beside another CPU job, for several thread and OpenMP settings.

    python bench/threads_beside.py --artefacts runs/ml-100k/quickstart --seconds 60 --out runs/threads

For each setting (``--configs``: ``name=VAR=value VAR=value;...``; ``baseline`` = none) it starts
``automr serve`` with those variables, waits for /readyz, drives ``/recommend`` (automr) at
``--concurrency`` for ``--seconds`` with ``bench/soak.py`` alone, then again beside ``--busy`` busy
loops (one process each, as many as the CPUs by default), and stops the server with SIGTERM. Where
the loops run (``--busy-session``): ``job`` (default), all in one session of their own, as one other
job with that many threads is; ``each``, a session per loop (as many jobs as loops); ``server``, the
server's session. With the kernel's autogroup scheduling, CPU time is shared between sessions first,
so the server's fair share of the CPUs is 1/2 beside one job and 1/(loops + 1) beside ``each``. One
table: req/s and p50 alone and beside, beside / alone, and alone / the first setting's alone. Each
server's /version ``threads`` and ``process`` are recorded, so the table says what actually ran.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

try:
    from bench.bench_load import machine
    from bench.procfs import fault_and_cpu_counters
except ImportError:  # run as a script: python bench/threads_beside.py
    from bench_load import machine
    from procfs import fault_and_cpu_counters
from pathlib import Path

DEFAULT_CONFIGS = ("static=AUTOMR_TORCH_THREADS=2 AUTOMR_ADAPTIVE_THREADS=false;"
                   "shipped=;"
                   "threads1=AUTOMR_TORCH_THREADS=1;"
                   "passive=AUTOMR_ADAPTIVE_THREADS=false OMP_WAIT_POLICY=PASSIVE")
BUSY = "while True: pass"
SESSIONS = {"job": "one job: a session of their own together", "each": "a session each",
            "server": "in the server's session"}


def start_busy(n: int, where: str) -> list[subprocess.Popen]:
    """``n`` busy loops: one job of ``n`` processes in a new session, ``n`` sessions, or the server's."""
    if where == "job":  # a shell in a new session starts them: they share its session (and autogroup)
        loops = " & ".join([f"{sys.executable} -c '{BUSY}'"] * n) + " & wait"
        return [subprocess.Popen(["sh", "-c", loops], start_new_session=True)]
    return [subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=where == "each") for _ in range(n)]
CELL = ("req_per_s", "req_per_s_between_answers", "recommend_p50_ms", "recommend_p99_ms", "errors", "http_5xx", "threads_after",
        "minor_faults_per_s", "cpu_user_per_s", "cpu_sys_per_s", "rss_peak_mb")


def measure_beside(a, url: str, out: Path, pid: int) -> dict:
    """The load beside the busy loops (started for it, killed after)."""
    busy = start_busy(a.busy, a.busy_session)
    try:
        beside = soak(url, a.data, a.seconds, a.concurrency, out, pid)
        beside["threads_after"] = get_json(url + "/version")["threads"]
        return beside
    finally:
        for b in busy:
            os.killpg(b.pid, signal.SIGKILL) if a.busy_session == "job" else b.kill()
            b.wait()


def parse_configs(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, rest = part.partition("=")
        env = dict(kv.split("=", 1) for kv in rest.split())
        out.append((name, env))
    return out


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            get_json(url + "/readyz")
            return
        except OSError:
            time.sleep(1)
    raise SystemExit("the server did not get ready")


def soak(url: str, data: str, seconds: float, concurrency: int, out: Path, pid: int) -> dict:
    """One cell of load; with the server's page faults (an allocator that gives pages back faults them
    in again), its CPU seconds per second, user and system, and its peak RSS over the cell."""
    c0, t0 = fault_and_cpu_counters(pid), time.monotonic()
    subprocess.run([sys.executable, str(Path(__file__).with_name("soak.py")), "--url", url, "--data", data,
                    "--minutes", str(seconds / 60), "--concurrency", str(concurrency), "--ratio", "0",
                    "--interval", str(seconds), "--pid", str(pid), "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    c1, wall = fault_and_cpu_counters(pid), time.monotonic() - t0
    res = json.loads(out.with_suffix(".json").read_text())
    res.update(minor_faults_per_s=round((c1[0] - c0[0]) / wall), cpu_user_per_s=round((c1[1] - c0[1]) / wall, 3),
               cpu_sys_per_s=round((c1[2] - c0[2]) / wall, 3), rss_peak_mb=res.get("rss_peak_mb_max"))
    return res


def rate(cell: dict) -> float:
    """Answers per second between the cell's first and last answers (its fixed-span count moves in
    steps of up to the concurrency)."""
    return cell.get("req_per_s_between_answers") or cell["req_per_s"]


def now(cell: dict) -> int:
    """The model thread's intra-op threads at the end of a cell (the governor's count when it runs)."""
    t = cell["threads_after"]
    return t["adaptive"]["now"] if "adaptive" in t else t.get("intra_op", "–")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artefacts", required=True)
    ap.add_argument("--data", default="runs/ml-100k")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--port", type=int, default=8013)
    ap.add_argument("--busy-session", choices=("job", "each", "server"), default="job",
                    help="the busy loops' session: one of their own (job), one each, or the server's")
    ap.add_argument("--alone-only", action="store_true",
                    help="no beside cells: for A/B pairs alone (list a setting twice, under two names)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{a.port}"
    results = []
    try:
        get_json(url + "/healthz")
        raise SystemExit(f"something already answers on {url}: stop it or pass another --port")
    except OSError:
        pass
    for name, extra in parse_configs(a.configs):
        env = {**os.environ, "AUTOMR_DATA_DIR": a.data, "AUTOMR_ARTEFACTS_DIR": a.artefacts,
               "AUTOMR_PORT": str(a.port), "AUTOMR_LOG_LEVEL": "warning", **extra}
        log = open(out / f"server-{name}.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=log)
        try:
            wait_ready(url, server, 900)
            version = get_json(url + "/version")
            alone = soak(url, a.data, a.seconds, a.concurrency, out / f"{name}-alone", server.pid)
            alone["threads_after"] = get_json(url + "/version")["threads"]
            beside = None if a.alone_only else measure_beside(a, url, out / f"{name}-beside", server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(120)
        row = {"config": name, "env": extra, "threads": version["threads"], "process": version["process"],
               "alone": {k: alone[k] for k in CELL}, "beside": beside and {k: beside[k] for k in CELL}}
        results.append(row)
        print(json.dumps(row), flush=True)
    base = rate(results[0]["alone"])
    lines = [f"machine: {machine()['cpu']['model']}, {len(os.sched_getaffinity(0))} CPUs; "
             f"c = {a.concurrency}, {a.seconds:.0f} s per cell (req/s between its first and last answers), {a.busy} busy loops beside "
             f"({SESSIONS[a.busy_session]})",
             "| setting | intra-op (alone → beside, at the end) | malloc | alone req/s | alone p50 ms | beside req/s | beside p50 ms | beside / alone "
             f"| alone / {results[0]['config']} | errors | alone: faults/s, CPU user + sys per s, peak RSS MB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        al, bs = r["alone"], r["beside"] or {"req_per_s": math.nan, "recommend_p50_ms": "–", "errors": 0,
                                             "http_5xx": 0, "threads_after": {}}
        lines.append(f"| {r['config']} ({', '.join(f'{k}={v}' for k, v in r['env'].items()) or 'defaults'}) "
                     f"| {now(al)} → {now(bs)} | {r['process']['malloc']} | {rate(al):.2f} | {al['recommend_p50_ms']} "
                     f"| {rate(bs):.2f} | {bs['recommend_p50_ms']} | {rate(bs) / rate(al):.2f} "
                     f"| {rate(al) / base:.2f} | {al['errors'] + bs['errors'] + al['http_5xx'] + bs['http_5xx']} "
                     f"| {al['minor_faults_per_s']:,}; {al['cpu_user_per_s']:.2f} + {al['cpu_sys_per_s']:.2f}; {al['rss_peak_mb']:,.0f} |")
    table = "\n".join(lines)
    (out / "threads.md").write_text(table + "\n")
    (out / "threads.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
