"""HTTP load benchmark of a running automr server (real HTTP client, closed loop).

In one run, against ``--url``:
  /recommend       for each mode (automr, bigrec, full-history) and each concurrency (1, 4, 16):
                   p50 / p99 latency and throughput (answered requests per second)
  /interactions    acknowledgement latency of single-event batches (fresh event ids) at concurrency
                   1 and 16, on users ``<prefix><run id>-<j>`` that are deleted at the end
and the ratios automr/bigrec p50, automr/full-history p50 (per concurrency) and the throughput of
the highest over the lowest concurrency per mode. With ``--mixed A,F`` also a mixed cell: A workers
send automr requests while F workers send full-history ones until the automr requests are done.
It measures how long prompts' prefills delay the short requests that share the model with them
(the priority between modes, ``AUTOMR_BACKGROUND_MODES``); ``mixed automr / automr p50`` compares it
with the automr-only cell at concurrency A, when there is one.

Users: ``--users FILE`` (one id per line) or ``--data DIR`` (a prepared dataset: the users of
``interactions.csv`` with more than 10 interactions). Before the cells, every selected user gets one
untimed automr request (``--no-prime`` to skip): it encodes the user's missing memory vectors, a
one-off cost (reported as ``prime``) that would otherwise land in whichever cell meets the user first.
Each cell then sends ``--warmup`` untimed and ``--requests`` timed requests with C workers; a worker
that gets 429 sleeps Retry-After (at most ``--max-429-sleep``) before its next request: 429s are
counted, never retried, and never crash the bench.

    python bench/bench_load.py --url http://127.0.0.1:8000 --data runs/ml-100k --requests 50 --json load.json

The API key comes from ``--api-key`` or ``AUTOMR_API_KEY``; it is never written to the JSON.

The client is aiohttp, not httpx: at concurrency 16 on the 2-core machine, httpx's connection pool
spent so much CPU that it measured itself (GET /healthz, which touches nothing: p99 150-200 ms and
~450 req/s with httpx against 6 ms and ~4,800 req/s with aiohttp; docs/BENCHMARKS.md §4.1).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import platform
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp

MIN_INTERACTIONS = 10  # users with more than this many stored interactions (memory beyond K=10)
MODES = ("automr", "bigrec", "full-history")


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  # catalogue item ids for the appends (else from histories)
    api_key: str | None = None
    modes: tuple[str, ...] = MODES
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 50  # timed requests per /recommend cell
    warmup: int = 2  # untimed requests per cell, before the timed ones
    prime: bool = True  # one untimed automr request per user first (encodes missing memory vectors)
    k: int = 10
    append_concurrency: tuple[int, ...] = (1, 16)
    append_requests: int = 200  # timed single-event appends per cell
    bench_prefix: str = "bench-"
    bench_users: int = 16  # appends go round-robin to this many fresh bench users
    timeout_s: float = 300.0  # per request
    wait_ready_s: float = 0.0  # poll /readyz this long before giving up
    max_429_sleep_s: float = 1.0
    mixed: tuple[int, ...] = ()  # (automr workers, full-history workers) of the mixed cell; () = none

    def __post_init__(self) -> None:
        for name in ("requests", "append_requests", "bench_users", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        levels = (*self.concurrency, *self.append_concurrency)
        if not self.concurrency or not self.append_concurrency or min(levels) < 1:
            raise ValueError("concurrency levels must be positive integers")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")


# ---- users and items --------------------------------------------------------------------------------

def users_from_file(path: Path) -> list[str]:
    """One user id per line; blank lines and lines starting with '#' are skipped."""
    users = [line.strip() for line in Path(path).read_text().splitlines()]
    users = [u for u in users if u and not u.startswith("#")]
    if not users:
        raise ValueError(f"{path}: no user ids (one per line)")
    return users


def users_from_dataset(data_dir: Path, min_interactions: int = MIN_INTERACTIONS) -> list[str]:
    """Users of ``data_dir/interactions.csv`` with more than ``min_interactions`` rows, sorted."""
    path = Path(data_dir) / "interactions.csv"
    counts: Counter[str] = Counter()
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "user_id" not in header:
            raise ValueError(f"{path}: line 1 must be a header with a user_id column, got {header}")
        col = header.index("user_id")
        for lineno, row in enumerate(reader, start=2):
            if len(row) <= col:
                raise ValueError(f"{path}: line {lineno} has {len(row)} columns, expected at least {col + 1}")
            counts[row[col]] += 1
    users = sorted(u for u, n in counts.items() if n > min_interactions)
    if not users:
        raise ValueError(f"{path}: no user has more than {min_interactions} interactions")
    return users


def items_from_dataset(data_dir: Path) -> list[str]:
    path = Path(data_dir) / "items.jsonl"
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    items.append(str(json.loads(line)["item_id"]))
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{path}: line {lineno}: not a JSON object with item_id ({e})") from None
    return items


# ---- statistics -------------------------------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty list."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


@dataclass
class Cell:
    """What one cell (one endpoint/mode at one concurrency) measured."""

    concurrency: int
    requests: int
    latencies_s: list[float] = field(default_factory=list)  # of 200 answers only
    statuses: Counter = field(default_factory=Counter)
    exceptions: Counter = field(default_factory=Counter)
    anomalies: Counter = field(default_factory=Counter)  # 200s that are not what was asked (see checks)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = len(self.latencies_s)
        lat = self.latencies_s
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": ok,
            "status_429": self.statuses.get(429, 0),
            "errors": {str(s): n for s, n in sorted(self.statuses.items()) if s not in (200, 429)},
            "exceptions": dict(self.exceptions),
            "anomalies": dict(self.anomalies),
            "p50_ms": round(1e3 * percentile(lat, 0.50), 2) if lat else None,
            "p99_ms": round(1e3 * percentile(lat, 0.99), 2) if lat else None,
            "mean_ms": round(1e3 * sum(lat) / ok, 2) if lat else None,
            "throughput_rps": round(ok / self.wall_s, 3) if self.wall_s > 0 else None,
            "wall_s": round(self.wall_s, 6),
        }


Request = tuple[str, str, dict | None]  # method, path, JSON body
Check = Callable[[dict], str | None]  # a 200's body -> an anomaly name, or None


@dataclass
class Reply:
    """A whole HTTP answer (read before the connection goes back to the pool)."""

    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


# what a request can raise instead of answering: counted per cell by type name, never fatal
CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class HttpClient:
    """The bench's HTTP client: one aiohttp session (keep-alive pool of ``connections``), created on
    the first request inside the running event loop."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 300.0,
                 connections: int = 20):
        self.base_url = base_url.rstrip("/")
        self.headers = dict(headers or {})
        self.timeout_s = timeout_s
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, path: str, json: Any = None) -> Reply:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.connections))
        async with self._session.request(method, self.base_url + path, json=json) as r:
            return Reply(r.status, dict(r.headers), await r.read())

    async def get(self, path: str) -> Reply:
        return await self.request("GET", path)

    async def post(self, path: str, json: Any = None) -> Reply:
        return await self.request("POST", path, json)

    async def delete(self, path: str) -> Reply:
        return await self.request("DELETE", path)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _send(client: HttpClient, req: Request) -> Reply:
    method, path, body = req
    return await client.request(method, path, json=body)


