"""The API key and the request body limit, as one pure ASGI middleware (no BaseHTTPMiddleware: it
would buffer streamed bodies and cut the request's context variables off from the endpoint).

API key (``AUTOMR_API_KEY``): when set, every endpoint except ``OPEN_PATHS`` (the health probes and
the Prometheus scrape) needs ``Authorization: Bearer <key>``. A missing header and a wrong key are
both 401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` (RFC 6750: ``error="invalid_token"`` on
the wrong key); the key is compared in constant time. The check comes before anything else, so an
unauthenticated client learns nothing about body limits or routes.

Body limit (``AUTOMR_MAX_BODY_BYTES``): a ``Content-Length`` above the limit is answered 413
``body_too_large`` before the body is read; a body without one (chunked) is counted while the app
reads it and the read fails with the same 413 once it passes the limit.
"""
from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
REALM = 'Bearer realm="automr"'


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    def _auth_problem(self, headers: Headers) -> tuple[str, str] | None:
        """None when the request may pass, else (detail, WWW-Authenticate value)."""
        value = headers.get("authorization")
        if value is None:
            return "missing `Authorization: Bearer <key>` header (this server requires an API key)", REALM
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the Authorization header must be `Bearer <key>`", REALM + ', error="invalid_request"'
        if not hmac.compare_digest(token.strip().encode("latin-1", "replace"), self._key):
            return "wrong API key", REALM + ', error="invalid_token"'
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self._key is not None and scope.get("path") not in self.open_paths:
            problem = self._auth_problem(headers)
            if problem is not None:
                detail, challenge = problem
                await error_response(401, "unauthorized", detail, {"WWW-Authenticate": challenge}, scope)(
                    scope, receive, send)
                return

        limit = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await error_response(413, "body_too_large", f"the request body has {int(length)} bytes; the limit is "
                                 f"{limit} (AUTOMR_MAX_BODY_BYTES)", {"Connection": "close"}, scope)(
                scope, receive, send)
            return

        received = 0
        started = False

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_limited, send_tracked)
        except BodyTooLarge as exc:  # read outside FastAPI's handlers (which answer it themselves)
            if started:
                raise
            await error_response(413, exc.code, exc.detail, {"Connection": "close"}, scope)(scope, receive, send)
