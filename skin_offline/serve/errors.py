"""One error shape for every refusal: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

The official clients read `message` and `code`, and retry 408, 409, 429 and every 5xx by default (honouring
Retry-After): so only "try again later" conditions are 5xx here (queue full, still loading, shutting down);
anything the client must fix is a 4xx."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..errors import ContextLengthError, EngineBusy, EngineClosed, ImageError, PromptError, SkinOfflineError, UsageError

INVALID = "invalid_request_error"
SERVER = "server_error"


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = INVALID
    param: str | None = None
    code: str | None = None
    headers: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def busy(message: str, code: str, retry_after_s: int) -> APIError:
    return APIError(503, message, SERVER, None, code, {"retry-after": str(retry_after_s)})


def from_exception(e: SkinOfflineError, retry_after_s: int = 1) -> APIError:
    """Our named errors (raised by SkinVL.prepare and the engine) -> the HTTP error. Messages are the runtime's
    one-liners: they name the problem and the fix, and never carry image bytes, header values or question text."""
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), INVALID, "messages", "context_length_exceeded")
    if isinstance(e, ImageError):
        return APIError(400, str(e), INVALID, "messages", "invalid_image")
    if isinstance(e, PromptError):
        return APIError(400, str(e), INVALID, "messages", "invalid_prompt")
    if isinstance(e, UsageError):
        return APIError(400, str(e), INVALID, None, "invalid_value")
    if isinstance(e, EngineBusy):
        return busy(f"{e}", "server_busy", retry_after_s)
    if isinstance(e, EngineClosed):
        return busy(
            "the server is shutting down; retry against a running server", "server_shutting_down", retry_after_s
        )
    return APIError(500, f"{type(e).__name__}: the server could not run this request", SERVER, None, "internal_error")


_MEMBER = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[\]-]")  # pydantic's union-member loc entries
TAGS = {"user", "assistant", "system", "developer", "text", "image_url"}  # discriminator values in locs


def param_path(loc: tuple) -> str:
    """pydantic loc -> OpenAI-style param path: ('messages', 0, 'user', 'content', 'str') -> messages[0].content."""
    out, prev = "", None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif not (_MEMBER.search(item) or (isinstance(prev, int) and item in TAGS)):
            out += f".{item}" if out else item
        prev = item
    return out or "body"


def from_validation(e: ValidationError) -> APIError:
    """The most specific pydantic error (the deepest location) as one line naming the parameter.
    Values are never echoed except a short tag (a role or part type), so no request text lands in a message."""
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    param = param_path(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = (
            f"unsupported parameter '{param}': this server implements the Chat Completions parameters listed in "
            f"its README and refuses others rather than ignore something that would change the answer"
        )
        return APIError(400, msg, INVALID, param, "unsupported_parameter")
    if kind == "missing":
        return APIError(400, f"missing required parameter '{param}'", INVALID, param, "missing_required_parameter")
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tag = str(ctx.get("tag", "?"))[:40]
        what = "role" if "role" in str(ctx.get("discriminator")) else "content part type"
        msg = (
            f"{param}: {what} {tag!r} is not supported (expected one of {ctx.get('expected_tags')}); "
            f"SkinVL answers text questions about one image: no tools, audio or files"
        )
        return APIError(400, msg, INVALID, param, "unsupported_value")
    return APIError(
        400,
        f"invalid '{param}': {err['msg']}",
        INVALID,
        param,
        "invalid_type" if kind.endswith("_type") else "invalid_value",
    )
