"""SkinVL's answers as DICOM Structured Reports, filed in a PACS beside the image they are about (README "Filing the
answer in a PACS"). Needs the `dicom-sr` extra (highdicom).

    from skin_offline import SkinVL
    from skin_offline.sr import answer_report, write_report

    model = SkinVL.load("bundles/skinvl")
    answer = model.ask("IM000001", "What is this lesion?")
    ds = answer_report(model, "IM000001", "What is this lesion?", answer)  # a pydicom Dataset (Comprehensive 3D SR)
    write_report(ds, "IM000001-answer.dcm")

Privacy: the report is the one place skin-offline writes patient data (copied from the source's header). Nothing
here logs, prints or raises with a header value: pydicom and highdicom are silenced while they work, and their
exceptions are replaced by our own one-line errors naming the file only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import SkinOfflineError, UsageError
from .atomic import ReportExists, ReportWriteError, check_output, write_atomic
from .document import Turn
from .producer import Producer
from .source import SourceImage, read_source

SR_EXTRA = "pip install 'skin-offline[dicom-sr]'"

__all__ = [
    "Producer",
    "ReportError",
    "ReportExists",
    "ReportWriteError",
    "SourceImage",
    "Turn",
    "answer_report",
    "check_output",
    "read_source",
    "report_bytes",
    "structured_report",
    "write_report",
]


class ReportError(SkinOfflineError):
    """The report could not be built from this source (never quotes a header value)."""

    exit_code = 3


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise UsageError(f"writing a DICOM Structured Report needs highdicom; install it with {SR_EXTRA}") from None
    return highdicom


def structured_report(source, turns: Sequence[Turn], producer: Producer, *, frame: int = 0):
    """A report of `turns` (questions and answers, in order) about `source` (a DICOM path, its bytes, an ImageSource
    or a SourceImage; `frame` is the 0-based frame the model saw) -> highdicom.sr.Comprehensive3DSR (a Dataset)."""
    from ..runtime.dicom import quietly
    from .document import build

    _highdicom()
    src = source if isinstance(source, SourceImage) else read_source(source, frame)
    try:
        with quietly():
            return build(src, list(turns), producer)
    except SkinOfflineError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  highdicom's and pydicom's messages may quote values: dropped, never shown
        kind = type(e).__name__
    raise ReportError(
        f"{src.name}: could not build a DICOM Structured Report from this image's header ({kind}); "
        "export the image from the PACS again, or report it"
    )


def answer_report(
    model,
    source,
    question: str,
    answer,
    *,
    frame: int | None = None,
    structured: Any = None,
    history: Sequence[tuple[str, str]] = (),
):
    """The report of one answer: `model` (a loaded SkinVL) names the producer, `answer` is what model.ask returned
    (an Answer, or the answer text), `structured` an optional parsed JSON value (default: a constrained Answer's own
    `structured`), `history` earlier (question, answer) turns of the same conversation (their finish reasons
    unknown)."""
    from ..runtime.image import ImageSource

    if frame is None:
        frame = source.frame if isinstance(source, ImageSource) else 0
    text = answer if isinstance(answer, str) else answer.answer
    reason = None if isinstance(answer, str) else answer.finish_reason
    if structured is None and not isinstance(answer, str):
        structured = answer.structured
    turns = [*(Turn(q, a) for q, a in history), Turn(question, text, reason, structured)]
    return structured_report(source, turns, Producer.from_model(model), frame=frame)


def report_bytes(ds) -> bytes:
    """The report as a DICOM Part 10 file (explicit VR little endian, what highdicom builds)."""
    import io

    from ..runtime.dicom import quietly

    buf = io.BytesIO()
    try:
        with quietly():
            ds.save_as(buf, enforce_file_format=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  pydicom's messages may quote values: dropped, never shown
        kind = type(e).__name__
    else:
        return buf.getvalue()
    raise ReportError(f"could not encode the DICOM Structured Report ({kind}); report it")


def write_report(ds, path: Path | str, *, force: bool = False) -> Path:
    """Write atomically (see atomic.py); an existing file only with force=True."""
    return write_atomic(report_bytes(ds), path, force=force)
