"""Per-request notices: a PatientDataWarning raised while a request's image is read (a DICOM header saying text
is burned into the pixels) goes back to that request's client instead of the server's stderr.

`warnings.showwarning` runs in the thread that warned, so a thread-local sink set around `SkinVL.prepare` (which
runs in a worker thread) routes it to the right request without a global lock. The notice's text is the
loader's own one-liner, which never quotes a header value."""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

from ..errors import PatientDataWarning

_local = threading.local()


@contextmanager
def collecting():
    """Notices raised in this thread inside the block are appended to the yielded list."""
    _local.sink = found = []
    try:
        yield found
    finally:
        _local.sink = None


def install() -> None:
    """Once per server process: route PatientDataWarning to the current request (every time, never deduplicated)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        sink = getattr(_local, "sink", None)
        if sink is not None and issubclass(category, PatientDataWarning):
            if str(message) not in sink:
                sink.append(str(message))
            return
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", PatientDataWarning)
