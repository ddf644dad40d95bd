#!/usr/bin/env python3
"""Fetch the Mistral v1 sentencepiece model (tokenizer.model.v1) used by SkinVL. Stdlib only.

    python scripts/fetch_tokenizer.py [DEST]     (default: <repo>/.cache/tokenizer.model.v1)

The file ships inside the PyPI wheel mistral-common==1.13.1 as mistral_common/data/tokenizer.model.v1.
We only need that data file (installing mistral-common would pin numpy<2.4), so the wheel is
downloaded with `pip download --no-deps` (or taken from DEST's folder if already there) and the
file is read out of the zip, checked against its sha256 and written atomically. Quiet and a no-op
when DEST already holds the right file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "mistral-common==1.13.1"
WHEEL_GLOB = "mistral_common-1.13.1-*.whl"
MEMBER = "mistral_common/data/tokenizer.model.v1"
SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".cache" / "tokenizer.model.v1"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_member(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(MEMBER)


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        sys.exit(
            f"error: `{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n{proc.stderr.strip()}\n"
            "Check network access to PyPI, or put the mistral_common-1.13.1 wheel next to DEST and rerun."
        )
    return wheels[0]


def _extract(wheel: Path) -> bytes | None:
    try:
        data = _read_member(wheel)
    except (zipfile.BadZipFile, KeyError, OSError):
        return None
    return data if _sha256(data) == SHA256 else None


def fetch(dest: Path) -> bool:
    """Ensure dest holds the verified model; returns True when it had to be (re)written."""
    if dest.is_file() and _sha256(dest.read_bytes()) == SHA256:
        return False
    if dest.exists():
        print(f"{dest} has the wrong sha256; replacing it", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = next((d for w in sorted(dest.parent.glob(WHEEL_GLOB)) if (d := _extract(w)) is not None), None)
    if data is None:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download_wheel(Path(tmp))
            data = _extract(wheel)
        if data is None:
            sys.exit(
                f"error: {MEMBER} in the downloaded {PACKAGE} wheel is missing or has an unexpected "
                f"sha256 (want {SHA256}); the package may have been altered, do not use it"
            )
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; this is a shared read-only data file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    print(f"wrote {dest} ({len(data)} bytes, sha256 ok)")
    return True


def main(argv: list[str]) -> int:
    if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
        print(__doc__.strip())
        return 0 if len(argv) == 2 else 2
    fetch(Path(argv[1]) if len(argv) == 2 else DEFAULT_DEST)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