async def run_cell(client: HttpClient, concurrency: int, n: int, make: Callable[[int], Request],
                   warmup: int = 0, check: Check | None = None, max_429_sleep_s: float = 1.0,
                   stop: asyncio.Event | None = None) -> Cell:
    """``warmup`` untimed then ``n`` timed requests ``make(0..n-1)``, ``concurrency`` workers in a closed
    loop; once ``stop`` is set, the workers send no new request (those in flight are still timed)."""
    cell = Cell(concurrency=concurrency, requests=n)

    async def work(next_index: Callable[[], int | None], record: bool) -> None:
        while (i := next_index()) is not None:
            t0 = time.perf_counter()
            try:
                r = await _send(client, make(i))
            except CLIENT_ERRORS as e:  # timeouts, refused connections, protocol errors: counted
                if record:
                    cell.exceptions[type(e).__name__] += 1
                continue
            took = time.perf_counter() - t0
            if not record:
                continue
            cell.statuses[r.status_code] += 1
            if r.status_code == 200:
                cell.latencies_s.append(took)
                anomaly = check(r.json()) if check is not None else None
                if anomaly:
                    cell.anomalies[anomaly] += 1
            elif r.status_code == 429:
                await asyncio.sleep(min(max_429_sleep_s, _retry_after(r)))

    def counter(start: int, end: int) -> Callable[[], int | None]:
        it = iter(range(start, end))
        return lambda: None if stop is not None and stop.is_set() else next(it, None)

    if warmup:
        nxt = counter(n, n + warmup)  # indices past the timed ones: warm-up requests are not repeated
        await asyncio.gather(*(work(nxt, record=False) for _ in range(min(concurrency, warmup))))
    nxt = counter(0, n)
    t0 = time.perf_counter()
    await asyncio.gather(*(work(nxt, record=True) for _ in range(min(concurrency, n))))
    cell.wall_s = time.perf_counter() - t0
    return cell


