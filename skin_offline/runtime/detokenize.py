"""Streaming detokenizer: token ids -> text deltas, cut at stop strings (the one place answers are decoded).

Invariant: the concatenation of everything `add()` and `flush()` return equals
`tokenizer.decode(all tokens)`. Text is held back while the decoded tail ends in an incomplete UTF-8
sequence (U+FFFD from byte-fallback pieces) and emitted once the following token completes it.
"""

from __future__ import annotations

from .tokenizer import TextTokenizer


class StreamingDetokenizer:
    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        # Decoding the whole answer each step costs microseconds for a few hundred tokens and avoids the
        # window-offset bugs of sentencepiece's leading-space stripping.
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        if not text.startswith(self.emitted):  # cannot happen for prefix-stable decoders; be explicit
            raise RuntimeError("streamed text diverged from the full decode")
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


class StopText:
    """Cuts streamed text at the first stop string, holding back any tail that could still become one.

    Invariant: until a stop string is found, everything `add()` returned plus `flush()` is the text fed in;
    once found, what was returned is exactly the text before the stop string (which is dropped, as OpenAI does)."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def add(self, delta: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else delta
        text = self.held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        # hold the longest tail that is a proper prefix of some stop string
        keep = max(
            (k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0
        )
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return "" if self.stopped else out


def drop_answer_space(text: str) -> str:
    """A constrained answer's text: without the one space LLaVA's template puts before every answer, which the
    constraint's grammar allows as a word-start piece or a byte (runtime/constraints.py) and the decoder may keep."""
    return text[1:] if text.startswith(" ") else text


class TokenStream:
    """One answer's output side: token ids in, text deltas out, ending at EOS or the first stop string.

    `answer_space`: drop one leading space (a constrained answer, see `drop_answer_space`); the concatenated deltas
    then equal `drop_answer_space(decode(tokens))`."""

    def __init__(self, tokenizer: TextTokenizer, eos_id: int, stop: tuple[str, ...] = (), answer_space: bool = False):
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = StopText(stop)
        self.eos_id = eos_id
        self.stopped = False  # EOS or a stop string was seen
        self._lead = answer_space  # still to look at the answer's first character

    def add(self, token: int) -> str:
        if token == self.eos_id:
            self.stopped = True
            return self.flush()
        delta = self.stops.add(self._strip(self.detok.add(token)))
        self.stopped = self.stops.stopped
        return delta

    def _strip(self, delta: str) -> str:
        if self._lead and delta:
            self._lead = False
            return drop_answer_space(delta)
        return delta

    def flush(self) -> str:
        return self.stops.add(self._strip(self.detok.flush())) + self.stops.flush()
