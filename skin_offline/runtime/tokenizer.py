"""Text <-> token ids with sentencepiece semantics, from the bundle's tokenizer.json.

Encoding is the `tokenizers` BPE written by export/tokenizer.py (dummy prefix, no BOS, typed
"</s>" stays text). Decoding is done here, piece by piece, because sentencepiece's rules differ
from the generic `tokenizers` decoder in two places that generation can hit: it strips the dummy
prefix only from the first piece (not a leading byte-fallback space), and it replaces each invalid
byte with one U+FFFD while keeping the valid characters of the same byte run (a generation cut
inside a multi-byte character must not garble the characters before it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from tokenizers import Tokenizer

from ..errors import BundleError

_SPACE = "\u2581"  # "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        tokenizer.no_truncation()  # a prompt is never cut silently; prompt.check_context reports it
        tokenizer.no_padding()
        if tokenizer.get_added_tokens_decoder():  # they would match typed "</s>" etc. as control ids
            raise BundleError("tokenizer.json registers added tokens that match typed text; "
                              "re-export the bundle with this version of skin-offline")
        # The model vocabulary only: ids at or above it (llava-hf's <image>/<pad> and padded
        # embedding rows) are not text.
        vocab = tokenizer.get_vocab(with_added_tokens=False)
        self.vocab_size = len(vocab)
        self._pieces = [""] * self.vocab_size
        for piece, i in vocab.items():
            if not 0 <= i < self.vocab_size:
                raise BundleError("tokenizer.json ids are not contiguous; re-export the bundle")
            self._pieces[i] = piece
        try:
            self.bos_id, self.eos_id, self.unk_id = vocab["<s>"], vocab["</s>"], vocab["<unk>"]
        except KeyError as exc:
            raise BundleError(f"tokenizer.json has no {exc.args[0]} piece; re-export the bundle") from None
        self._skip = {self.bos_id, self.eos_id, self.unk_id}
        self._byte = {i: int(m.group(1), 16) for i, p in enumerate(self._pieces)
                      if (m := _BYTE_PIECE.fullmatch(p))}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        if not os.path.isfile(path):
            raise BundleError(f"tokenizer file {path} is missing; re-export the bundle")
        try:
            tok = Tokenizer.from_file(os.fspath(path))
        except Exception as exc:  # tokenizers raises bare Exception for any malformed file
            raise BundleError(f"tokenizer file {path} is corrupt ({exc}); re-export the bundle") from None
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        """Ids exactly as `SentencePieceProcessor.encode(text)`: dummy prefix, no BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text exactly as sentencepiece decodes, skipping <s>, </s>, <unk> and ids >= vocab_size."""
        out: list[str] = []
        run = bytearray()  # consecutive byte-fallback pieces
        first = True  # sentencepiece strips "▁" only from the first visible piece
        for i in ids:
            i = int(i)
            byte = self._byte.get(i)
            if byte is not None:
                run.append(byte)
                continue
            if run:  # any other id, even an invisible one, ends a byte run (as in sentencepiece)
                out.append(_decode_bytes(run))
                run.clear()
                first = False
            if i < 0 or i >= self.vocab_size or i in self._skip:
                continue
            piece = self._pieces[i]
            if first and piece.startswith(_SPACE):
                piece = piece[1:]
            first = False
            out.append(piece.replace(_SPACE, " "))
        if run:
            out.append(_decode_bytes(run))
        return "".join(out)


def token_bytes(tokenizer: TextTokenizer, token: int) -> bytes:
    """The bytes one token adds to the text (its piece's "▁" as a space; a byte-fallback piece its byte; control ids
    nothing): what an OpenAI logprobs entry reports as `bytes`."""
    byte = tokenizer._byte.get(token)
    if byte is not None:
        return bytes([byte])
    if token < 0 or token >= tokenizer.vocab_size or token in tokenizer._skip:
        return b""
    return tokenizer._pieces[token].replace(_SPACE, " ").encode("utf-8")


def _utf8_len(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _decode_bytes(data: bytearray) -> str:
    # sentencepiece: one U+FFFD per invalid byte (Python's errors="replace" emits one per
    # maximal invalid subsequence, so decode character by character instead).
    out, pos = [], 0
    while pos < len(data):
        n = _utf8_len(data[pos])
        char = _utf8_char(bytes(data[pos:pos + n])) if n and pos + n <= len(data) else None
        out.append("\ufffd" if char is None else char)
        pos += 1 if char is None else n
    return "".join(out)


def _utf8_char(chunk: bytes) -> str | None:
    try:
        return chunk.decode("utf-8")  # strict: rejects overlong forms, surrogates, > U+10FFFF
    except UnicodeDecodeError:
        return None