def _retry_after(r: Reply) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


# ---- the benchmark ----------------------------------------------------------------------------------

async def wait_ready(client: HttpClient, wait_s: float) -> dict:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = await client.get("/readyz")
            if r.status_code == 200:
                return r.json()
            reason = f"{r.status_code} {r.text[:200]}"
        except CLIENT_ERRORS as e:
            reason = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise SystemExit(f"the server at {client.base_url} is not ready: {reason}")
        await asyncio.sleep(0.5)


async def preflight(client: HttpClient, user: str) -> None:
    """One request before measuring: a wrong URL or a missing API key must not become a table of errors."""
    r = await client.post("/recommend", json={"user_id": user, "k": 1, "mode": "bigrec"})
    if r.status_code in (401, 403):
        raise SystemExit(f"{r.status_code} from POST /recommend: pass --api-key (or AUTOMR_API_KEY)")
    if r.status_code not in (200, 429, 503):
        raise SystemExit(f"POST /recommend for user {user!r} answered {r.status_code}: {r.text[:300]}")


async def items_from_histories(client: HttpClient, users: list[str]) -> list[str]:
    items: dict[str, None] = {}
    for u in users[:5]:
        r = await client.get(f"/users/{u}/history")
        if r.status_code == 200:
            items.update((e["item_id"], None) for e in r.json()["events"])
    if not items:
        raise SystemExit("no catalogue item ids for the appends: pass --data DIR (items.jsonl) "
                         "or users with a stored history")
    return list(items)


def recommend_check(mode: str) -> Check:
    def check(body: dict) -> str | None:
        if body.get("fallback"):
            return "fallback_" + str(body["fallback"])  # the user had no usable history
        if body.get("mode") != mode:
            return f"mode_{body.get('mode')}"
        return None

    return check


async def run_bench(cfg: BenchConfig, client: HttpClient | None = None) -> dict[str, Any]:
    """Run every cell; returns the results (``main`` prints and writes them). ``client``: tests."""
    if not cfg.users:
        raise ValueError("no users to benchmark")
    own = client is None
    if own:
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        top = max(*cfg.concurrency, *cfg.append_concurrency)
        client = HttpClient(cfg.url, headers=headers, timeout_s=cfg.timeout_s, connections=top + 4)
    out: dict[str, Any] = {}
    run_id = uuid.uuid4().hex[:8]
    bench_users = [f"{cfg.bench_prefix}{run_id}-{j}" for j in range(cfg.bench_users)]
    try:
        out["server"] = await wait_ready(client, cfg.wait_ready_s)
        version = await client.get("/version")  # model version and settings (dtype, cut layer, batching)
        out["version"] = version.json() if version.status_code == 200 else None
        await preflight(client, cfg.users[0])
        items = cfg.items or await items_from_histories(client, cfg.users)
        users = cfg.users

        if cfg.prime and "automr" in cfg.modes:
            top = max(cfg.concurrency)
            prime = await run_cell(client, top, len(users), lambda i: ("POST", "/recommend",
                                   {"user_id": users[i], "k": cfg.k, "mode": "automr"}),
                                   max_429_sleep_s=cfg.max_429_sleep_s)
            out["prime"] = prime.summary()
            _print_row("(prime)", out["prime"])

        out["recommend"] = {}
        for mode in cfg.modes:
            out["recommend"][mode] = {}
            for c in cfg.concurrency:
                def make(i: int, mode: str = mode) -> Request:
                    return "POST", "/recommend", {"user_id": users[i % len(users)], "k": cfg.k, "mode": mode}

                cell = await run_cell(client, c, cfg.requests, make, warmup=cfg.warmup,
                                      check=recommend_check(mode), max_429_sleep_s=cfg.max_429_sleep_s)
                out["recommend"][mode][str(c)] = cell.summary()
                _print_row(mode, cell.summary())

        if cfg.mixed:
            out["mixed"] = await run_mixed(client, cfg, users)

        out["append"] = {}
        base_ts = int(time.time())
        for c in cfg.append_concurrency:
            def make_event(i: int, c: int = c) -> Request:
                return "POST", "/interactions", {"events": [{
                    "user_id": bench_users[i % len(bench_users)], "item_id": items[i % len(items)],
                    "timestamp": base_ts + i, "event_id": f"{cfg.bench_prefix}{run_id}-c{c}-{i}"}]}

            def added_one(body: dict) -> str | None:
                return None if body.get("added") == 1 else f"added_{body.get('added')}"

            cell = await run_cell(client, c, cfg.append_requests, make_event, warmup=cfg.warmup,
                                  check=added_one, max_429_sleep_s=cfg.max_429_sleep_s)
            out["append"][str(c)] = cell.summary()
            _print_row("append", cell.summary())
    finally:
        deleted = 0
        for u in bench_users:  # also after an error or Ctrl-C: never leave bench users behind
            try:
                r = await client.delete(f"/users/{u}")
                deleted += r.status_code == 204
            except CLIENT_ERRORS:
                pass
        out["cleanup"] = {"bench_users": len(bench_users), "deleted": deleted, "prefix": f"{cfg.bench_prefix}{run_id}-"}
        if own:
            await client.aclose()
    out["ratios"] = ratios(out, cfg)
    return out


