"""Run the server: bind, print what is served, load the model in the background, serve until SIGTERM/Ctrl-C.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes at once, idle keep-alive connections are closed,
in-flight requests get `shutdown_grace_s` to finish and are then cancelled (a stream ends with an error event,
a waiting JSON request gets 503), the engine closes, and the process exits 0. A second Ctrl-C forces it."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import uvicorn

from ..errors import UsageError
from ..runtime.engine import Engine
from ..runtime.pipeline import SkinVL
from .app import Loader, ModelInfo, ServerState, create_app
from .config import ServeConfig

LOG_FORMAT = "%(asctime)s %(levelname).1s %(message)s"


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )[0]
    except socket.gaierror as e:
        raise UsageError(
            f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1 or 0.0.0.0"
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = "pick another --port (or --port 0 for a free one)" if e.errno == errno.EADDRINUSE else "check --host"
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, with our shutdown: cancel in-flight work after the grace period, and exit 0 after a
    signal (uvicorn re-raises the signal once stopped, which would make the exit status 143/130)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a handled signal is a clean stop: exit 0
        loop = self.loop
        if first and loop is not None:
            loop.call_soon_threadsafe(lambda: loop.create_task(self.state.shutdown()))


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name, level in (
        ("skin_offline.serve", logging.INFO),
        ("uvicorn.error", logging.WARNING),
        ("uvicorn", logging.WARNING),
    ):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level)
        lg.propagate = False


def serve(
    config: ServeConfig,
    bundle: Path,
    *,
    threads: int | None = None,
    precision: str | None = None,
    device: Any = None,
    out: Callable[[str], None] = print,
) -> None:
    info = ModelInfo.from_bundle(bundle, precision, config.model_id)  # a bad bundle fails here, before binding
    configure_logging()
    sock = bind(config.host, config.port)
    port = sock.getsockname()[1]
    cfg = config if port == config.port else _with_port(config, port)
    state = ServerState(cfg, info)
    failure: list[BaseException] = []
    server: _Server | None = None

    t0 = time.perf_counter()

    def load() -> tuple[SkinVL, Engine]:
        model = SkinVL.load(
            bundle, threads=threads, precision=precision, device=device, parallel=cfg.parallel, max_queue=cfg.max_queue
        )
        for n in model.bundle.notices:
            out(f"note: {n}")
        return model, model.engine  # the model's own engine: one prompt cache for every client

    def on_ready() -> None:
        engine = state.engine
        assert engine is not None
        out(
            f"ready in {time.perf_counter() - t0:.1f}s: {cfg.parallel} slot(s), {engine.capacity} requests admitted at most"
        )

    def on_error(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    url = _url(cfg.host if cfg.host not in ("0.0.0.0", "::") else socket.gethostname(), port)
    warn = "RANDOM WEIGHTS (demo): answers are meaningless" if info.random_weights else info.provenance
    access = "API key required (Authorization: Bearer)" if cfg.api_key else "no API key (loopback only)"
    banner = [
        f"skin-offline serve: model {info.id!r} ({info.precision}; {warn})",
        f"  {url}/            web page",
        f"  {url}/v1          OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models",
        f"  {url}/health      {url}/metrics",
        f"  listening on {cfg.host}:{port}, {access}; files: {cfg.allow_files or 'refused'}; "
        f"CORS: {', '.join(cfg.cors_origins) or 'off'}; loading the model...",
    ]
    loader = Loader(state, load, on_error, on_ready)

    def on_startup(
        loop: asyncio.AbstractEventLoop,
    ) -> None:  # signal handlers are in place by now: Ctrl-C from here on is a clean stop (exit 0)
        for line in banner:
            out(line)
        loader(loop)

    app = create_app(state, on_startup=on_startup)
    uv = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        http="h11",
        ws="none",
        loop="asyncio",
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(cfg.shutdown_grace_s + 15),
    )
    server = _Server(uv, state)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if loader.thread is not None and loader.thread.is_alive():
        # stopped while loading: let the load finish (it cannot be interrupted) rather than exit under a thread
        # that is inside onnxruntime (which aborts the process at interpreter exit)
        out("stopping: waiting for the model load to finish")
        loader.thread.join()
        if loader.result is not None:
            loader.result[1].close(cancel=True, timeout=10)
        for fn, args in loader.late:
            if fn is on_error:
                fn(*args)
    if failure:
        raise failure[0]


def _with_port(config: ServeConfig, port: int) -> ServeConfig:
    from dataclasses import replace

    return replace(config, port=port, allow_files=config.allow_files)
