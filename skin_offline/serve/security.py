"""Safe defaults: loopback detection, the API key check, the Host check and file confinement."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import stat
from pathlib import Path


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost". Any other name counts as reachable (it is not resolved: no DNS)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyCheck:
    """Compares `Authorization: Bearer KEY` in constant time.

    Both sides are hashed first, so the comparison also hides the key's length (hmac.compare_digest returns
    early on a length mismatch)."""

    def __init__(self, key: str):
        self._digest = hashlib.sha256(key.encode("utf-8")).digest()

    def ok(self, authorization: bytes | None) -> bool:
        token = b""
        if authorization:
            scheme, _, rest = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                token = rest.strip()
        return hmac.compare_digest(hashlib.sha256(token).digest(), self._digest) and bool(token)


def loopback_hosts(bind_host: str, port: int) -> set[str]:
    """Host header values accepted while the server listens on loopback.

    A web page on another site can point its own domain name at 127.0.0.1 (DNS rebinding) and then read this
    server's answers as same-origin; browsers always send that site's name as Host, so refusing other names
    closes the hole. Reachable (non-loopback) binds require an API key instead."""
    names = {"localhost", "127.0.0.1", "[::1]", bind_host.lower(), f"[{bind_host.strip('[]')}]"}
    return names | {f"{n}:{port}" for n in names}


class FileRefused(Exception):
    """A path the server may not read; the message is safe to show the client."""


def read_confined(root: Path, raw: str, max_bytes: int) -> bytes:
    """Bytes of the regular file `raw` (absolute, or relative to `root`) if it lies inside `root`.

    The check is made on the opened file descriptor (/proc/self/fd), so neither `..`, a symlink pointing out,
    nor a path swapped for a symlink between check and read gets a file from outside `root`."""
    if "\x00" in raw:
        raise FileRefused("image path contains a NUL byte")
    candidate = root / raw  # an absolute `raw` replaces root here; the containment check below still applies
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise FileRefused("no such image file inside the folder the server allows (--allow-files)") from None
    if not resolved.is_relative_to(root):
        raise FileRefused("image path is outside the folder the server allows (--allow-files)")
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise FileRefused(
            "image file inside the allowed folder cannot be opened (missing, a symlink, or no permission)"
        ) from None
    try:
        proc = Path(f"/proc/self/fd/{fd}")
        real = Path(os.readlink(proc)) if proc.exists() else resolved  # /proc: Linux; elsewhere the resolved path
        if not real.is_relative_to(root):
            raise FileRefused("image path is outside the folder the server allows (--allow-files)")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused("image path is not a regular file")
        if st.st_size > max_bytes:
            raise FileRefused(f"image file is {st.st_size} bytes, over the server's limit of {max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)
