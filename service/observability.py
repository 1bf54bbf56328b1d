"""What the service tells its operators: Prometheus metrics, structured logs with a request id, and
the ``/version`` document.

    Metrics(state)                      one per app, on its own ``CollectorRegistry``
    ObservabilityMiddleware(app, ...)   pure ASGI: request id, access log, request metrics, last-resort 500
    install_json_logging(level)         one JSON object per line on stderr; returns the undo function
    version_info(state)                 GET /version

The request id is taken from the ``X-Request-ID`` request header when it is 1..128 visible ASCII
characters, else a fresh uuid4 hex; it is echoed in the ``X-Request-ID`` response header of every
response (errors included) and is in every log record of the request (``request_id_var``, a
ContextVar: ``UserService._io`` copies it to the Redis threads).

The metrics middleware is the outermost layer: it sees the 401/413 answers of the security
middleware and answers unexpected exceptions itself (500 ``internal_error``), so that those too carry
the request id and are counted.
"""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, TextIO

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from starlette.datastructures import MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import serve_env
from service.cpu_budget import thread_plan
from service.errors import ERROR_SCOPE_KEY, internal_error

log = logging.getLogger(__name__)
access_log = logging.getLogger("automr.access")

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_REQUEST_ID_CHARS)  # visible ASCII, no spaces
request_id_var: ContextVar[str | None] = ContextVar("automr_request_id", default=None)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"  # endpoint label of a path no route matches (keeps the label set bounded)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


# ---- request id ---------------------------------------------------------------------------------------


def request_id_from(value: str | None) -> str:
    """The client's id when it is acceptable (1..128 visible ASCII characters), else a new uuid4 hex."""
    if value is not None and _REQUEST_ID_RE.fullmatch(value):
        return value
    return uuid.uuid4().hex


# ---- structured logs ----------------------------------------------------------------------------------

# LogRecord attributes copied into the JSON object when a call passes them in ``extra=``
_EXTRA_FIELDS = ("method", "path", "endpoint", "status", "duration_ms", "error")


class RequestIdFilter(logging.Filter):
    """Puts the current request id (or None) on every record as ``record.request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "request_id", [method, path, status, duration_ms, ...], [exc]}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key in _EXTRA_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (test runners swap it)."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def install_json_logging(level: str = "info", stream: TextIO | None = None) -> Callable[[], None]:
    """Route every log record (uvicorn's included) to one JSON handler on the root logger; returns a
    function that restores the previous configuration (the app calls it at shutdown).

    A plain stderr/stdout ``StreamHandler`` already on the root (``logging.basicConfig``) is taken off
    so lines are not printed twice; other handlers (files, test capture) stay. uvicorn's access log is
    switched off: the middleware writes one access line per request, with the request id."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    handler.setLevel(level.upper())
    removed = [h for h in root.handlers
               if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stderr, sys.stdout)]
    saved_level = root.level
    uvicorn_saved = {name: (list(lg.handlers), lg.propagate, lg.disabled)
                     for name in ("uvicorn", "uvicorn.error", "uvicorn.access") for lg in [logging.getLogger(name)]}
    for h in removed:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = [], True
    logging.getLogger("uvicorn.access").disabled = True

    def undo() -> None:
        root.removeHandler(handler)
        for h in removed:
            root.addHandler(h)
        root.setLevel(saved_level)
        for name, (handlers, propagate, disabled) in uvicorn_saved.items():
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate, lg.disabled = handlers, propagate, disabled

    return undo


# ---- metrics ------------------------------------------------------------------------------------------


