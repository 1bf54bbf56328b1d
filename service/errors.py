"""One JSON shape for every 4xx/5xx: ``{"error": "<short code>", "detail": "<what is wrong>"}``.

``ApiError`` is what the service's own code raises; the handlers below turn it, FastAPI's request
validation errors (malformed JSON included), Starlette's 404/405, ``StoreUnavailable`` and any
unexpected exception into that shape.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memory_store import StoreUnavailable

log = logging.getLogger(__name__)

# Codes by HTTP status for errors that carry none of their own (Starlette's HTTPException).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error response: HTTP ``status``, short ``code``, human ``detail``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def not_ready(detail: str = "the model is still loading") -> ApiError:
    return ApiError(503, "not_ready", detail, headers={"Retry-After": "5"})


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


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
    return error_response(exc.status, exc.code, exc.detail, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        e = bad_json[0]
        where = e.get("loc", ("body", "?"))[-1]
        reason = (e.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(400, "malformed_json", f"the request body is not valid JSON: {reason} (at character {where})")
    return error_response(422, "validation_error", validation_detail(errors))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _STATUS_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        allow = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
        detail = f"{request.method} is not allowed on {request.url.path}" + (f" (allowed: {allow})" if allow else "")
    return error_response(exc.status_code, code, detail, getattr(exc, "headers", None))


async def _store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
    log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "store_unavailable", f"the memory store (Redis) is unavailable: {exc}",
                          {"Retry-After": "1"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", f"{type(exc).__name__} (see the server log)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)
