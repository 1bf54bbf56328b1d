"""The process environment the server runs with: its memory allocator.

``LD_PRELOAD`` takes effect only when a process starts, so ``automr serve`` re-executes itself (same
pid) with jemalloc preloaded when it is installed (``reexec_for_serving``); the Dockerfile and the
compose file run the same command. A variable the caller has already set is never overridden.

The model allocates and frees buffers of tens to hundreds of MB every decoding step. glibc's malloc
as it is reuses them but its heap fragments; glibc tuned to give them back (``AUTOMR_MALLOC=glibc``)
faults them in again at the next step and loses much of the throughput. jemalloc serves them from its
arenas and gives back only pages left unused for about a minute (``JEMALLOC_CONF``): a step's
buffers are reused within milliseconds and stay, what fragmentation strands is returned
(docs/BENCHMARKS.md §5, §7.2). OpenMP's settings are left alone: its passive wait policy helped
beside another job but cost throughput alone (§7.1); the thread governor and row parts do that job instead.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
# jemalloc: pages freed and not reused for about a minute go back to the system; the rest is reused.
# - oversize_threshold:0: no separate arena for allocations of 8 MiB and more. jemalloc purges that
#   arena at once whenever decay is on, so every step would fault its KV and logits buffers in again
#   (docs/BENCHMARKS.md §7.2); in the ordinary arenas they are reused.
# - a finite decay: with decay off (-1) nothing freed is ever given back, so the resident set is the
#   high-water mark plus whatever fragmentation strands (§5). A shorter decay gives back pages that the
#   next steps fault in again (§7.2); a minute keeps a 30-minute soak flat (§5).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:60000,muzzy_decay_ms:0,oversize_threshold:0"
# AUTOMR_MALLOC=glibc (flat, but far slower at c = 16, §7.2): a fixed mmap threshold (glibc raises it after every large free,
# which moves big tensors into the fragmenting heap), trimming, and two arenas
GLIBC_TUNED = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
REEXEC_MARK = "_AUTOMR_SERVE_ENV"


def find_jemalloc(candidates: tuple[str, ...] = JEMALLOC_CANDIDATES) -> str | None:
    return next((p for p in candidates if Path(p).is_file()), None)


def allocator_env(malloc: str, environ: Mapping[str, str], jemalloc: str | None) -> dict[str, str]:
    """Variables to add for ``AUTOMR_MALLOC`` (auto, jemalloc, glibc, system)."""
    if malloc == "system" or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return {}
    if malloc in ("auto", "jemalloc") and jemalloc:
        preload = " ".join(p for p in (jemalloc, environ.get("LD_PRELOAD", "")) if p)
        return {"LD_PRELOAD": preload, **({} if "MALLOC_CONF" in environ else {"MALLOC_CONF": JEMALLOC_CONF})}
    if malloc == "jemalloc":
        raise RuntimeError(f"AUTOMR_MALLOC=jemalloc but libjemalloc.so.2 is not in {list(JEMALLOC_CANDIDATES)}: "
                           "install Debian's libjemalloc2, or set AUTOMR_MALLOC=auto")
    if malloc == "glibc":
        return {k: v for k, v in GLIBC_TUNED.items() if k not in environ}
    return {}  # auto without jemalloc: glibc as it is (tuned, it halves the throughput)


def serve_environ(malloc: str, environ: Mapping[str, str], jemalloc: str | None = None) -> dict[str, str]:
    """The variables to add to ``environ`` before serving (empty: nothing to change)."""
    jemalloc = jemalloc if jemalloc is not None else find_jemalloc()
    return allocator_env(malloc, environ, jemalloc)


def describe(environ: Mapping[str, str] = os.environ) -> dict:
    """What this process runs with, for the start-up log and GET /version."""
    preload = environ.get("LD_PRELOAD", "")
    malloc = "jemalloc" if "jemalloc" in preload else "tcmalloc" if "tcmalloc" in preload else "glibc"
    keys = ("MALLOC_CONF", *GLIBC_TUNED, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
    return {"malloc": malloc, "env": {k: environ[k] for k in keys if k in environ}}


def reexec_for_serving(malloc: str, argv: list[str]) -> None:
    """Replace this process (same pid, so signals and PID 1 behave) by ``python -m service.cli ARGV``
    with the serving environment, unless it already runs with it. Returns only when nothing changes."""
    if os.environ.get(REEXEC_MARK):
        return
    env = serve_environ(malloc, os.environ)
    if not env:
        return
    os.execve(sys.executable, [sys.executable, "-m", "service.cli", *argv], {**os.environ, **env, REEXEC_MARK: "1"})
