"""Soak a running automr server: mixed load for a given time, sampled every ``--interval`` seconds.

    python bench/soak.py --url http://127.0.0.1:8000 --data runs/ml-100k --minutes 30 --out runs/soak/soak

``--concurrency`` workers (16) in a closed loop send ``--ratio`` (4) ``/recommend`` requests (automr)
to one ``/interactions`` request, users of the dataset in turn (all users with more than 10
interactions: more than any per-user cache holds). Every ``--bad-every``-th append is bad input (an
unknown item and a malformed event, alternately: a 4xx is expected), and every ``--dup-every``-th
re-sends an acknowledged event (a retry: ``duplicates`` must be 1). Each window records answered
requests, req/s, /recommend p50 and p99, errors (any unexpected status or client error), 5xx and 429
answers, and the server's RSS (``--pid``'s VmRSS, else ``process_resident_memory_bytes`` from
/metrics); with ``--pid`` also the peak RSS of each window (VmHWM, reset after each sample). At the
end every acknowledged event is looked up in its user's history: none may be missing or stored twice.

Writes ``OUT.csv`` (one row per window), ``OUT.png`` (RSS, latency, throughput and errors over time)
and ``OUT.json`` (the summary: RSS and the window's peak RSS at 5 minutes and at the end, their ratios,
totals). The appends stay in the store: soak a server whose Redis you can throw away.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

try:
    from bench.bench_load import CLIENT_ERRORS, HttpClient, items_from_dataset, machine, users_from_dataset, wait_ready
    from bench.procfs import peak_rss_since_last_call, status_bytes
except ImportError:  # run as a script: python bench/soak.py
    from bench_load import CLIENT_ERRORS, HttpClient, items_from_dataset, machine, users_from_dataset, wait_ready
    from procfs import peak_rss_since_last_call, status_bytes


@dataclass
class Window:
    start_s: float
    answered: int = 0
    recommend_latencies: list[float] = field(default_factory=list)
    errors: int = 0  # unexpected statuses and client errors
    server_errors: int = 0  # 5xx
    throttled: int = 0  # 429
    bad_input_rejected: int = 0  # the intended 4xx answers to bad appends


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def rss_from_pid(pid: int) -> int | None:
    return status_bytes(pid, "VmRSS")


async def rss_from_metrics(client: HttpClient) -> int | None:
    try:
        r = await client.get("/metrics")
    except CLIENT_ERRORS:
        return None
    m = re.search(r"^process_resident_memory_bytes (\S+)$", r.text, re.M)
    return int(float(m.group(1))) if m else None


class Soak:
    def __init__(self, client: HttpClient, users: list[str], items: list[str], args):
        self.client, self.users, self.items, self.a = client, users, items, args
        self.run_id = uuid.uuid4().hex[:8]
        self.rng = random.Random(args.seed)
        self.counter = 0
        self.appends = 0
        self.acked: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)  # user -> event id -> (item, ts)
        self.windows: list[Window] = []
        self.bad_statuses: Counter[int] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.retries_not_duplicate = 0
        self.answered_at: list[float] = []  # monotonic time of every answer

    def window(self) -> Window:
        return self.windows[-1]

    def next_request(self) -> tuple[str, dict, str]:
        """(path, body, kind) of the next request; kind in recommend, append, retry, bad."""
        i = self.counter
        self.counter += 1
        user = self.users[i % len(self.users)]
        if self.a.ratio == 0 or i % (self.a.ratio + 1) != self.a.ratio:
            return "/recommend", {"user_id": user, "k": 10, "mode": "automr"}, "recommend"
        self.appends += 1
        n = self.appends
        if self.a.bad_every and n % self.a.bad_every == 0:
            if (n // self.a.bad_every) % 2:  # an item that is not in the catalogue
                ev = {"user_id": user, "item_id": f"no-such-item-{n}", "timestamp": int(time.time()),
                      "event_id": f"soak-{self.run_id}-bad-{n}"}
            else:  # a malformed event: no timestamp
                ev = {"user_id": user, "item_id": self.items[0], "event_id": f"soak-{self.run_id}-bad-{n}"}
            return "/interactions", {"events": [ev]}, "bad"
        if self.a.dup_every and n % self.a.dup_every == 0:
            done = [(u, e, it) for u, evs in self.acked.items() for e, it in list(evs.items())[-1:]]
            if done:  # the same event again, as a client's retry sends it
                u, e, (item, ts) = self.rng.choice(done)
                return "/interactions", {"events": [{"user_id": u, "item_id": item, "timestamp": ts,
                                                     "event_id": e}]}, "retry"
        ev = {"user_id": user, "item_id": self.rng.choice(self.items), "timestamp": int(time.time()),
              "event_id": f"soak-{self.run_id}-{n}"}
        return "/interactions", {"events": [ev]}, "append"

    async def worker(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            path, body, kind = self.next_request()
            t0 = time.perf_counter()
            try:
                r = await self.client.post(path, json=body)
            except CLIENT_ERRORS as e:
                self.window().errors += 1
                self.unexpected[type(e).__name__] += 1
                continue
            took = time.perf_counter() - t0
            w = self.window()
            w.answered += 1
            self.answered_at.append(time.monotonic())
            if r.status_code >= 500:
                w.server_errors += 1
            if r.status_code == 429:
                w.throttled += 1
                await asyncio.sleep(min(1.0, float(r.headers.get("Retry-After", "1"))))
                continue
            if kind == "bad":
                self.bad_statuses[r.status_code] += 1
                if 400 <= r.status_code < 500:
                    w.bad_input_rejected += 1
                else:
                    w.errors += 1
                    self.unexpected[f"bad input answered {r.status_code}"] += 1
                continue
            if r.status_code != 200:
                w.errors += 1
                self.unexpected[f"{kind} {r.status_code}"] += 1
                continue
            if kind == "recommend":
                w.recommend_latencies.append(took)
            else:
                ev = body["events"][0]
                out = r.json()
                if kind == "retry" and out.get("duplicates") != 1:
                    self.retries_not_duplicate += 1
                self.acked[ev["user_id"]].setdefault(ev["event_id"], (ev["item_id"], ev["timestamp"]))

    async def sampler(self, deadline: float, t_start: float, rows: list[dict]) -> None:
        while True:
            now = time.monotonic()
            wait = min(self.a.interval, deadline - now)
            if wait > 0:
                await asyncio.sleep(wait)
            w = self.window()
            now = time.monotonic()
            rss = rss_from_pid(self.a.pid) if self.a.pid else await rss_from_metrics(self.client)
            # the window's peak: with an allocator that gives pages back, one RSS sample depends on the
            # step it lands in; the peak since the previous sample does not
            peak = peak_rss_since_last_call(self.a.pid) if self.a.pid else None
            span = max(1e-9, now - (t_start + w.start_s))
            p50, p99 = percentile(w.recommend_latencies, 0.5), percentile(w.recommend_latencies, 0.99)
            row = {"t_s": round(now - t_start, 1), "rss_mb": round(rss / 2**20, 1) if rss else None,
                   "rss_peak_mb": round(peak / 2**20, 1) if peak else None,
                   "answered": w.answered, "req_per_s": round(w.answered / span, 3),
                   "recommend_p50_ms": round(p50 * 1e3) if p50 else None,
                   "recommend_p99_ms": round(p99 * 1e3) if p99 else None,
                   "errors": w.errors, "http_5xx": w.server_errors, "http_429": w.throttled,
                   "bad_input_rejected": w.bad_input_rejected}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if now >= deadline:
                return
            self.windows.append(Window(start_s=now - t_start))

    async def verify(self) -> dict:
        """Every acknowledged event is in its user's history exactly once."""
        missing = doubled = checked = trimmed = 0
        for user, events in self.acked.items():
            r = await self.client.get(f"/users/{user}/history")
            if r.status_code != 200:
                missing += len(events)
                continue
            window = r.json()["events"]
            ids = Counter(e["event_id"] for e in window)
            # the store keeps a user's newest ``--window`` events: when it is full, events no newer than
            # its oldest may have been trimmed, by design
            oldest = window[0]["timestamp"] if len(window) >= self.a.window else None
            for e, (_, ts) in events.items():
                checked += 1
                if ids[e] == 0 and oldest is not None and ts <= oldest:
                    trimmed += 1
                    continue
                missing += ids[e] == 0
                doubled += ids[e] > 1
        return {"acknowledged_events": checked, "missing": missing, "stored_twice": doubled,
                "trimmed_by_the_window": trimmed}

    async def run(self) -> dict:
        t_start = time.monotonic()
        deadline = t_start + self.a.minutes * 60
        self.windows.append(Window(start_s=0.0))
        rows: list[dict] = []
        await asyncio.gather(self.sampler(deadline, t_start, rows),
                             *(self.worker(deadline) for _ in range(self.a.concurrency)))
        return {"rows": rows, "verify": await self.verify()}


