"""Question (+ history) -> prompt token ids with one image slot, as LLaVA builds them.

Template: LLaVA's `mistral_instruct` conversation (SeparatorStyle.LLAMA_2, system "", sep "",
sep2 "</s>"), as used by MM-Skin's evaluation:

    [INST] <image>\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST]

Tokenization: LLaVA's `tokenizer_image_token` splits that string on "<image>", encodes every chunk
separately with the legacy slow Llama tokenizer (which also splits on the literal "</s>" and
encodes each piece with its own sentencepiece dummy prefix), keeps only the first chunk's BOS and
puts IMAGE_PLACEHOLDER between chunks. We build the same segments from the template's structure
instead of splitting a string, so text the user typed ("<image>", "</s>", "<s>", "[INST]") stays
literal text and never becomes an image slot or a control id.

Input cleaning (documented behaviour): C0 control characters other than "\\n" and "\\t" (NUL, "\\r",
ESC, ...) are removed, then surrounding whitespace is stripped (LLaVA-Med's evaluation strips
questions; LLaVA's chat CLI strips answers). An answer that is empty after cleaning adds nothing,
not even the "</s>" separator, exactly as LLaVA skips empty messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from ..errors import ContextLengthError, PromptError
from .tokenizer import TextTokenizer

IMAGE_PLACEHOLDER = -200  # LLaVA's IMAGE_TOKEN_INDEX: replaced by the image features at run time

EmbedFn = Callable[[Sequence[int]], np.ndarray]  # [n] token ids -> [n, H] rows of the embedding table

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")  # C0 controls except \t (09) and \n (0a)
_SURROGATE = re.compile("[\ud800-\udfff]")  # not encodable as UTF-8; the tokenizer would raise TypeError


class _Mark(Enum):
    """Structural markers between text segments; user text can never produce them."""

    IMAGE = "image"
    EOS = "eos"


def clean_text(text: str) -> str:
    """Remove C0 control characters except newline and tab, then strip surrounding whitespace."""
    if not isinstance(text, str):
        raise PromptError(f"expected a string, got {type(text).__name__}; pass questions and answers as str")
    if bad := _SURROGATE.search(text):  # undecodable argv bytes arrive as lone surrogates (PEP 383)
        raise PromptError(
            f"text is not valid UTF-8 at character {bad.start()} ({ascii(bad.group())}); "
            f"check the terminal's encoding (LANG / LC_ALL) and pass UTF-8 text"
        )
    return _CONTROL.sub("", text).strip()


def _clean_question(question: str, turn: int) -> str:
    q = clean_text(question)
    if not q:
        where = "question" if turn == 0 else f"question of turn {turn + 1}"
        raise PromptError(f"{where} is empty; ask a question about the image, e.g. 'What is this lesion?'")
    return q


def _segments(question: str, history: Sequence[tuple[str, str]]) -> list[str | _Mark]:
    """Text segments and markers in prompt order; adjacent text is one tokenizer call, as in LLaVA."""
    turns = [*history, (question, "")]
    parts: list[str | _Mark] = []
    text = ""
    for n, (q, a) in enumerate(turns):
        q = _clean_question(q, n)
        if n == 0:  # wrap_inst("<image>\n" + q), split at the image
            parts += ["[INST] ", _Mark.IMAGE]
            text = "\n" + q + " [/INST]"
        else:  # sep "" + wrap_inst(q)
            text += "[INST] " + q + " [/INST]"
        a = clean_text(a)
        if a:  # " " + a + " " + sep2
            parts += [text + " " + a + " ", _Mark.EOS]
            text = ""
    parts.append(text)
    return [p for p in parts if p != ""]


def build_prompt_ids(tokenizer: TextTokenizer, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """BOS + prompt ids, with IMAGE_PLACEHOLDER once at the image slot (first user turn).

    history: earlier (question, answer) turns, oldest first; the image belongs to the first.
    """
    ids = [tokenizer.bos_id]
    for part in _segments(question, history):
        if isinstance(part, str):
            ids += tokenizer.encode(part)
        else:
            ids.append(IMAGE_PLACEHOLDER if part is _Mark.IMAGE else tokenizer.eos_id)
    return ids


def image_slot(ids: Sequence[int]) -> int:
    """Index of the image placeholder; the image's feature rows (manifest image_tokens) go there."""
    slots = [i for i, t in enumerate(ids) if t == IMAGE_PLACEHOLDER]
    if len(slots) != 1:
        raise PromptError(f"prompt has {len(slots)} image slots, expected 1; build it with build_prompt_ids")
    return slots[0]


@dataclass(frozen=True)
class Prompt:
    """A prompt's ids and its image span, located once: decoder position p is text id ids[p] before the image,
    feature row p - image_at inside it, and text id ids[p - image_tokens + 1] after it."""

    ids: tuple[int, ...]  # BOS + prompt ids, IMAGE_PLACEHOLDER once
    image_at: int  # index of the placeholder in `ids` = first decoder position of the image
    image_tokens: int  # feature rows the placeholder stands for

    @classmethod
    def of(cls, ids: Sequence[int], image_tokens: int) -> "Prompt":
        return cls(tuple(ids), image_slot(ids), image_tokens)

    @property
    def length(self) -> int:
        """Decoder positions the prompt fills: text ids plus the image's feature rows."""
        return len(self.ids) - 1 + self.image_tokens

    @property
    def image_end(self) -> int:
        """Positions up to and including the image's rows ("<s>[INST] " + image: shared by every question)."""
        return self.image_at + self.image_tokens

    def positions(self, image_key: str) -> list[Any]:
        """One entry per decoder position, image rows tagged (image sha256, row), so two prompts compare position by
        position (prompt_cache.py)."""
        at, n = self.image_at, self.image_tokens
        return [*self.ids[:at], *((image_key, i) for i in range(n)), *self.ids[at + 1 :]]

    def embeds(self, embed: EmbedFn, feats: np.ndarray | None, start: int = 0, end: int | None = None) -> np.ndarray:
        """Positions [start, end) -> [end-start, H]: text rows from the table, the image's rows from `feats` [N,H]
        (only read when the span overlaps the image). The one place image features are spliced into a prompt."""
        end = self.length if end is None else end
        at, n, ids = self.image_at, self.image_tokens, self.ids
        parts = []
        if start < at:
            parts.append(embed(ids[start : min(end, at)]))
        if start < at + n and end > at:
            if feats is None:
                raise ValueError("the prompt span covers the image but no image features were given")
            parts.append(feats[max(start, at) - at : min(end, at + n) - at])
        if end > at + n:
            parts.append(embed(ids[max(start, at + n) - n + 1 : end - n + 1]))  # ids after the placeholder
        return np.concatenate(parts)


def check_context(prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
    """Raise ContextLengthError unless the prompt plus max_new_tokens fits the model's context."""
    if prompt_tokens + max_new_tokens > context_length:
        room = context_length - prompt_tokens
        hint = f"lower max_new_tokens to {room} or less" if room > 0 else "shorten the question or drop earlier turns"
        raise ContextLengthError(
            f"prompt ({prompt_tokens} tokens incl. image) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the context of {context_length} tokens; {hint}"
        )
