"""The HTTP API of automr (docs/SERVICE.md): FastAPI over the users-and-memory service (``service/users.py``).

    create_app(settings, components=None, store=None) -> FastAPI

``components`` (a ``Components`` or a callable returning one) and ``store`` (a ``MemoryStore``) are
injected by tests; by default both come from the settings (artefacts, prepared dataset, REDIS_URL).
Run it with ``automr serve`` (uvicorn).

Layers, outermost first: ``ObservabilityMiddleware`` (request id, access log, metrics, last-resort
500), ``SecurityMiddleware`` (API key, body limit), then FastAPI's exception handlers
(``service/errors.py``) around the routes below.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from memory_store import MemoryStore
from memory_store.keys import MAX_USER_ID_CHARS, check_text
from service.errors import ApiError, error_doc, error_response, install_error_handlers, not_ready
from service.observability import (
    METRICS_CONTENT_TYPE,
    Metrics,
    ObservabilityMiddleware,
    git_sha,
    install_json_logging,
    package_version,
    version_info,
)
from service.schemas import HistoryOut, InteractionsIn, InteractionsOut, RecommendIn, RecommendOut
from service.security import OPEN_PATHS, SecurityMiddleware
from service.settings import Settings
from service.state import AppState, ComponentsSource

log = logging.getLogger(__name__)

# OpenAPI documentation of the error statuses (every one has the body {"error", "detail"})
E400 = {400: error_doc("`malformed_json`: the body is not valid JSON")}
E401 = {401: error_doc("`unauthorized`: missing or wrong `Authorization: Bearer <key>` (only when AUTOMR_API_KEY is set)")}
E404 = {404: error_doc("`unknown_user`")}
E413 = {413: error_doc("`body_too_large` (AUTOMR_MAX_BODY_BYTES) or `batch_too_large` (AUTOMR_MAX_BATCH_EVENTS)")}
E422 = {422: error_doc("`validation_error`, `unknown_item`, `invalid_user_id`, `mode_unavailable`")}
E429 = {429: error_doc("`overloaded`: the model queue is full (AUTOMR_MAX_QUEUE); `Retry-After` says when to retry")}
E503 = {503: error_doc("`not_ready` (loading), `store_unavailable` (Redis down) or `shutting_down`; `Retry-After` set")}
BEARER_SCHEME = "bearerAuth"


def _user_id(user_id: str) -> str:
    try:
        return check_text(user_id, "user_id", MAX_USER_ID_CHARS)
    except ValueError as e:
        raise ApiError(422, "invalid_user_id", str(e)) from None


def create_app(settings: Settings | None = None, components: ComponentsSource = None,
               store: MemoryStore | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings, components, store)
    metrics = Metrics(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # after uvicorn configured its loggers, so that its lines are JSON too (undone at shutdown)
        undo_logging = install_json_logging(settings.log_level) if settings.log_json else None
        state.start(asyncio.get_running_loop())  # loads in the background: the server listens at once
        try:
            yield
        finally:
            await state.stop()
            if undo_logging is not None:
                undo_logging()

    app = FastAPI(title="automr", version=package_version(), lifespan=lifespan,
                  description="LLM-based generative recommendation with a learned long-term memory (AutoMR on BIGRec)")
    app.state.automr = state
    app.state.metrics = metrics
    install_error_handlers(app)
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app.add_middleware(SecurityMiddleware, api_key=api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # added last: the outermost layer
    if api_key is not None:
        _document_bearer(app)

    def users():
        if state.users is None:
            raise not_ready(state.error if state.phase == "failed" else f"the service is {state.phase}")
        return state.users

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is up (always 200)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=E503)
    async def readyz(request: Request) -> JSONResponse:
        """200 once the model, index and store are loaded; 503 ``not_ready`` before."""
        if not state.ready:
            detail = state.error if state.phase == "failed" else (
                f"the service is {state.phase}" + (f" ({state.error})" if state.error else ""))
            return error_response(503, "not_ready", detail, {"Retry-After": "5"}, request.scope)
        return JSONResponse(state.status())

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (open even when an API key is set: no user data, route templates only)."""
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/version", responses=E401)
    async def version() -> dict:
        """Package, model and git versions, runtimes, and the settings that change the answers."""
        await asyncio.to_thread(git_sha)  # cached; `git rev-parse` at most once, off the event loop
        return version_info(state)

    @app.post("/recommend", response_model=RecommendOut, responses={**E400, **E401, **E413, **E422, **E429, **E503})
    async def recommend(body: RecommendIn) -> RecommendOut:
        """Top-k items for a user from the stored context and memory (or ``recent_items``)."""
        return await users().recommend(body)

    @app.post("/interactions", response_model=InteractionsOut, responses={**E400, **E401, **E413, **E422, **E503})
    async def interactions(body: InteractionsIn) -> InteractionsOut:
        """Store a batch of events (all or nothing); answered once they are in Redis."""
        return await users().append(body.events)

    @app.get("/users/{user_id}/history", response_model=HistoryOut, responses={**E401, **E404, **E422, **E503})
    async def history(user_id: str) -> HistoryOut:
        """The user's stored events, oldest first, with titles (404 ``unknown_user`` if none)."""
        return await users().history(_user_id(user_id))

    @app.delete("/users/{user_id}", status_code=204, responses={**E401, **E422, **E503})
    async def delete_user(user_id: str) -> Response:
        """Erase every stored event and memory vector of the user. Idempotent: 204 also when nothing was stored."""
        await users().delete(_user_id(user_id))
        return Response(status_code=204)

    return app


def _document_bearer(app: FastAPI) -> None:
    """Add the bearer scheme to the OpenAPI document and require it on every protected operation."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = {
                "type": "http", "scheme": "bearer", "description": "AUTOMR_API_KEY"}
            for path, operations in schema.get("paths", {}).items():
                if path not in OPEN_PATHS:
                    for op in operations.values():
                        op["security"] = [{BEARER_SCHEME: []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """For ``uvicorn service.app:app_from_env --factory``."""
    return create_app(Settings())
