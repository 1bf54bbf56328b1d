"""One JSON shape for every 4xx/5xx: ``{"error": "<short code>", "detail": "<what is wrong>"}``.

``ApiError`` is what the service's own code raises; the handlers below turn it, FastAPI's request
validation errors (malformed JSON included), Starlette's 404/405, ``StoreUnavailable``, the model
worker's ``QueueFull`` (429) and any unexpected exception into that shape. The middlewares
(``service/security.py``, ``service/observability.py``) answer 401/413/500 with the same shape.

Every error response records its code in the ASGI scope (``ERROR_SCOPE_KEY``) so that the metrics
middleware can count errors by code (``store_unavailable`` is the Redis error counter).
"""
from __future__ import annotations

import logging
import math
from typing import Any, MutableMapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory_store import StoreUnavailable
from service.scheduler import QueueFull

log = logging.getLogger(__name__)

ERROR_SCOPE_KEY = "automr.error"  # the error code of the response, for the metrics middleware

# Codes by HTTP status for errors that carry none of their own (Starlette's HTTPException).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "overloaded",
    500: "internal_error",
    503: "unavailable",
}


class ErrorOut(BaseModel):
    """The body of every error response (OpenAPI)."""

    error: str
    detail: str


def error_doc(description: str) -> dict:
    """An OpenAPI ``responses`` entry for an error status."""
    return {"model": ErrorOut, "description": description}


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a request body past ``AUTOMR_MAX_BODY_BYTES`` (chunked bodies have no
    Content-Length to check up front). An HTTPException, so FastAPI's body reader lets it through."""

    code = "body_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (AUTOMR_MAX_BODY_BYTES)",
                         headers={"Connection": "close"})


class ApiError(Exception):
    """An error response: HTTP ``status``, short ``code``, human ``detail``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class RunnerClosed(ApiError):
    """The model worker is shutting down: 503 ``shutting_down`` (another replica, or this one restarted, can answer)."""

    def __init__(self, detail: str = "the server is shutting down"):
        super().__init__(503, "shutting_down", detail, headers={"Retry-After": "1"})


def not_ready(detail: str = "the model is still loading") -> ApiError:
    return ApiError(503, "not_ready", detail, headers={"Retry-After": "5"})


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                   scope: MutableMapping[str, Any] | None = None) -> JSONResponse:
    """The one error shape; ``scope`` (the request's ASGI scope) records ``code`` for the metrics."""
    if scope is not None:
        scope[ERROR_SCOPE_KEY] = code
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def retry_after(seconds: float | None) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    try:
        s = float(seconds) if seconds is not None else 1.0
    except (TypeError, ValueError):
        s = 1.0
    return str(max(1, math.ceil(s)) if math.isfinite(s) else 1)


def _loc(loc: tuple[Any, ...]) -> str:
    """('body', 'events', 3, 'item_id') -> 'body.events[3].item_id'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "request"


def validation_detail(errors: list[dict]) -> str:
    """All validation errors in one line: ``body.k: Input should be ...; body.user_id: Field required``."""
    parts = []
    for e in errors[:10]:
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "field required"
        parts.append(f"{_loc(tuple(e.get('loc', ())))}: {msg}")
    if len(errors) > 10:
        parts.append(f"... and {len(errors) - 10} more")
    return "; ".join(parts)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.detail, exc.headers, request.scope)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        e = bad_json[0]
        where = e.get("loc", ("body", "?"))[-1]
        reason = (e.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(400, "malformed_json", f"the request body is not valid JSON: {reason} (at character {where})",
                              scope=request.scope)
    return error_response(422, "validation_error", validation_detail(errors), scope=request.scope)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        allow = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
        detail = f"{request.method} is not allowed on {request.url.path}" + (f" (allowed: {allow})" if allow else "")
    return error_response(exc.status_code, code, detail, getattr(exc, "headers", None), request.scope)


async def _store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "store_unavailable", f"the memory store (Redis) is unavailable: {exc}",
                          {"Retry-After": "1"}, request.scope)


async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    """``QueueFull``: the model's queue holds ``AUTOMR_MAX_QUEUE`` requests already."""
    wait = retry_after(getattr(exc, "retry_after_s", None))
    detail = str(exc) or "the model queue is full (AUTOMR_MAX_QUEUE requests waiting)"
    return error_response(429, "overloaded", f"{detail}; retry in {wait} s", {"Retry-After": wait}, request.scope)


def internal_error(exc: BaseException, scope: MutableMapping[str, Any] | None = None) -> JSONResponse:
    return error_response(500, "internal_error", f"{type(exc).__name__} (see the server log)", scope=scope)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Normally the observability middleware answers first (with the request id); this is the backstop.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return internal_error(exc, request.scope)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(QueueFull, _overloaded)
    app.add_exception_handler(Exception, _unexpected)
