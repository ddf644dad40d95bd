"""Write a bundle folder atomically: build it in a hidden sibling, then rename into place.

A reader (or an export killed at any point) sees the complete previous bundle or the complete new one
(or none, if there was none before). On Linux the swap is one `renameat2(RENAME_EXCHANGE)`, so `dest`
never disappears even for a moment; elsewhere it is two renames and a run killed between them gets the
previous bundle restored by the next run. Leftovers of killed runs (`.NAME.partial-PID-*`, which after
an exchange holds the previous bundle) are removed by the next run once their process is gone.
"""

from __future__ import annotations

import ctypes
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


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
        if dest.exists() and _exchange(tmp, dest):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous bundle
            return
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        # some writers (numpy's tofile) report a short write without errno: ask the disk itself
        full = isinstance(e, OSError) and (e.errno == errno.ENOSPC or shutil.disk_usage(tmp).free < (1 << 20))
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise SkinOfflineError(
                f"disk full while writing {dest.name} in {dest.parent}; nothing was written, free space and retry"
            ) from None
        raise
