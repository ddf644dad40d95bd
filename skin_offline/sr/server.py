"""The server's extension: `"dicom_sr": true` on POST /v1/chat/completions returns the answer's DICOM SR, base64, in
the response's `dicom_sr` field (README "Filing the answer in a PACS").

The report holds the whole conversation the request carries: earlier (question, answer) turns as the client sent
them (their finish reasons unknown), then the new question and the answer this request generated. Errors are the
server's JSON shape; no message carries a header value."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from ..errors import ImageError, SkinOfflineError, UsageError
from ..serve.errors import APIError
from .document import Turn
from .source import SourceImage

PARAM = "dicom_sr"


@dataclass(frozen=True)
class ReportRequest:
    source: SourceImage
    history: tuple[tuple[str, str], ...]
    question: str


def _api_error(e: SkinOfflineError) -> APIError:
    if isinstance(e, ImageError):
        return APIError(400, str(e), "invalid_request_error", PARAM, "invalid_image")
    if isinstance(e, UsageError):  # the extra is not installed
        return APIError(400, str(e), "invalid_request_error", PARAM, "unsupported_parameter")
    return APIError(
        500, f"{type(e).__name__}: the server could not write this report", "server_error", PARAM, "internal_error"
    )


def prepare(chat) -> ReportRequest:
    """Before the request takes a place in the engine: its image (serve/messages.to_chat) must be a DICOM file a
    report can reference (a 400 naming `dicom_sr` otherwise). Runs in the worker thread that prepares the request."""
    from . import _highdicom, read_source

    try:
        _highdicom()
        name = "the request's image"
        try:
            source = read_source(chat.image)
        except ImageError as e:  # '<image bytes>: ...' -> a name that reads well in an HTTP error
            raise ImageError(str(e).replace("<image bytes>", name, 1)) from None
        return ReportRequest(source, chat.history, chat.question)
    except SkinOfflineError as e:
        raise _api_error(e) from None


def report_base64(target: ReportRequest, model, answer: str, finish_reason, structured=None) -> str:
    """The report of this request's conversation as base64 (a Part 10 file); `structured`: the parsed result of a
    complete constrained answer. Runs in a worker thread."""
    from . import Producer, report_bytes, structured_report

    turns = [*(Turn(q, a) for q, a in target.history), Turn(target.question, answer, finish_reason, structured)]
    try:
        ds = structured_report(target.source, turns, Producer.from_model(model))
        return base64.b64encode(report_bytes(ds)).decode("ascii")
    except SkinOfflineError as e:
        raise _api_error(e) from None
