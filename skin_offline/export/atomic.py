"""Write a bundle folder atomically: build it in a hidden sibling, then rename into place.

A reader (or an export killed at any point) sees either no bundle, the complete previous one, or the
complete new one. Leftovers of killed runs (`.NAME.partial-PID-*`) are removed by the next run once
their process is gone; a run killed between its two renames gets the previous bundle restored.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..errors import SkinOfflineError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: Path) -> None:
    parent = dest.parent
    if not parent.is_dir():
        return
    for kind in ("partial", "old"):
        for p in parent.glob(f".{dest.name}.{kind}-*"):
            try:
                pid = int(p.name.split("-")[-2])
            except (ValueError, IndexError):
                continue
            if _alive(pid) and pid != os.getpid():
                continue
            if kind == "old" and not dest.exists():
                os.rename(p, dest)  # killed between renames: the previous bundle comes back
            else:
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_folder(dest: Path):
    """Yield a temporary folder; on success it replaces `dest`, on any failure it is removed."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dest.parent / f".{dest.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise SkinOfflineError(
                f"disk full while writing {dest.name} in {dest.parent}; nothing was written, free space and retry"
            ) from None
        raise
