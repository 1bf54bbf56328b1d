"""The HTTP API of automr (docs/SERVICE.md): FastAPI over the engine.

    create_app(settings, components=None, store=None) -> FastAPI

``components`` (a ``Components`` or a callable returning one) and ``store`` (a ``MemoryStore``) are
injected by tests; by default both come from the settings (artefacts, prepared dataset, REDIS_URL).
Run it with ``automr serve`` (uvicorn).
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from memory_store import MemoryStore
from memory_store.keys import MAX_USER_ID_CHARS, check_text
from service.errors import ApiError, install_error_handlers, not_ready
from service.schemas import HistoryOut, InteractionsIn, InteractionsOut, RecommendIn, RecommendOut
from service.settings import Settings
from service.state import AppState, ComponentsSource

log = logging.getLogger(__name__)

ERROR_SCHEMA = {"description": "error", "content": {"application/json": {"example": {"error": "code", "detail": "what is wrong"}}}}


def _user_id(user_id: str) -> str:
    try:
        return check_text(user_id, "user_id", MAX_USER_ID_CHARS)
    except ValueError as e:
        raise ApiError(422, "invalid_user_id", str(e)) from None


def create_app(settings: Settings | None = None, components: ComponentsSource = None,
               store: MemoryStore | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings, components, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start(asyncio.get_running_loop())  # loads in the background: the server listens at once
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="automr", version="0.1.0", lifespan=lifespan,
                  description="LLM-based generative recommendation with a learned long-term memory (AutoMR on BIGRec)",
                  responses={400: ERROR_SCHEMA, 422: ERROR_SCHEMA, 503: ERROR_SCHEMA})
    app.state.automr = state
    install_error_handlers(app)

    def engine():
        if state.engine is None:
            raise not_ready(state.error if state.phase == "failed" else f"the service is {state.phase}")
        return state.engine

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is up (always 200)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 once the model, index and store are loaded; 503 ``not_ready`` before."""
        if not state.ready:
            detail = state.error if state.phase == "failed" else (
                f"the service is {state.phase}" + (f" ({state.error})" if state.error else ""))
            return JSONResponse({"error": "not_ready", "detail": detail}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(state.status())

    @app.post("/recommend", response_model=RecommendOut)
    async def recommend(body: RecommendIn) -> RecommendOut:
        """Top-k items for a user from the stored context and memory (or ``recent_items``)."""
        return await engine().recommend(body)

    @app.post("/interactions", response_model=InteractionsOut)
    async def interactions(body: InteractionsIn) -> InteractionsOut:
        """Store a batch of events (all or nothing); answered once they are in Redis."""
        return await engine().append(body.events)

    @app.get("/users/{user_id}/history", response_model=HistoryOut)
    async def history(user_id: str) -> HistoryOut:
        """The user's stored events, oldest first, with titles (404 ``unknown_user`` if none)."""
        return await engine().history(_user_id(user_id))

    @app.delete("/users/{user_id}", status_code=204)
    async def delete_user(user_id: str) -> Response:
        """Erase every stored event and memory vector of the user. Idempotent: 204 also when nothing was stored."""
        await engine().delete(_user_id(user_id))
        return Response(status_code=204)

    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn service.app:app_from_env --factory``."""
    return create_app(Settings())