async def run_mixed(client: HttpClient, cfg: BenchConfig, users: list[str]) -> dict[str, Any]:
    """``cfg.requests`` timed automr requests from ``cfg.mixed[0]`` workers while ``cfg.mixed[1]``
    workers send full-history requests (from the same users, other ones at a time) until they are done."""
    n_short, n_long = cfg.mixed
    done = asyncio.Event()

    def make(mode: str, shift: int) -> Callable[[int], Request]:
        return lambda i: ("POST", "/recommend", {"user_id": users[(i + shift) % len(users)], "k": cfg.k, "mode": mode})

    longs = asyncio.ensure_future(run_cell(client, n_long, 1 << 30, make("full-history", len(users) // 2),
                                           check=recommend_check("full-history"),
                                           max_429_sleep_s=cfg.max_429_sleep_s, stop=done))
    try:
        await asyncio.sleep(0)  # the long workers send first
        short = await run_cell(client, n_short, cfg.requests, make("automr", 0), warmup=cfg.warmup,
                               check=recommend_check("automr"), max_429_sleep_s=cfg.max_429_sleep_s)
    finally:
        done.set()
    long_cell = await longs
    long_cell.requests = sum(long_cell.statuses.values()) + sum(long_cell.exceptions.values())
    res = {"automr": short.summary(), "full-history": long_cell.summary()}
    _print_row("mixed automr", res["automr"])
    _print_row("mixed full-h.", res["full-history"])
    return res


def ratios(out: dict, cfg: BenchConfig) -> dict[str, Any]:
    """automr/bigrec and automr/full-history p50 per concurrency; throughput c_max/c_min per mode and for appends."""
    rec = out.get("recommend", {})

    def div(a, b):
        return round(a / b, 3) if a is not None and b else None

    res: dict[str, Any] = {}
    for other in ("bigrec", "full-history"):
        if "automr" in rec and other in rec:
            res[f"automr/{other} p50"] = {c: div(rec["automr"][c]["p50_ms"], rec[other][c]["p50_ms"])
                                          for c in rec["automr"]}
    lo, hi = str(min(cfg.concurrency)), str(max(cfg.concurrency))
    res[f"throughput c{hi}/c{lo}"] = {m: div(rec[m][hi]["throughput_rps"], rec[m][lo]["throughput_rps"]) for m in rec}
    app = out.get("append", {})
    alo, ahi = str(min(cfg.append_concurrency)), str(max(cfg.append_concurrency))
    if alo in app and ahi in app:
        res[f"append throughput c{ahi}/c{alo}"] = div(app[ahi]["throughput_rps"], app[alo]["throughput_rps"])
    mixed, alone = out.get("mixed"), rec.get("automr", {}).get(str(cfg.mixed[0]) if cfg.mixed else "")
    if mixed and alone:
        res["mixed automr / automr p50"] = div(mixed["automr"]["p50_ms"], alone["p50_ms"])
        res["mixed automr / automr p99"] = div(mixed["automr"]["p99_ms"], alone["p99_ms"])
    return res


# ---- output -----------------------------------------------------------------------------------------

HEADER = f"{'what':<14}{'conc':>5}{'ok/req':>10}{'429':>6}{'other':>7}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>9}"


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _print_row(what: str, s: dict) -> None:
    other = sum(s["errors"].values()) + sum(s["exceptions"].values())
    print(f"{what:<14}{s['concurrency']:>5}{str(s['ok']) + '/' + str(s['requests']):>10}{s['status_429']:>6}{other:>7}"
          f"{_fmt(s['p50_ms']):>10}{_fmt(s['p99_ms']):>10}{_fmt(s['throughput_rps'], 2):>9}", flush=True)


def cpu_model() -> dict[str, Any]:
    """The CPU's model name and whether it has native bfloat16 (figures differ a lot between CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or None, "native_bf16": None}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
            "avx512": any(f.startswith("avx512") for f in flags)}


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
            "processor": platform.processor(), "python": platform.python_version(), "loadavg_at_start": load}


def redacted_argv(argv: list[str]) -> list[str]:
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a == "--api-key":
            out.append(a)
            hide = True
        elif a.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(a)
    return out


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=os.environ.get("AUTOMR_API_KEY"), help="default: $AUTOMR_API_KEY")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--users", type=Path, help="file of user ids, one per line")
    src.add_argument("--data", type=Path, help="prepared dataset dir: users with > 10 rows in interactions.csv")
    ap.add_argument("--n-users", type=int, default=16, help="users sampled from the eligible ones (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="of the user sample")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--concurrency", type=_ints, default=(1, 4, 16))
    ap.add_argument("--requests", type=int, default=50, help="timed requests per /recommend cell")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per cell")
    ap.add_argument("--no-prime", action="store_true", help="skip the untimed automr request per user")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--append-concurrency", type=_ints, default=(1, 16))
    ap.add_argument("--append-requests", type=int, default=200, help="timed single-event appends per cell")
    ap.add_argument("--bench-prefix", default="bench-", help="user id prefix of the append users (deleted at the end)")
    ap.add_argument("--bench-users", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--wait-ready", type=float, default=0.0, help="seconds to wait for /readyz 200")
    ap.add_argument("--max-429-sleep", type=float, default=1.0)
    ap.add_argument("--mixed", type=_ints, default=(), metavar="A,F",
                    help="also a mixed cell: A automr workers while F full-history workers run (default: none)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.users:
        users = users_from_file(args.users)
        items: list[str] = []
    else:
        users = users_from_dataset(args.data)
        items = items_from_dataset(args.data)
    eligible = len(users)
    if args.n_users < len(users):
        users = sorted(random.Random(args.seed).sample(users, args.n_users))
    cfg = BenchConfig(
        url=args.url, users=users, items=items, api_key=args.api_key,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), concurrency=args.concurrency,
        requests=args.requests, warmup=args.warmup, prime=not args.no_prime, k=args.k,
        append_concurrency=args.append_concurrency, append_requests=args.append_requests,
        bench_prefix=args.bench_prefix, bench_users=args.bench_users, timeout_s=args.timeout,
        wait_ready_s=args.wait_ready, max_429_sleep_s=args.max_429_sleep, mixed=args.mixed,
    )
    if cfg.mixed and (len(cfg.mixed) != 2 or min(cfg.mixed) < 1):
        raise SystemExit(f"--mixed takes two worker counts >= 1 (automr,full-history), got {list(cfg.mixed)}")
    started = time.time()
    print(f"{args.url}: {len(users)} users (of {eligible} eligible), {cfg.requests} requests/cell "
          f"(+{cfg.warmup} warm-up), concurrency {list(cfg.concurrency)}, appends {cfg.append_requests}/cell "
          f"at {list(cfg.append_concurrency)}")
    print(HEADER)
    res = asyncio.run(run_bench(cfg))
    for name, val in res["ratios"].items():
        print(f"{name}: {json.dumps(val)}")
    print(f"bench users deleted: {res['cleanup']['deleted']}/{res['cleanup']['bench_users']}")
    config = {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "items")}
    config.update(api_key_set=bool(cfg.api_key), n_users=len(users), eligible_users=eligible, n_items=len(items))
    command = redacted_argv([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    report = {"machine": machine(), "command": command,
              "started_at": started, "seconds": round(time.time() - started, 2), "config": config, **res}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
