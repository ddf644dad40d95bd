"""Routes and server state: the HTTP layer only translates (schemas <-> prepared requests, errors -> one shape)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import names
from ..errors import SkinOfflineError
from ..runtime.engine import Engine, Reservation
from ..runtime.pipeline import SkinVL
from ..runtime.request import Request as PreparedRequest
from . import schemas as S
from .completions import Completion, generation_kwargs
from .config import ServeConfig
from .errors import SERVER, APIError, busy, from_exception, from_validation
from .messages import to_chat
from .metrics import CONTENT_TYPE, Metrics
from .middleware import Auth, BodyLimit, HostCheck, RequestLog, error_response
from .security import is_loopback, loopback_hosts

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models and the page say about the bundle (known before the model loads)."""

    id: str
    precision: str
    random_weights: bool
    context_length: int
    image_tokens: int
    provenance: str
    created: int

    @classmethod
    def from_bundle(cls, folder: Path, precision: str | None, model_id: str | None) -> "ModelInfo":
        from ..manifest import Manifest, Precision

        m = Manifest.read(folder)
        dec = m.pick(names.ROLE_DECODER, Precision(precision) if precision else None)
        src = m.source
        where = Path(str(src.get("path", "?"))).name  # the folder's name only: no server paths to the network
        fp = str(src.get("fingerprint", ""))[:12]
        prov = (
            f"exported from {where} ({src.get('layout', '?')} layout{', fingerprint ' + fp if fp else ''}) "
            f"by skin-offline {m.exporter.get('skin_offline', '?')}"
        )
        return cls(
            id=model_id or folder.resolve().name,
            precision=dec.precision.value,
            random_weights=m.random_weights,
            context_length=m.model.max_context,
            image_tokens=m.model.image_tokens,
            provenance=prov,
            created=int((folder / names.MANIFEST).stat().st_mtime),
        )

    def card(self) -> S.ModelCard:
        return S.ModelCard(
            id=self.id,
            created=self.created,
            precision=self.precision,
            random_weights=self.random_weights,
            context_length=self.context_length,
            image_tokens=self.image_tokens,
            provenance=self.provenance,
        )


