"""The server's settings, checked once before anything binds a socket."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from ..errors import UsageError
from .security import is_loopback

API_KEY_ENV = "SKIN_OFFLINE_API_KEY"
MIN_LAN_KEY_CHARS = 16  # a key guarding a clinic network must not be guessable; secrets.token_urlsafe(32) gives 43
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > key.txt, then --api-key-file key.txt"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1
    max_queue: int | None = None  # None: the engine's default (4 x parallel); the engine owns capacity
    api_key: str | None = None
    allow_files: Path | None = None  # image paths / file:// URLs only inside this folder (resolved)
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 20 * 1024 * 1024
    model_id: str | None = None  # default: the bundle folder's name
    keepalive_s: float = 5.0  # SSE comment line while no token arrives (queue wait, long prefill)
    shutdown_grace_s: float = 5.0  # SIGTERM / Ctrl-C: in-flight requests may finish this long, then are cancelled
    retry_after_s: int = 1  # Retry-After on 503 (queue full, loading)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0-65535, got {self.port}")
        if self.parallel < 1:
            raise UsageError(f"--parallel must be >= 1, got {self.parallel}")
        if self.max_queue is not None and self.max_queue < 0:
            raise UsageError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise UsageError("--max-body-mb is too small to carry an image; use at least 1")
        if self.keepalive_s <= 0 or self.shutdown_grace_s < 0:
            raise UsageError("--keepalive-s must be > 0 and --shutdown-grace-s >= 0")
        if self.api_key is not None and not self.api_key:
            raise UsageError(f"the API key is empty; set a real key ({KEY_HINT})")
        if not is_loopback(self.host):
            if self.api_key is None:
                raise UsageError(
                    f"refusing to listen on {self.host} (reachable from the network) without an API key; "
                    f"create one ({KEY_HINT}) or keep the default --host 127.0.0.1"
                )
            if len(self.api_key) < MIN_LAN_KEY_CHARS:
                raise UsageError(
                    f"the API key is shorter than {MIN_LAN_KEY_CHARS} characters, too weak for "
                    f"--host {self.host}; create a long one ({KEY_HINT})"
                )
        for origin in self.cors_origins:
            check_origin(origin)
        if self.allow_files is not None:
            root = Path(self.allow_files)
            if not root.is_dir():
                raise UsageError(f"--allow-files {root}: not a folder; pass the folder images may be read from")
            object.__setattr__(self, "allow_files", root.resolve(strict=True))


def check_origin(origin: str) -> None:
    """An exact browser origin (scheme://host[:port]); never the wildcard."""
    if origin == "*" or "*" in origin:
        raise UsageError(
            "--cors-origin takes exact origins (e.g. http://localhost:3000), not a wildcard: "
            "a wildcard lets any web page a clinician opens call this server"
        )
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("",) or parts.query:
        raise UsageError(
            f"--cors-origin {origin!r} is not an origin; write scheme://host[:port], e.g. http://localhost:3000"
        )


def read_api_key(key: str | None, key_file: Path | None, env: Mapping[str, str] | None = None) -> str | None:
    """--api-key, --api-key-file or $SKIN_OFFLINE_API_KEY (at most one of the two flags)."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if key is not None and key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"--api-key-file {key_file}: cannot be read ({getattr(e, 'strerror', None) or e})"
            ) from None
        if not key:
            raise UsageError(f"--api-key-file {key_file} is empty; write the key into it ({KEY_HINT})")
        return key
    if key is not None:
        return key
    return environ.get(API_KEY_ENV) or None