class Metrics:
    """The app's Prometheus metrics, on a registry of its own (several apps in one process don't clash).

    Model metrics come from the runner's listener (``runner.add_listener(fn(kind, size, seconds))``),
    hooked by ``bind`` as soon as the loader has built the runner; gauges are read at scrape time."""

    def __init__(self, state: Any = None):
        self.state = state
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds (Linux)
        self.requests = Counter("automr_http_requests", "HTTP requests answered, by route template, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("automr_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("automr_http_errors", "Error responses by their `error` code",
                              ["endpoint", "error"], registry=r)
        self.in_flight = Gauge("automr_http_requests_in_flight", "HTTP requests being answered", registry=r)
        self.redis_errors = Counter("automr_redis_errors", "Requests that failed because Redis was unavailable "
                                    "(503 store_unavailable)", registry=r)
        self.batch_size = Histogram("automr_model_batch_size", "Requests (recommend: per admission's prefills; ground: per grounding pass), rows "
                                    "(prefill_chunk: per prefill forward, whole or one chunk) or windows (encode) per model call",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.model_seconds = Histogram("automr_model_call_seconds", "Wall time of one model call",
                                       ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("automr_model_queue_depth", "Requests waiting for the model (not yet in a model call)",
              registry=r).set_function(self._queue_depth)
        Gauge("automr_encoder_queue_size", "Users waiting for background memory encoding",
              registry=r).set_function(self._encoder_queue)
        Gauge("automr_encoder_lag_seconds", "Age of the oldest user waiting for background memory encoding "
              "(0 when idle)", registry=r).set_function(self._encoder_lag)
        memo = Gauge("automr_ground_memo_texts", "Answers grounded since start, by where their embedding came "
                     "from: a catalogue title's index row, a remembered recent answer, or a new forward",
                     ["source"], registry=r)
        for source, attr in (("catalogue", "catalogue_hits"), ("recent", "recent_hits"), ("embedded", "embedded")):
            memo.labels(source).set_function(lambda attr=attr: self._ground_memo(attr))
        background = Gauge("automr_background_prefill_seconds", "Model time of background prefills (the "
                           "modes of AUTOMR_BACKGROUND_MODES, or a request's \"priority\") since start: "
                           "beside other live work (within AUTOMR_BACKGROUND_SHARE) or alone", ["state"], registry=r)
        for state in ("beside_others", "alone"):
            background.labels(state).set_function(lambda state=state: self._background(state))
        Gauge("automr_ready", "1 once the model, index and store are loaded", registry=r).set_function(
            lambda: 1.0 if getattr(self.state, "ready", False) else 0.0)
        self._runner: Any = None

    # ---- the runner and the encoder (read defensively: they appear when loading finishes) --------------

    def bind(self, state: Any = None) -> None:
        """Hook the listener into the state's runner once it exists (cheap when already done)."""
        runner = getattr(state or self.state, "runner", None)
        if runner is None or runner is self._runner:
            return
        self._runner = runner
        add = getattr(runner, "add_listener", None)
        if add is not None:
            add(self.on_model_call)

    def on_model_call(self, kind: str, size: int, seconds: float) -> None:
        """The runner's listener (called on its worker thread; prometheus_client is thread-safe)."""
        self.batch_size.labels(kind).observe(size)
        self.model_seconds.labels(kind).observe(seconds)

    def _queue_depth(self) -> float:
        depth = getattr(getattr(self.state, "runner", None), "queue_depth", None)
        return float(depth()) if callable(depth) else 0.0

    def _encoder_queue(self) -> float:
        queue = getattr(getattr(self.state, "encoder", None), "queue", None)
        return float(queue.qsize()) if queue is not None else 0.0

    def _encoder_lag(self) -> float:
        lag = getattr(getattr(self.state, "encoder", None), "lag_s", None)
        return float(lag()) if callable(lag) else 0.0

    def _background(self, state: str) -> float:
        seconds = getattr(getattr(self.state, "runner", None), "background_seconds", None)
        return float(seconds.get(state, 0.0)) if isinstance(seconds, dict) else 0.0

    def _ground_memo(self, attr: str) -> float:
        pipeline = getattr(getattr(self.state, "runner", None), "pipeline", None)
        memo = getattr(pipeline, "ground_memo_built", None)  # None: not built (or off), nothing grounded
        return float(getattr(memo, attr, 0))

    # ---- requests --------------------------------------------------------------------------------------

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float, error: str | None) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)
        if error is not None:
            self.errors.labels(endpoint, error).inc()
            if error == "store_unavailable":
                self.redis_errors.inc()

    def render(self) -> bytes:
        self.bind()
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The path template of the route that matches (``/users/{user_id}/history``), else ``unmatched``."""
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", None) or []
    partial = None
    for route in routes:
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route that cannot judge this scope
            continue
        if match == Match.FULL:
            return getattr(route, "path", UNMATCHED)
        if match == Match.PARTIAL and partial is None:  # the path matches, the method does not (405)
            partial = getattr(route, "path", None)
    return partial or UNMATCHED


class ObservabilityMiddleware:
    """Request id, access log line, request metrics; a last-resort JSON 500 for unexpected exceptions."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        raw = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        rid = request_id_from(raw.decode("latin-1") if raw is not None else None)
        token = request_id_var.set(rid)
        self.metrics.bind()
        self.metrics.in_flight.inc()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status is not None:  # too late for an error response: let the server drop the connection
                raise
            await internal_error(exc, scope)(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            self.metrics.in_flight.dec()
            endpoint = route_template(scope)
            final = status if status is not None else 500
            method = scope.get("method", "")
            self.metrics.observe_request(endpoint, method, final, seconds, scope.get(ERROR_SCOPE_KEY))
            access_log.info("%s %s %s %.1fms", method, scope.get("path"), final, seconds * 1e3, extra={
                "method": method, "path": scope.get("path"), "endpoint": endpoint, "status": final,
                "duration_ms": round(seconds * 1e3, 2), "error": scope.get(ERROR_SCOPE_KEY)})
            request_id_var.reset(token)


# ---- /version -----------------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """``AUTOMR_GIT_SHA`` (set by the image build), else ``git rev-parse HEAD`` of the source tree
    (run once per process), else None. Never raises."""
    return os.environ.get("AUTOMR_GIT_SHA", "").strip() or _git_rev_parse()


@lru_cache(maxsize=1)
def _git_rev_parse() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", sha) else None


def package_version() -> str:
    return _dist_version("automr") or "0+unknown"


def threads_info(torch_threads: int | None, governor: Any = None, row_split: Any = None) -> dict:
    """The model's thread pools as torch reports them, beside the CPU budget they were sized from and,
    with the adaptive governor, the count the model thread runs now and the CPU share it last saw."""
    import torch

    plan = thread_plan(torch_threads)
    out = {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
           "planned": plan.intra_op, "source": plan.source, "cpu_budget": plan.budget.as_dict()}
    if governor is not None:
        out["adaptive"] = {"now": governor.threads, "cpu_share": governor.last_share, "changes": governor.changes}
    if row_split is not None:
        out["row_split"] = {"workers": row_split.workers, "min_tokens": row_split.min_tokens,
                            "active": row_split.active}
    return out


def version_info(state: Any) -> dict:
    """What is running: package, model, commit, runtimes and the settings that change the answers.
    The model settings are the effective ones once loaded (injected components may differ from the
    environment's), the configured ones before (``null`` = decided at load time)."""
    s = state.settings
    users, comps = state.users, state.components
    model: dict[str, Any] = {"cut_layer": s.cut_layer, "dtype": s.dtype, "slot_policy": s.slot_policy,
                             "memory_element": s.memory_element, "k_short": None}
    if comps is not None:
        lm = comps.pipeline.lm
        model.update(cut_layer=lm.cut, dtype=str(lm.dtype).removeprefix("torch."),
                     memory_element=comps.pipeline.element, k_short=comps.pipeline.k_short)
    if users is not None:
        model["slot_policy"] = users.slot_policy
        model["memory_fingerprint"] = users.fingerprint
    return {
        "version": package_version(),
        "model_version": comps.model_version if comps is not None else None,
        "dataset": comps.dataset_name if comps is not None else s.dataset,
        "git_sha": git_sha(),
        "ready": state.ready,
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "transformers": _dist_version("transformers"),
        "threads": threads_info(s.torch_threads, state.runner.governor if state.runner is not None else None,
                                state.runner.pipeline.lm.row_split if state.runner is not None else None),
        "process": serve_env.describe(),
        "settings": {
            **model,
            "max_new_tokens": s.max_new_tokens, "num_beams": s.generation()["num_beams"], "constrained": s.constrained,
            "popularity_gamma": s.popularity_gamma, "popularity_mix": s.popularity_mix,
            "batch_max_size": s.batch_max_size, "batch_max_wait_ms": s.batch_max_wait_ms,
            "ground_max_wait_ms": s.ground_max_wait_ms, "max_queue": s.max_queue,
            "prefill_max_tokens": s.prefill_max_tokens,
            "background_modes": list(s.background_modes), "background_share": s.background_share,
            "background_chunk_tokens": s.background_chunk_tokens,
            "draft_tokens": s.draft_tokens, "draft_max_rows": s.draft_max_rows, "draft_learn": s.draft_learn,
            "ground_memo": s.ground_memo, "ground_memo_recent": s.ground_memo_recent,
            "max_body_bytes": s.max_body_bytes, "api_key_required": s.api_key is not None,
            "keep_alive_s": s.keep_alive_s,
        },
    }
