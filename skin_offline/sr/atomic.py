"""Writing a report file atomically: a temporary file in the same folder, fsync, then one rename (or a hard link,
which refuses an existing name). A reader, a PACS import watching the folder, or a run killed at any point sees the
whole report or nothing; a full disk or a failed write leaves no partial file. An existing file is kept unless
`force`.

The file is created readable by its owner only (mode 0600): it carries the patient's data."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ..errors import SkinOfflineError, UsageError


class ReportExists(UsageError):
    """The output file exists and overwriting was not asked for."""


class ReportWriteError(SkinOfflineError):
    """The report could not be written (folder missing or read-only, disk full); nothing was left behind."""

    exit_code = 1


def _exists(path: Path) -> ReportExists:
    return ReportExists(
        f"{path} already exists; pass --force to overwrite it (force=True in Python), or name another file"
    )


def check_output(path: Path | str, force: bool) -> Path:
    """Fail before any work when the report could not be written: an existing file without `force`, a folder
    that is missing, not a folder or not writable."""
    path = Path(path)
    if path.is_dir():
        raise ReportWriteError(f"{path} is a folder; name the report file to write (e.g. {path / 'answer-sr.dcm'})")
    if path.exists() and not force:
        raise _exists(path)
    folder = path.parent
    if not folder.is_dir():
        raise ReportWriteError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReportWriteError(f"cannot write {path}: folder {folder} is not writable; choose another folder")
    return path


def _failed(path: Path, e: OSError) -> ReportWriteError:
    if e.errno == errno.ENOSPC:
        return ReportWriteError(f"disk full while writing {path}; nothing was written: free space and retry")
    return ReportWriteError(
        f"cannot write {path} ({e.strerror or type(e).__name__}); nothing was written: check the "
        "folder's permissions and free space"
    )


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a folder; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(data: bytes, path: Path | str, *, force: bool = False) -> Path:
    path = check_output(path, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise _failed(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except ReportExists:
        raise
    except OSError as e:
        raise _failed(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_folder(path.parent)
    return path


def _link_new(tmp: str, path: Path) -> None:
    """tmp -> path, refusing an existing path even if it appeared since check_output (a hard link cannot replace)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: the check and the rename are two steps
            raise _exists(path) from None
        os.rename(tmp, path)
