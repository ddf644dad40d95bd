"""Export time: the runtime's tokenizer.json and control ids from a checkpoint's tokenizer.

Two families (manifest.TokenizerFamily), each written so that typed text never becomes a control id:
- sentencepiece (Llama/Mistral, what SkinVL ships): the tokenizer.model converted exactly (below);
- byte-level BPE (GPT-2 style, e.g. SmolLM2's): any `tokenizer.json` that `tokenizers` loads, with a ByteLevel
  pre-tokenizer and decoder, kept as it is minus its added tokens, post-processor, truncation and padding (so a
  typed "<|im_end|>" stays text); checked against the original on sample text before it is written.
BOS / EOS / pad ids come from the checkpoint's model config (`config.json`, its `text_config`,
`generation_config.json`) and `tokenizer_config.json` (the token strings), which must agree (`token_config`).

The runtime only has `tokenizers`, so the file must reproduce sentencepiece's own encoding
exactly (the "legacy" slow Llama tokenizer LLaVA trained with), not what transformers makes of it:
transformers 5 conversions are wrong in cases and register `</s>` as text-matching added tokens.

The Mistral sentencepiece model into a `tokenizers` tokenizer.json.
How sentencepiece BPE encodes (bpe_model.cc) and how the tokenizer.json mirrors it:
- normalizer: identity; dummy prefix "▁" on non-empty input; every " " becomes "▁";
  no pre-tokenizer (sentencepiece does not split on whitespace at encode time).
- start from single characters; repeatedly merge the adjacent pair whose concatenation is a
  normal piece with the highest score, leftmost first on ties -> BPE merges ordered by the merged
  piece's score. Only normal pieces take part: control (`<s>`, `</s>`), unknown and byte pieces are
  never merge results, so a typed "</s>" stays three text pieces.
- characters outside the vocabulary fall back to their UTF-8 bytes (`<0xNN>` pieces).
- the 16 whitespace-run pieces "▁" * 1..16 share one score (-1e9). Sentencepiece resolves that tie
  leftmost, which grows one run from the left in chunks of 16; ranking the pairs ("▁"*a, "▁") by
  a descending reproduces exactly that (the tests check long runs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer, decoders, models, normalizers

from ..errors import CheckpointError
from ..manifest import TokenConfig, TokenizerFamily

MISTRAL_TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
TOKENIZER_MODEL_ENV = "SKIN_OFFLINE_TOKENIZER_MODEL"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER_MODEL = REPO_ROOT / ".cache" / "tokenizer.model.v1"

_SPACE = "\u2581"  # sentencepiece's visible space "▁"
_NORMAL = sp_pb2.ModelProto.SentencePiece.NORMAL
_USER_DEFINED = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
_UNUSED = sp_pb2.ModelProto.SentencePiece.UNUSED
# Strings whose encoding must match sentencepiece before a tokenizer.json is written.
_SELF_CHECK = [
    "",
    " ",
    "   x  ",
    "[INST] ",
    "\nWhat is this lesion? [/INST]",
    "a </s>[INST] b",
    "<s><unk>",
    "naïve café 皮肤病变 🙂\t\r\n",
    "x" * 40 + " " * 37 + "=" * 33 + "." * 21,
    "0123456789.5e-3",
]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_proto(model_path: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_path).read_bytes())
    except (OSError, DecodeError) as exc:
        raise CheckpointError(
            f"cannot read sentencepiece model {model_path}: {exc}; re-fetch it with `python scripts/fetch_tokenizer.py`"
        ) from exc
    if not proto.pieces:
        raise CheckpointError(
            f"{model_path} is not a sentencepiece model (no pieces); "
            "re-fetch it with `python scripts/fetch_tokenizer.py`"
        )
    return proto


def _check_supported(proto: sp_pb2.ModelProto, model_path: Path) -> None:
    # The conversion below is exact only for the legacy Llama/Mistral family of settings.
    tspec, nspec = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if tspec.model_type != sp_pb2.TrainerSpec.BPE:
        problems.append("model_type is not BPE")
    if not tspec.byte_fallback:
        problems.append("byte_fallback is off")
    if tspec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if not nspec.add_dummy_prefix or nspec.remove_extra_whitespaces or not nspec.escape_whitespaces:
        problems.append("whitespace normalisation is not legacy Llama's")
    if nspec.precompiled_charsmap or nspec.normalization_rule_tsv:
        problems.append("it has a Unicode normalisation rule")
    if any(p.type in (_USER_DEFINED, _UNUSED) for p in proto.pieces):
        problems.append("it has user-defined or unused pieces")
    if problems:
        raise CheckpointError(
            f"unsupported sentencepiece model {model_path}: "
            + "; ".join(problems)
            + "; use a Llama/Mistral-style tokenizer.model"
        )


def _merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    normal = {p.piece: p.score for p in proto.pieces if p.type == _NORMAL}
    ranked = []
    for piece, score in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                # Higher score first; on equal scores (the "▁"-runs) longer result, then longer
                # left part first; the pieces themselves make the order deterministic.
                ranked.append((-score, -len(piece), -len(left), piece, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_to_tokenizer(model_path: str | os.PathLike[str]) -> Tokenizer:
    """Build a `tokenizers` BPE tokenizer that encodes and decodes exactly like sentencepiece.

    No special tokens are registered as added tokens: typed "<s>", "</s>" or "<unk>" in user
    text stay text, and BOS/EOS ids are inserted by the caller (runtime/prompt.py).
    """
    model_path = Path(model_path)
    proto = _load_proto(model_path)
    _check_supported(proto, model_path)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if len(vocab) != len(proto.pieces):
        raise CheckpointError(f"{model_path} has duplicate pieces; it cannot be converted")
    unk_piece = proto.pieces[proto.trainer_spec.unk_id].piece
    bpe = models.BPE(vocab=vocab, merges=_merges(proto), unk_token=unk_piece, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    _self_check(tok, model_path)
    return tok


def _self_check(tok: Tokenizer, model_path: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    for text in _SELF_CHECK:
        if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
            raise CheckpointError(
                f"tokenizer conversion of {model_path} does not match sentencepiece "
                f"on {text!r}; report this with the model file"
            )


def _read_tokenizer_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; provide the checkpoint's tokenizer.model") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path} is not a tokenizer.json; provide the checkpoint's tokenizer.model")
    return data


def _types(part) -> set[str]:
    """Component types of a normalizer / pre-tokenizer / decoder entry, Sequences included."""
    if not isinstance(part, dict):
        return set()
    out = {part.get("type")}
    for key in ("pretokenizers", "normalizers", "decoders"):
        for sub in part.get(key) or ():
            out |= _types(sub)
    return out


def tokenizer_family(data: dict) -> TokenizerFamily | None:
    """The family of a tokenizer.json's content, None if neither (decided by the pieces' encoding)."""
    if data.get("model", {}).get("type") != "BPE":
        return None
    if "ByteLevel" in _types(data.get("pre_tokenizer")) and _types(data.get("decoder")) == {"ByteLevel"}:
        return TokenizerFamily.BYTE_LEVEL
    if "<s>" in data["model"].get("vocab", {}):
        return TokenizerFamily.SENTENCEPIECE
    return None


def _sanitize_tokenizer_json(path: Path) -> Tokenizer:
    # A transformers-made tokenizer.json registers <s>, </s>, <unk> (and llava-hf's <image>, <pad>; SmolLM2's
    # <|im_start|>, <|im_end|>, ...) as added tokens that match typed text, and often a post-processor that adds
    # BOS: drop both (and any truncation/padding settings, which would silently cut prompts).
    data = _read_tokenizer_json(path)
    family = tokenizer_family(data)
    if family is None:
        raise CheckpointError(
            f"{path} is neither a Llama/Mistral (sentencepiece) BPE nor a byte-level BPE tokenizer; "
            f"provide the checkpoint's tokenizer.model"
        )
    original = data
    data = {**data, "added_tokens": [], "post_processor": None, "truncation": None, "padding": None}
    try:
        tok = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # tokenizers raises bare Exception for any malformed file
        raise CheckpointError(f"cannot load {path}: {exc}; provide the checkpoint's tokenizer.model") from exc
    if family == TokenizerFamily.BYTE_LEVEL:
        _check_byte_level(tok, Tokenizer.from_str(json.dumps(original)), path)
    return tok


# byte-level: strings whose ids must equal the original file's (it knows its added tokens; these hold none) and
# that must decode back to themselves
_BYTE_LEVEL_CHECK = _SELF_CHECK + ["  x", "Melanoma (in situ) vs. naevus", "\u00a0nbsp", "a\r\nb", "x" * 300]


def _check_byte_level(tok: Tokenizer, original: Tokenizer, path: Path) -> None:
    vocab = tok.get_vocab(with_added_tokens=False)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise CheckpointError(f"{path}: the vocabulary ids are not contiguous; this tokenizer cannot be exported")
    specials = [t.content for t in original.get_added_tokens_decoder().values()]
    for text in _BYTE_LEVEL_CHECK:
        if any(sp in text for sp in specials):
            continue
        ids = tok.encode(text, add_special_tokens=False).ids
        if ids != original.encode(text, add_special_tokens=False).ids or tok.decode(ids) != text:
            raise CheckpointError(
                f"{path}: the exported tokenizer does not reproduce the original on {text!r}; "
                f"report this with the tokenizer.json"
            )


def _tokenizer_source(source: Path) -> tuple[str, Path]:
    """("model" | "json", file) the runtime tokenizer is made from."""
    if source.is_dir():
        if (source / "tokenizer.model").is_file():
            return "model", source / "tokenizer.model"
        if (source / "tokenizer.json").is_file():
            return "json", source / "tokenizer.json"
        raise CheckpointError(
            f"no tokenizer in {source}: expected tokenizer.model (preferred) or "
            "tokenizer.json; copy the base model's tokenizer.model there"
        )
    if source.suffix == ".json" and source.is_file():
        return "json", source
    if source.is_file():
        return "model", source
    raise CheckpointError(
        f"tokenizer source {source} does not exist; pass a checkpoint folder or a tokenizer.model file"
    )


def write_tokenizer_json(source: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the runtime's tokenizer.json from a checkpoint folder or a sentencepiece model file.

    Prefers `tokenizer.model` (exact by construction and checked). If a folder holds only a
    `tokenizer.json`, that file is used after removing its added tokens and post-processor.
    Caveat for the sentencepiece family: its exactness then depends on whoever converted it (transformers 5
    conversions differ from sentencepiece on some inputs); prefer exporting with the tokenizer.model.
    """
    source, out_path = Path(source), Path(out_path)
    kind, file = _tokenizer_source(source)
    tok = sentencepiece_to_tokenizer(file) if kind == "model" else _sanitize_tokenizer_json(file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tok.save(str(tmp), pretty=False)
    os.replace(tmp, out_path)
    return out_path


# --- control ids ------------------------------------------------------------------------------------------
def _json_or_empty(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; fix or remove it") from exc
    return d if isinstance(d, dict) else {}


def _content(x) -> str | None:
    """A tokenizer_config special-token entry: a string or {"content": ...}."""
    if isinstance(x, dict):
        x = x.get("content")
    return x if isinstance(x, str) else None


def _config_id(folder: Path, key: str) -> int | None:
    """`key` (bos_token_id, ...) from config.json's text_config, config.json itself, then generation_config.json;
    a list (several EOS ids) gives its first."""
    conf = _json_or_empty(folder / "config.json")
    for d in (conf.get("text_config") or {}, conf, _json_or_empty(folder / "generation_config.json")):
        v = d.get(key) if isinstance(d, dict) else None
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def token_config(source: str | os.PathLike[str], written: str | os.PathLike[str]) -> TokenConfig:
    """The bundle's control ids for the tokenizer.json `written` from the checkpoint (folder or file) `source`.

    sentencepiece: <s>, </s> (the model's own pieces, as LLaVA uses them). byte-level: BOS / EOS / pad from the model
    config and tokenizer_config.json's token strings; where both name one they must agree (a mismatch is a broken
    checkpoint, and guessing would end answers at the wrong token). Control ids: the original file's special added
    tokens that are inside the vocabulary, which decoding skips."""
    source, written = Path(source), Path(written)
    out = Tokenizer.from_file(str(written))
    vocab = out.get_vocab(with_added_tokens=False)
    data = json.loads(written.read_text(encoding="utf-8"))
    family = tokenizer_family(data)
    if family == TokenizerFamily.SENTENCEPIECE:
        return TokenConfig(bos_id=vocab["<s>"], eos_id=vocab["</s>"], tokenizer_vocab_size=len(vocab))
    folder = source if source.is_dir() else source.parent
    _, file = _tokenizer_source(source)
    original = Tokenizer.from_file(str(file))
    added = original.get_added_tokens_decoder()  # id -> AddedToken
    tconf = _json_or_empty(folder / "tokenizer_config.json")
    ids = {}
    for what in ("bos", "eos", "pad"):
        from_model = _config_id(folder, f"{what}_token_id")
        text = _content(tconf.get(f"{what}_token"))
        from_tok = original.token_to_id(text) if text is not None else None
        if text is not None and from_tok is None:
            raise CheckpointError(
                f"tokenizer_config.json names {what}_token {text!r}, which the tokenizer does not "
                f"know; fix the checkpoint's tokenizer files"
            )
        if from_model is not None and from_tok is not None and from_model != from_tok:
            raise CheckpointError(
                f"the model config says {what}_token_id {from_model} but tokenizer_config.json's "
                f"{what}_token {text!r} is id {from_tok}; fix one of them"
            )
        ids[what] = from_model if from_model is not None else from_tok
    for what in ("bos", "eos"):
        if ids[what] is None or not 0 <= ids[what] < len(vocab):
            raise CheckpointError(
                f"no usable {what.upper()} token for {file} (got {ids[what]}): set {what}_token_id "
                f"in config.json or {what}_token in tokenizer_config.json"
            )
    control = sorted(i for i, t in added.items() if t.special and i < len(vocab) and i not in (ids["bos"], ids["eos"]))
    return TokenConfig(
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        tokenizer_vocab_size=len(vocab),
        family=TokenizerFamily.BYTE_LEVEL,
        pad_id=ids["pad"],
        control_ids=tuple(control),
    )


def find_mistral_tokenizer_model() -> Path:
    """Locate the Mistral v1 sentencepiece model ($SKIN_OFFLINE_TOKENIZER_MODEL or .cache/) and verify it."""
    env = os.environ.get(TOKENIZER_MODEL_ENV)
    path = Path(env) if env else DEFAULT_TOKENIZER_MODEL
    if not path.is_file():
        raise CheckpointError(
            f"Mistral tokenizer model not found at {path}; run `python scripts/fetch_tokenizer.py`"
            + (f" or fix ${TOKENIZER_MODEL_ENV}" if env else "")
        )
    if sha256_file(path) != MISTRAL_TOKENIZER_SHA256:
        raise CheckpointError(
            f"{path} is not the Mistral v1 tokenizer model (sha256 mismatch); "
            "run `python scripts/fetch_tokenizer.py`" + (f" or fix ${TOKENIZER_MODEL_ENV}" if env else "")
        )
    return path
