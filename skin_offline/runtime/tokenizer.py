"""Text <-> token ids from the bundle's tokenizer.json, for both tokenizer families (manifest.TokenizerFamily).

Encoding is the `tokenizers` BPE written by export/tokenizer.py: no BOS, no added tokens, so typed "</s>" or
"<|im_end|>" stays text. Control ids (BOS, EOS, specials decoding skips) come from the bundle's manifest.

- sentencepiece (Mistral): dummy prefix. Decoding is done here, piece by piece, because sentencepiece's rules
  differ from the generic `tokenizers` decoder in two places that generation can hit: it strips the dummy prefix
  only from the first piece (not a leading byte-fallback space), and it replaces each invalid byte with one U+FFFD
  while keeping the valid characters of the same byte run (a generation cut inside a multi-byte character must not
  garble the characters before it).
- byte-level BPE (GPT-2 style): `tokenizers`' own ByteLevel decoder over the ids that are text (control ids and
  ids past the vocabulary dropped); it decodes the joined bytes with U+FFFD per invalid sequence, as transformers
  does, and decode(encode(x)) == x for any x.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from .. import names
from ..errors import BundleError
from ..manifest import TokenConfig, TokenizerFamily

_SPACE = "\u2581"  # "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, tokens: TokenConfig | None = None) -> None:
        """`tokens`: the bundle's control ids; None is the sentencepiece family's own <s> / </s>."""
        self._tok = tokenizer
        tokenizer.no_truncation()  # a prompt is never cut silently; prompt.check_context reports it
        tokenizer.no_padding()
        if tokenizer.get_added_tokens_decoder():  # they would match typed "</s>" etc. as control ids
            raise BundleError(
                "tokenizer.json registers added tokens that match typed text; "
                "re-export the bundle with this version of skin-offline"
            )
        # The model vocabulary only: ids at or above it (llava-hf's <image>/<pad> and padded
        # embedding rows) are not text.
        vocab = tokenizer.get_vocab(with_added_tokens=False)
        self.vocab_size = len(vocab)
        self._pieces = [""] * self.vocab_size
        for piece, i in vocab.items():
            if not 0 <= i < self.vocab_size:
                raise BundleError("tokenizer.json ids are not contiguous; re-export the bundle")
            self._pieces[i] = piece
        self.family = tokens.family if tokens is not None else TokenizerFamily.SENTENCEPIECE
        self.unk_id: int | None
        self._byte: dict[int, int]
        if tokens is not None and self.family == TokenizerFamily.BYTE_LEVEL:
            self.bos_id, self.eos_id, self.unk_id = tokens.bos_id, tokens.eos_id, None
            self._skip = {self.bos_id, self.eos_id, *tokens.control_ids}
            self._byte = {}
            return
        try:
            self.bos_id, self.eos_id, self.unk_id = vocab["<s>"], vocab["</s>"], vocab["<unk>"]
        except KeyError as exc:
            raise BundleError(f"tokenizer.json has no {exc.args[0]} piece; re-export the bundle") from None
        self._skip = {self.bos_id, self.eos_id, self.unk_id}
        self._byte = {i: int(m.group(1), 16) for i, p in enumerate(self._pieces) if (m := _BYTE_PIECE.fullmatch(p))}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], tokens: TokenConfig | None = None) -> TextTokenizer:
        """`tokens` None: the control ids of the bundle's manifest next to `path` (if there is one)."""
        if not os.path.isfile(path):
            raise BundleError(f"tokenizer file {path} is missing; re-export the bundle")
        try:
            tok = Tokenizer.from_file(os.fspath(path))
        except Exception as exc:  # tokenizers raises bare Exception for any malformed file
            raise BundleError(f"tokenizer file {path} is corrupt ({exc}); re-export the bundle") from None
        if tokens is None:
            tokens = _manifest_tokens(Path(path).parent)
        if tokens is None and _is_byte_level(tok):
            raise BundleError(
                f"{path} is a byte-level tokenizer and its control ids (BOS/EOS) are in the bundle's "
                f"{names.MANIFEST}, which is not next to it; load the bundle folder"
            )
        return cls(tok, tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone, no BOS/EOS: exactly `SentencePieceProcessor.encode(text)` (dummy prefix) for the
        sentencepiece family, the original tokenizer.json's ids for a byte-level one."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def answer_ids(self, answer: str, head: str = "[/INST]") -> list[int]:
        """Ids of `answer` as they stand in a training turn `... {head} {answer} ...`, tokenized in one call (LLaVA's
        turn): the ids of head + " " + answer past those of head. sentencepiece: encode(answer) (its dummy prefix
        is the space); byte-level: encode(" " + answer) (the space starts the answer's first word). Falls back to
        encoding " " + answer alone if a merge crossed into the head (it does not for either family's
        pre-tokenization rules)."""
        h = self.encode(head)
        full = self.encode(head + " " + answer)
        if full[: len(h)] == h:
            return full[len(h) :]
        return self.encode(answer if self.family == TokenizerFamily.SENTENCEPIECE else " " + answer)

    def decode(self, ids: Iterable[int]) -> str:
        """Text without control ids and ids >= vocab_size: exactly as sentencepiece decodes (skipping <s>, </s>,
        <unk>), or as `tokenizers` decodes a byte-level tokenizer with skip_special_tokens."""
        if self.family == TokenizerFamily.BYTE_LEVEL:
            return self._tok.decode(
                [i for i in map(int, ids) if 0 <= i < self.vocab_size and i not in self._skip],
                skip_special_tokens=False,
            )
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

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token adds to the text (what an OpenAI logprobs entry reports as `bytes`): a sentencepiece
        piece with its "▁" as a space, a byte-fallback piece its byte, a byte-level piece its bytes; control ids and
        ids past the vocabulary nothing."""
        if token < 0 or token >= self.vocab_size or token in self._skip:
            return b""
        if self.family == TokenizerFamily.BYTE_LEVEL:
            return bytes(_UNICODE_TO_BYTE[c] for c in self._pieces[token])
        byte = self._byte.get(token)
        if byte is not None:
            return bytes([byte])
        return self._pieces[token].replace(_SPACE, " ").encode("utf-8")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table (how byte-level BPE pieces spell raw bytes), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_UNICODE_TO_BYTE = _byte_level_alphabet()


def _is_byte_level(tok: Tokenizer) -> bool:
    return json.loads(tok.to_str()).get("decoder", {}).get("type") == "ByteLevel"


def _manifest_tokens(folder: Path) -> TokenConfig | None:
    """The `tokens` section of the manifest in `folder`, None without one (a bare tokenizer.json)."""
    from ..manifest import _from_dict

    try:
        d = json.loads((folder / names.MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder / names.MANIFEST} is unreadable ({exc}); re-export the bundle") from None
    try:
        return _from_dict(TokenConfig, d[names.K_TOKENS])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{folder / names.MANIFEST} has no valid tokens section ({exc}); re-export the bundle"
        ) from None


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
        char = _utf8_char(bytes(data[pos : pos + n])) if n and pos + n <= len(data) else None
        out.append("\ufffd" if char is None else char)
        pos += 1 if char is None else n
    return "".join(out)


def _utf8_char(chunk: bytes) -> str | None:
    try:
        return chunk.decode("utf-8")  # strict: rejects overlong forms, surrogates, > U+10FFFF
    except UnicodeDecodeError:
        return None