def steady_rate(times: list[float]) -> float | None:
    """Answers per second between the first answer and the last: a closed loop answers in groups, so a
    count over a fixed span moves in steps of up to the concurrency (16 of ~250 in two minutes)."""
    return round((len(times) - 1) / (times[-1] - times[0]), 3) if len(times) > 1 and times[-1] > times[0] else None


def rss_at(rows: list[dict], t_s: float, key: str = "rss_mb") -> float | None:
    """RSS (``key``: or the window's peak) of the first sample at or after ``t_s`` seconds."""
    for r in rows:
        if r["t_s"] >= t_s and r.get(key) is not None:
            return r[key]
    return None


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ax[0].plot(t, [r["rss_mb"] for r in rows], marker=".", label="sampled")
    if any(r.get("rss_peak_mb") for r in rows):
        ax[0].plot(t, [r.get("rss_peak_mb") for r in rows], marker=".", label="peak of the window")
        ax[0].legend()
    ax[0].set_ylabel("server RSS (MB)")
    ax[1].plot(t, [r["recommend_p50_ms"] for r in rows], label="p50")
    ax[1].plot(t, [r["recommend_p99_ms"] for r in rows], label="p99")
    ax[1].set_ylabel("/recommend (ms)")
    ax[1].legend()
    ax[2].plot(t, [r["req_per_s"] for r in rows], label="answered req/s")
    ax[2].plot(t, [r["errors"] + r["http_5xx"] for r in rows], label="errors + 5xx per window")
    ax[2].set_ylabel("per window")
    ax[2].set_xlabel("minutes")
    ax[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def amain(a) -> dict:
    client = HttpClient(a.url, headers={"authorization": f"Bearer {a.api_key}"} if a.api_key else None,
                        connections=a.concurrency + 4)
    try:
        await wait_ready(client, a.wait_ready)
        users = users_from_dataset(Path(a.data))
        items = items_from_dataset(Path(a.data))
        soak = Soak(client, users, items, a)
        res = await soak.run()
    finally:
        await client.aclose()
    rows = res["rows"]
    answered = sum(r["answered"] for r in rows)
    lat = [x for w in soak.windows for x in w.recommend_latencies]
    rss5, rss_end = rss_at(rows, 300), rows[-1]["rss_mb"] if rows else None
    peak5, peak_end = rss_at(rows, 300, "rss_peak_mb"), rows[-1].get("rss_peak_mb") if rows else None
    return {
        "url": a.url, "minutes": a.minutes, "concurrency": a.concurrency, "ratio": f"{a.ratio}:1" if a.ratio else "recommend only",
        "users": len(users), "machine": machine(),
        "answered": answered, "req_per_s": round(answered / (a.minutes * 60), 3),
        "req_per_s_between_answers": steady_rate(soak.answered_at),
        "recommend_p50_ms": round(percentile(lat, 0.5) * 1e3) if lat else None,
        "recommend_p99_ms": round(percentile(lat, 0.99) * 1e3) if lat else None,
        "errors": sum(r["errors"] for r in rows), "http_5xx": sum(r["http_5xx"] for r in rows),
        "http_429": sum(r["http_429"] for r in rows), "unexpected": dict(soak.unexpected),
        "bad_input_statuses": {str(k): v for k, v in soak.bad_statuses.items()},
        "retries_not_counted_as_duplicate": soak.retries_not_duplicate,
        "rss_mb_start": rows[0]["rss_mb"] if rows else None, "rss_mb_5min": rss5, "rss_mb_end": rss_end,
        "rss_end_over_5min": round(rss_end / rss5, 3) if rss5 and rss_end else None,
        "rss_peak_mb_5min": peak5, "rss_peak_mb_end": peak_end,
        "rss_peak_end_over_5min": round(peak_end / peak5, 3) if peak5 and peak_end else None,
        "rss_peak_mb_max": max((r["rss_peak_mb"] for r in rows if r.get("rss_peak_mb")), default=None),
        **res["verify"], "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--data", default="runs/ml-100k", help="prepared dataset: its users and catalogue items")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--ratio", type=int, default=4, help="/recommend requests per /interactions request (0: /recommend only)")
    ap.add_argument("--interval", type=float, default=20.0, help="seconds per sample")
    ap.add_argument("--bad-every", type=int, default=10, help="every N-th append is bad input (0: none)")
    ap.add_argument("--dup-every", type=int, default=10, help="every N-th append retries an acknowledged one")
    ap.add_argument("--pid", type=int, help="the server's process id (RSS from /proc); else from /metrics")
    ap.add_argument("--api-key")
    ap.add_argument("--wait-ready", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=100, help="events the store keeps per user (AUTOMR's cap)")
    ap.add_argument("--out", required=True, help="path prefix of the .csv, .png and .json written")
    a = ap.parse_args(argv)
    if a.concurrency < 1 or a.ratio < 0 or a.interval <= 0 or a.minutes <= 0:
        ap.error("--concurrency and --minutes must be positive, --ratio >= 0, --interval > 0")
    summary = asyncio.run(amain(a))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = summary.pop("rows")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out.with_suffix(".png"), f"soak: c = {a.concurrency}, {a.ratio}:1 recommend:append, "
                                        f"{summary['req_per_s']} req/s")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