class ServerState:
    """Shared by the routes: the model once loaded, live completions, metrics. Capacity is the engine's: a chat
    request reserves a queue place in it before its body is read."""

    def __init__(self, config: ServeConfig, info: ModelInfo):
        self.config, self.info = config, info
        self.model: SkinVL | None = None
        self.engine: Engine | None = None
        self.closing = False
        self.live: set[Completion] = set()
        self.metrics = Metrics(self)
        # image decoding + tokenizing run off the event loop, a few at a time
        self.prepare_limiter = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))

    @property
    def model_id(self) -> str:
        return self.info.id

    def set_ready(self, model: SkinVL, engine: Engine) -> None:
        self.model, self.engine = model, engine

    def admit(self) -> Reservation:
        """A place for one chat request in the engine (running or waiting), or 503: memory stays bounded by the
        engine's capacity, whatever the number of clients, since bodies are read only after admission."""
        c = self.config
        if self.closing:
            raise busy(
                "the server is shutting down; retry against a running server", "server_shutting_down", c.retry_after_s
            )
        if self.engine is None:
            raise busy("the model is still loading; retry in a moment", "model_loading", c.retry_after_s)
        try:
            return self.engine.reserve()
        except SkinOfflineError as e:
            raise from_exception(e, c.retry_after_s) from None

    async def shutdown(self) -> None:
        """Refuse new requests, let in-flight ones finish for the grace period, then cancel what is left."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_s
        while self.live and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.live):
            c.stream.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close, cancel=True, timeout=10)


def _parse(body: bytes) -> S.ChatCompletionRequest:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(
            400, f"request body is not valid UTF-8 (byte {e.start}); send JSON encoded as UTF-8", code="invalid_json"
        ) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(
            400, f"request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", code="invalid_json"
        ) from None
    except RecursionError:
        raise APIError(400, "request body JSON is nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(
            400, 'request body must be a JSON object ({"model": ..., "messages": [...]})', code="invalid_json"
        )
    try:
        return S.ChatCompletionRequest.model_validate(obj)
    except ValidationError as e:
        raise from_validation(e) from None
    except RecursionError:
        raise APIError(400, "request body JSON is nested too deeply", code="invalid_json") from None


def _check_model(state: ServerState, requested: str | None) -> None:
    if requested is not None and requested != state.model_id:
        raise APIError(
            404,
            f"model {requested[:80]!r} not found; this server serves {state.model_id!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    place = state.admit()
    try:
        try:
            body = await request.body()
        except ClientDisconnect:
            place.release()
            return Response(status_code=499)
        # parsing, base64 and image decoding in a worker thread: a 20 MB body must not stall other streams
        req, prepared, report = await anyio.to_thread.run_sync(
            partial(_build, state, body), limiter=state.prepare_limiter
        )
        assert state.engine is not None  # admitted: the engine runs
        try:
            stream = state.engine.submit(prepared, reservation=place)
        except SkinOfflineError as e:
            raise from_exception(e, state.config.retry_after_s) from None
    except BaseException:
        place.release()  # a no-op once the request holds it
        raise
    completion = Completion(state, stream, request.scope["state"]["record"], req, report)
    if req.stream:
        return completion.sse_response()
    return await completion.json_response(request.receive)


def _build(state: ServerState, body: bytes) -> tuple[S.ChatCompletionRequest, PreparedRequest, Any]:
    """Body -> (request, prepared engine request: its image notices included, the DICOM SR's source when it asked for
    one), or an APIError naming the problem."""
    req = _parse(body)
    req.check_supported()
    _check_model(state, req.model)
    chat = to_chat(req.messages, files=state.config.allow_files, max_bytes=state.config.max_body_bytes)
    report = None
    if req.dicom_sr:  # the image must be a DICOM file a report can reference: refused before a place is taken
        from ..sr import server as sr

        report = sr.prepare(chat)
    kw = generation_kwargs(req, state.info.context_length)
    assert state.model is not None  # admitted: the model is loaded
    try:
        prepared = state.model.prepare(chat.image, chat.question, history=chat.history, **kw)
    except SkinOfflineError as e:
        raise from_exception(e, state.config.retry_after_s) from None
    return req, prepared, report


async def models(request: Request) -> Response:
    return JSONResponse(S.ModelList(data=[request.app.state.server.info.card()]).model_dump(mode="json"))


async def model(request: Request) -> Response:
    state: ServerState = request.app.state.server
    _check_model(state, request.path_params["model_id"])
    return JSONResponse(state.info.card().model_dump(mode="json"))


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if state.closing:
        return JSONResponse({"status": "shutting_down"}, 503, headers={"retry-after": "1"})
    if state.engine is None:
        return JSONResponse({"status": "loading"}, 503, headers={"retry-after": str(state.config.retry_after_s)})
    stats = state.engine.stats()
    return JSONResponse(
        {"status": "ok", "model": state.model_id, "slots": stats.slots, "active": stats.active, "queued": stats.queued}
    )


async def metrics(request: Request) -> Response:
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        e = APIError(
            404,
            "unknown route; this server has POST /v1/chat/completions, GET /v1/models, /health, "
            "/metrics and the web page at /",
            code="not_found",
        )
    elif exc.status_code == 405:
        e = APIError(
            405,
            f"method {request.method} is not allowed on this route",
            code="method_not_allowed",
            headers=dict(exc.headers or {}),
        )
    else:
        e = APIError(exc.status_code, str(exc.detail)[:200], code="http_error")
    return error_response(e)


async def _internal_error(request: Request, exc: Exception) -> Response:
    rid = request.scope.get("state", {}).get("record")
    return error_response(
        APIError(
            500,
            f"internal error ({rid.id if rid else 'no id'}); the server log has its location",
            SERVER,
            None,
            "internal_error",
        )
    )


def create_app(state: ServerState, on_startup: Callable[[asyncio.AbstractEventLoop], None] | None = None) -> RequestLog:
    """The ASGI app. `on_startup(loop)` runs when the server starts (the background model load)."""
    c = state.config

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            on_startup(asyncio.get_running_loop())
        yield
        if state.engine is not None:  # normally closed by shutdown(); this covers a plain lifespan end
            await asyncio.to_thread(state.engine.close, cancel=True, timeout=10)

    middleware = [Middleware(HostCheck, allowed=loopback_hosts(c.host, c.port) if is_loopback(c.host) else None)]
    if c.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(c.cors_origins),
                allow_credentials=False,
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type"],
                expose_headers=["x-request-id", "retry-after"],
                max_age=600,
            )
        )
    middleware += [Middleware(Auth, key=c.api_key), Middleware(BodyLimit, limit=c.max_body_bytes)]
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/index.html", index),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/models/{model_id:path}", model),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=middleware,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
    )
    app.state.server = state
    return RequestLog(app, state.metrics)


class Loader:
    """on_startup hook: load the model in a daemon thread (so /health answers 503 meanwhile and Ctrl-C during a long
    load exits), then hand it to the loop. After the server stops, `thread`, `result` and `late` (what could not be
    delivered to a stopped loop) say how the load ended."""

    def __init__(
        self,
        state: ServerState,
        load: Callable[[], tuple[Any, Engine]],
        on_error: Callable[[BaseException], None],
        on_ready: Callable[[], None] | None = None,
    ):
        self.state, self.load, self.on_error, self.on_ready = state, load, on_error, on_ready
        self.thread: threading.Thread | None = None
        self.result: tuple[Any, Engine] | None = None
        self.late: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop) -> None:
        def work() -> None:
            try:
                model, engine = self.load()
            except BaseException as e:  # noqa: BLE001 (reported by the command after the server stops)
                deliver(self.on_error, e)
                return
            self.result = (model, engine)

            def ready() -> None:
                self.state.set_ready(model, engine)
                if self.on_ready is not None:
                    self.on_ready()

            deliver(ready)

        def deliver(fn: Callable[..., None], *args: Any) -> None:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the server stopped while loading: the caller finds .result / the error here
                self.late.append((fn, args))

        self.thread = threading.Thread(target=work, name="skin-offline-load", daemon=True)
        self.thread.start()
