"""`skin-offline serve`: the OpenAI-compatible local server and web page (needs the `serve` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import Device, Precision, bundle_option, device_option, precision_option, threads_option, warn_if_random


def register(app, friendly) -> None:
    @app.command("serve")
    @friendly
    def serve(
        bundle: Optional[Path] = bundle_option(),
        host: str = typer.Option("127.0.0.1", help="address to listen on; anything but loopback needs an API key"),
        port: int = typer.Option(8080, help="port (0: a free one, printed)"),
        parallel: int = typer.Option(1, min=1, help="requests run at once (engine slots)"),
        max_queue: Optional[int] = typer.Option(
            None, min=0, help="requests waiting for a slot (default 4 x parallel); past it: 503 + Retry-After"
        ),
        api_key: Optional[str] = typer.Option(
            None,
            help="require Authorization: Bearer KEY (visible in `ps`: prefer --api-key-file or $SKIN_OFFLINE_API_KEY)",
        ),
        api_key_file: Optional[Path] = typer.Option(None, help="file holding the API key"),
        allow_files: Optional[Path] = typer.Option(
            None, help="let requests name image files (paths, file:// URLs) inside this folder only"
        ),
        cors_origin: Optional[list[str]] = typer.Option(
            None, help="browser origin allowed to call the API (repeatable; exact origins, no wildcard)"
        ),
        max_body_mb: int = typer.Option(
            20, min=1, help="largest request body (the image travels base64-encoded in it)"
        ),
        model_id: Optional[str] = typer.Option(
            None, help="the model's id in /v1/models and requests (default: the bundle folder's name)"
        ),
        keepalive_s: float = typer.Option(5.0, help="seconds between SSE keep-alive comments while no token arrives"),
        shutdown_grace_s: float = typer.Option(
            5.0, min=0.0, help="on SIGTERM / Ctrl-C, let running requests finish this long, then cancel them"
        ),
        threads: Optional[int] = threads_option(),
        precision: Optional[Precision] = precision_option(),
        device: Device = device_option(),
    ):
        """Serve the bundle over an OpenAI-compatible HTTP API and a web page (localhost by default)."""
        try:
            from ..serve.config import ServeConfig, read_api_key
            from ..serve.server import serve as run
        except ImportError as e:
            from ..errors import UsageError

            raise UsageError(
                f"the server needs the serve extra ({e.name} is missing): pip install 'skin-offline[serve]'"
            ) from None
        from ..manifest import Manifest
        from ..runtime.bundle import default_bundle_path

        config = ServeConfig(
            host=host,
            port=port,
            parallel=parallel,
            max_queue=max_queue,
            api_key=read_api_key(api_key, api_key_file),
            allow_files=allow_files,
            cors_origins=tuple(cors_origin or ()),
            max_body_bytes=max_body_mb * 1024 * 1024,
            model_id=model_id,
            keepalive_s=keepalive_s,
            shutdown_grace_s=shutdown_grace_s,
        )
        folder = bundle if bundle is not None else default_bundle_path()
        if not folder.exists():  # the same message as `ask`, before any socket is bound
            from ..errors import BundleError

            raise BundleError(
                f"no bundle at {folder}; export one with `skin-offline export CHECKPOINT {folder}` "
                f"or point --bundle / $SKIN_OFFLINE_BUNDLE at an existing bundle"
            )
        warn_if_random(Manifest.read(folder))
        run(
            config,
            folder,
            threads=threads,
            precision=precision.value if precision else None,
            device=device,
            out=lambda m: typer.echo(m),
        )
