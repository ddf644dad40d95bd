"""OpenAI `messages` -> what `SkinVL.prepare` takes: (image, history [(q, a), ...], question).

Policy (README "Server"):
- One image per conversation, in the first user message (LLaVA's template has one `<image>` slot, in the
  first user turn): none, two, or one in a later message is a 400. Within that message the image always
  goes before the text, as LLaVA builds the prompt, wherever the part appears.
- `system` / `developer` messages: LLaVA's mistral_instruct template has no system prompt. Their text (if
  any) is prepended to the first user question, separated by a blank line, as Mistral's own later chat
  templates do; they may only come before the first user message. SkinVL was trained without one, so the
  README recommends not sending one; an empty system message changes nothing.
- After them, messages alternate user / assistant and end with a user message (Mistral's templates refuse
  anything else too). Several text parts of one message are joined with a newline.
- Images come as data URLs of any MIME type the loader may read (the loader decides by content). http(s)
  URLs are never fetched (offline by design, and no SSRF); file:// URLs and plain paths only with
  --allow-files, confined to that folder.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from .errors import APIError
from .schemas import AssistantMessage, ImagePart, SystemMessage, TextPart, UserMessage
from .security import FileRefused, read_confined

_WS = b" \t\r\n"  # MIME-style base64 wraps lines; bytes.translate drops them (a regex took 60% of a 300 KB request)


@dataclass(frozen=True)
class Chat:
    image: bytes  # the image file's bytes (decoded data URL or a confined file)
    history: tuple[tuple[str, str], ...]
    question: str


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _text(content: str | list[Any] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if isinstance(p, TextPart))


def decode_image_url(url: str, param: str, files: Path | None, max_bytes: int) -> bytes:
    """A data URL, or a path / file:// URL under --allow-files -> the image file's bytes."""
    low = url[:16].lower()
    if low.startswith("data:"):
        return _data_url(url, param)
    if low.startswith(("http://", "https://")):
        raise _bad(
            param,
            "image URLs are never fetched: this server is offline by design; send the image inline "
            "as a data URL (data:image/jpeg;base64,...)",
            "image_url_not_allowed",
        )
    if low.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _bad(
                param, "file:// URLs must name a local file (file:///path/to/image.jpg)", "image_url_not_allowed"
            )
        raw = unquote(parts.path)
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise _bad(
            param,
            "unsupported image URL scheme; send the image as a data URL (data:image/jpeg;base64,...)",
            "image_url_not_allowed",
        )
    else:
        raw = url
    if files is None:
        raise _bad(
            param,
            "image file paths are refused unless the server was started with --allow-files DIR; "
            "send the image as a data URL (data:image/jpeg;base64,...)",
            "image_url_not_allowed",
        )
    try:
        return read_confined(files, raw, max_bytes)
    except FileRefused as e:
        raise _bad(param, str(e), "image_url_not_allowed") from None


def _data_url(url: str, param: str) -> bytes:
    head, comma, payload = url[5:].partition(",")
    if not comma:
        raise _bad(param, "malformed data URL (no comma); write data:image/jpeg;base64,<base64 bytes>", "invalid_image")
    mime, *params = [p.strip().lower() for p in head.split(";")]
    if mime and not (mime.startswith("image/") or mime in ("application/dicom", "application/octet-stream")):
        raise _bad(
            param,
            f"data URL type {mime[:40]!r} is not an image; use image/jpeg, image/png, application/dicom, ...",
            "invalid_image",
        )
    if "base64" in params:
        try:
            data = base64.b64decode(payload.encode("ascii").translate(None, _WS), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise _bad(
                param,
                "the data URL's base64 is invalid (bad characters or padding); encode the file with standard base64",
                "invalid_image",
            ) from None
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise _bad(param, "the data URL carries no bytes; attach the image file's contents", "invalid_image")
    return data


def to_chat(messages: Sequence[Any], *, files: Path | None, max_bytes: int) -> Chat:
    system: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, text) after the system messages
    image: str | None = None
    image_param: str | None = None
    for i, m in enumerate(messages):
        if isinstance(m, SystemMessage):
            if turns:
                raise _bad(f"messages[{i}]", "system messages must come before the first user message")
            system.append(_text(m.content, f"messages[{i}]"))
            continue
        role = "user" if isinstance(m, UserMessage) else "assistant"
        want = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
        if role != want:
            raise _bad(
                f"messages[{i}]",
                f"messages must alternate user and assistant (after any system messages), "
                f"starting with user; messages[{i}] is a second {role} message in a row: merge them",
            )
        if isinstance(m, UserMessage) and not isinstance(m.content, str):
            for j, part in enumerate(m.content):
                if isinstance(part, ImagePart):
                    p = f"messages[{i}].content[{j}].image_url.url"
                    if image is not None:
                        raise _bad(
                            p,
                            "SkinVL takes one image per conversation (in the first user message); "
                            "start a new conversation for another image",
                        )
                    if turns:
                        raise _bad(
                            p,
                            "the image must be in the first user message (SkinVL's template has one image "
                            "slot, in the first turn); start a new conversation for a new image",
                        )
                    image, image_param = part.image_url.url, p
        assert isinstance(m, (UserMessage, AssistantMessage))
        turns.append((role, _text(m.content, f"messages[{i}]")))
    if not turns or turns[-1][0] != "user":
        raise _bad("messages", "the last message must be a user message (the question to answer)")
    if image is None:
        raise _bad(
            "messages",
            "SkinVL answers questions about an image: put one image_url part (a data URL) in the first user message",
            "missing_image",
        )
    sys_text = "\n".join(s for s in (t.strip() for t in system) if s)
    texts = [t for _, t in turns]
    if sys_text:
        texts[0] = f"{sys_text}\n\n{texts[0]}"
    history = tuple(zip(texts[0:-1:2], texts[1:-1:2]))
    assert image_param is not None
    data = decode_image_url(image, image_param, files, max_bytes)
    return Chat(image=data, history=history, question=texts[-1])
