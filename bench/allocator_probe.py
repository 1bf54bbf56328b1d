"""What the allocator holds under load: the service in this process, ``bench/soak.py`` against it,
and jemalloc's own statistics sampled beside the RSS.

    python bench/allocator_probe.py --data runs/ml-100k --artefacts runs/ml-100k/quickstart \
        --minutes 8 --out runs/probe/allocator.jsonl

The process re-executes itself with the environment ``automr serve`` runs with
(``service/serve_env.py``: jemalloc preloaded with ``JEMALLOC_CONF``); a ``MALLOC_CONF`` that the
caller sets is kept, so settings can be compared. Every ``--interval`` seconds one JSON line: RSS,
jemalloc's ``stats.allocated`` (live bytes), ``stats.resident`` (pages it holds) and the resident
bytes of each arena (the last one is the arena of allocations from ``opt.oversize_threshold`` up,
when it exists; the first line gives each arena's decay as it runs). Resident minus allocated is what the allocator keeps for reuse; with decay off it
is never given back.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.procfs import status_bytes  # noqa: E402

MARK = "_AUTOMR_PROBE_ENV"


def mallctl_reader():
    """``read(name) -> int | None`` over jemalloc's ``mallctl`` (None everywhere without jemalloc)."""
    try:
        fn = ctypes.CDLL(None).mallctl
    except AttributeError:
        return lambda name, kind=ctypes.c_size_t: None

    def read(name: str, kind=ctypes.c_size_t):
        v, n = kind(0), ctypes.c_size_t(ctypes.sizeof(kind))
        return v.value if fn(name.encode(), ctypes.byref(v), ctypes.byref(n), None, ctypes.c_size_t(0)) == 0 else None

    def refresh() -> None:  # statistics are a snapshot taken at each "epoch" write
        e = ctypes.c_uint64(1)
        fn(b"epoch", None, None, ctypes.byref(e), ctypes.c_size_t(8))

    read.refresh = refresh
    return read


def sample(read, t0: float) -> dict:
    row = {"t_s": round(time.monotonic() - t0, 1), "rss_mb": round(status_bytes(os.getpid(), "VmRSS") / 2**20, 1)}
    if hasattr(read, "refresh"):
        read.refresh()
        mb = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
        narenas = read("arenas.narenas", ctypes.c_uint) or 0
        row.update(allocated_mb=mb(read("stats.allocated")), resident_mb=mb(read("stats.resident")),
                   arenas_resident_mb={i: mb(r) for i in range(narenas)
                                       if (r := read(f"stats.arenas.{i}.resident")) and r > 50 * 2**20})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--artefacts", required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--interval", type=float, default=20.0)
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not os.environ.get(MARK):  # the allocator must be in place before anything allocates
        from service import serve_env
        env = serve_env.serve_environ(os.environ.get("AUTOMR_MALLOC", "auto"), os.environ)
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **env, MARK: "1"})

    import uvicorn

    from service.app import create_app
    from service.cpu_budget import apply_thread_plan, thread_plan
    from service.settings import Settings

    settings = Settings(data_dir=a.data, artefacts_dir=a.artefacts, port=a.port, log_level="warning")
    apply_thread_plan(thread_plan(settings.torch_threads))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=a.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url, deadline = f"http://127.0.0.1:{a.port}", time.monotonic() + 900
    while True:
        try:
            urllib.request.urlopen(url + "/readyz", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the service did not get ready within 15 minutes")
            time.sleep(2)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = subprocess.Popen([sys.executable, str(Path(__file__).with_name("soak.py")), "--url", url, "--data", a.data,
                             "--minutes", str(a.minutes), "--out", str(out.with_suffix("")) + "-soak"],
                            stdout=subprocess.DEVNULL)
    read, t0 = mallctl_reader(), time.monotonic()
    with out.open("w") as f:
        narenas = read("arenas.narenas", ctypes.c_uint) or 0
        f.write(json.dumps({"malloc_conf": os.environ.get("MALLOC_CONF"),
                            "oversize_threshold": read("opt.oversize_threshold"),
                            # each arena's decay as it runs (an arena not yet created has none)
                            "arenas_dirty_decay_ms": {i: d for i in range(narenas)
                                                      if (d := read(f"arena.{i}.dirty_decay_ms", ctypes.c_ssize_t)) is not None}})
                + "\n")
        while load.poll() is None:
            time.sleep(a.interval)
            row = sample(read, t0)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
    server.should_exit = True


if __name__ == "__main__":
    main()
