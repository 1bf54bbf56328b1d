"""A process's sizes, page faults and CPU time from /proc: the readers the memory and load benches share
(stdlib only, so that importing it does not move the resident set a bench measures)."""
from __future__ import annotations

import os
import re
from pathlib import Path


def status_bytes(pid: int | str, field: str) -> int | None:
    """A size field of /proc/PID/status (VmRSS, VmHWM...) in bytes; None if the process is gone."""
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def peak_rss_since_last_call(pid: int) -> int | None:
    """The process's peak RSS since the last call (VmHWM, then reset through ``clear_refs``); None where
    the peak cannot be reset (it would then be the peak since the process started)."""
    peak = status_bytes(pid, "VmHWM")
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        return None
    return peak


def fault_and_cpu_counters(pid: int) -> tuple[int, float, float]:
    """The process's minor page faults, user and system CPU seconds (/proc/PID/stat)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 (state) on
    tick = os.sysconf("SC_CLK_TCK")
    return int(f[7]), int(f[11]) / tick, int(f[12]) / tick
