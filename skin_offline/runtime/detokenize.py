"""Streaming detokenizer.

Invariant: the concatenation of everything `add()` and `flush()` return equals
`tokenizer.decode(all tokens)`. Text is held back while the decoded tail ends in an incomplete UTF-8
sequence (U+FFFD from byte-fallback pieces) and emitted once the following token completes it.
"""

from __future__ import annotations


class StreamingDetokenizer:
    def __init__(self, tokenizer):
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
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        if not text.startswith(self.emitted):  # cannot happen for prefix-stable decoders; be explicit
            raise RuntimeError("streamed text diverged from the full decode")
        delta, self.emitted = text[len(self.emitted):], text
        return delta
