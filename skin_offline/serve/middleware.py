"""Pure-ASGI layers around the routes, outermost first: request log, Host check, (CORS), auth, body limit.

The log line of a request carries its id, route, status, byte counts, timings and token counts; never a
query string, prompt text, answer, image bytes, file path or an exception's message (which can quote input).
"""

from __future__ import annotations

import logging
import secrets
import time
import traceback
from dataclasses import dataclass, field

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import SERVER, APIError
from .metrics import Metrics
from .security import KeyCheck

log = logging.getLogger("skin_offline.serve")

OPEN_PATHS = ("/", "/index.html", "/health", "/favicon.ico")  # need no API key (the page has no data in it)
STATIC_PREFIX = "/static/"
ROUTES = {"/", "/index.html", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/favicon.ico"}


def route_label(path: str) -> str:
    """The route a path belongs to; anything else is "other" (a mistyped path may hold anything)."""
    if path in ROUTES:
        return path
    if path.startswith(STATIC_PREFIX):
        return STATIC_PREFIX + "*"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@dataclass
class RequestRecord:
    """One request's log line, written once both the HTTP response and its engine row (if any) are done."""

    id: str
    method: str
    route: str
    t0: float = field(default_factory=time.perf_counter)
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    fields: dict = field(default_factory=dict)  # set by the route: tokens, ttft, finish, ...
    pending: int = 1  # the HTTP response; a completion adds its engine row

    def done(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
            log.info(
                "%s %s %s %d in=%dB out=%dB %.3fs%s",
                self.id,
                self.method,
                self.route,
                self.status,
                self.bytes_in,
                self.bytes_out,
                time.perf_counter() - self.t0,
                f" {extra}" if extra else "",
            )


class RequestLog:
    """Outermost layer: request id, one log line, metrics by route and status, and the last-resort 500
    (an unexpected exception is logged as its type and code location only)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rec = RequestRecord("req-" + secrets.token_hex(6), scope["method"], route_label(scope["path"]))
        scope.setdefault("state", {})["record"] = rec
        started = False

        async def counting_receive() -> Message:
            msg = await receive()
            if msg["type"] == "http.request":
                rec.bytes_in += len(msg.get("body", b""))
            return msg

        async def tagged_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                rec.status = msg["status"]
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rec.id.encode())]}
            elif msg["type"] == "http.response.body":
                rec.bytes_out += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, counting_receive, tagged_send)
        except Exception as e:  # noqa: BLE001 (the server must answer and keep serving)
            where = "; ".join(
                f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)[-3:]
            )
            rec.fields["error"] = f"{type(e).__name__}@{where}"
            if not started:
                await error_response(
                    APIError(
                        500,
                        f"internal error ({rec.id}); the server log has its location",
                        SERVER,
                        None,
                        "internal_error",
                    )
                )(scope, counting_receive, tagged_send)
        finally:
            if rec.status == 0:  # the client left before any response
                rec.status = 499
            self.metrics.requests.labels(rec.route, str(rec.status)).inc()
            rec.done()


class HostCheck:
    """On a loopback bind, only Host headers naming this machine (see security.loopback_hosts)."""

    def __init__(self, app: ASGIApp, allowed: set[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            host = dict(scope["headers"]).get(b"host")
            if host is not None and host.decode("latin-1").lower() not in self.allowed:
                return await error_response(
                    APIError(
                        400,
                        "Host header names another site; this server answers only to localhost / 127.0.0.1 "
                        "(start it with --host and an API key to serve other names)",
                        code="invalid_host",
                    )
                )(scope, receive, send)
        return await self.app(scope, receive, send)


class Auth:
    """`Authorization: Bearer KEY` on every route except the page, its assets and /health."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app = app
        self.check = KeyCheck(key) if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.check is not None:
            path = scope["path"]
            if not (path in OPEN_PATHS or path.startswith(STATIC_PREFIX)):
                if not self.check.ok(dict(scope["headers"]).get(b"authorization")):
                    return await error_response(
                        APIError(
                            401,
                            "missing or invalid API key; send the header Authorization: Bearer YOUR_KEY",
                            code="invalid_api_key",
                            headers={"www-authenticate": "Bearer"},
                        )
                    )(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyTooLarge(APIError):
    pass


def too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        413,
        f"request body is over the server's limit of {limit // (1024 * 1024)} MB "
        f"(--max-body-mb); send a smaller image (JPEG of a few MB is plenty: SkinVL sees 336 px)",
        code="request_too_large",
    )


class BodyLimit:
    """Refuse a body over `limit` bytes: at once from Content-Length, else while it streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                return await error_response(APIError(400, "invalid Content-Length header", code="invalid_request"))(
                    scope, receive, send
                )
            if n > self.limit:
                return await error_response(too_large(self.limit))(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise too_large(self.limit)  # mapped to 413 by the app's APIError handler
            return msg

        return await self.app(scope, limited, send)
