"""Export time: turn the Mistral sentencepiece model into a `tokenizers` tokenizer.json.

The runtime only has `tokenizers`, so the file must reproduce sentencepiece's own encoding
exactly (the "legacy" slow Llama tokenizer LLaVA trained with), not what transformers makes of it:
transformers 5 conversions are wrong in cases and register `</s>` as text-matching added tokens.

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
    "", " ", "   x  ", "[INST] ", "\nWhat is this lesion? [/INST]", "a </s>[INST] b", "<s><unk>",
    "naïve café 皮肤病变 🙂\t\r\n", "x" * 40 + " " * 37 + "=" * 33 + "." * 21, "0123456789.5e-3",
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
        raise CheckpointError(f"cannot read sentencepiece model {model_path}: {exc}; "
                              "re-fetch it with `python scripts/fetch_tokenizer.py`") from exc
    if not proto.pieces:
        raise CheckpointError(f"{model_path} is not a sentencepiece model (no pieces); "
                              "re-fetch it with `python scripts/fetch_tokenizer.py`")
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
        raise CheckpointError(f"unsupported sentencepiece model {model_path}: " + "; ".join(problems)
                              + "; use a Llama/Mistral-style tokenizer.model")


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
    bpe = models.BPE(vocab=vocab, merges=_merges(proto), unk_token=unk_piece,
                     fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence([
        decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    _self_check(tok, model_path)
    return tok


def _self_check(tok: Tokenizer, model_path: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    for text in _SELF_CHECK:
        if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
            raise CheckpointError(f"tokenizer conversion of {model_path} does not match sentencepiece "
                                  f"on {text!r}; report this with the model file")


def _sanitize_tokenizer_json(path: Path) -> Tokenizer:
    # A transformers-made tokenizer.json registers <s>, </s>, <unk> (and llava-hf's <image>, <pad>)
    # as added tokens that match typed text, and a post-processor that adds BOS: drop both (and any
    # truncation/padding settings, which would silently cut prompts).
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; provide the checkpoint's tokenizer.model") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a tokenizer.json; provide the checkpoint's tokenizer.model")
    data.update(added_tokens=[], post_processor=None, truncation=None, padding=None)
    try:
        tok = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # tokenizers raises bare Exception for any malformed file
        raise CheckpointError(f"cannot load {path}: {exc}; provide the checkpoint's tokenizer.model") from exc
    if not isinstance(tok.model, models.BPE) or "<s>" not in tok.get_vocab(with_added_tokens=False):
        raise CheckpointError(f"{path} is not a Llama/Mistral BPE tokenizer; provide the checkpoint's tokenizer.model")
    return tok


def write_tokenizer_json(source: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the runtime's tokenizer.json from a checkpoint folder or a sentencepiece model file.

    Prefers `tokenizer.model` (exact by construction and checked). If a folder holds only a
    `tokenizer.json`, that file is used after removing its added tokens and post-processor.
    Caveat: its exactness then depends on whoever converted it (transformers 5 conversions differ
    from sentencepiece on some inputs); prefer exporting with the tokenizer.model.
    """
    source, out_path = Path(source), Path(out_path)
    if source.is_dir():
        if (source / "tokenizer.model").is_file():
            tok = sentencepiece_to_tokenizer(source / "tokenizer.model")
        elif (source / "tokenizer.json").is_file():
            tok = _sanitize_tokenizer_json(source / "tokenizer.json")
        else:
            raise CheckpointError(f"no tokenizer in {source}: expected tokenizer.model (preferred) or "
                                  "tokenizer.json; copy the base model's tokenizer.model there")
    elif source.suffix == ".json" and source.is_file():
        tok = _sanitize_tokenizer_json(source)
    elif source.is_file():
        tok = sentencepiece_to_tokenizer(source)
    else:
        raise CheckpointError(f"tokenizer source {source} does not exist; pass a checkpoint folder "
                              "or a tokenizer.model file")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tok.save(str(tmp), pretty=False)
    os.replace(tmp, out_path)
    return out_path


def find_mistral_tokenizer_model() -> Path:
    """Locate the Mistral v1 sentencepiece model ($SKIN_OFFLINE_TOKENIZER_MODEL or .cache/) and verify it."""
    env = os.environ.get(TOKENIZER_MODEL_ENV)
    path = Path(env) if env else DEFAULT_TOKENIZER_MODEL
    if not path.is_file():
        raise CheckpointError(f"Mistral tokenizer model not found at {path}; run `python scripts/fetch_tokenizer.py`"
                              + (f" or fix ${TOKENIZER_MODEL_ENV}" if env else ""))
    if sha256_file(path) != MISTRAL_TOKENIZER_SHA256:
        raise CheckpointError(f"{path} is not the Mistral v1 tokenizer model (sha256 mismatch); "
                              "run `python scripts/fetch_tokenizer.py`" + (f" or fix ${TOKENIZER_MODEL_ENV}" if env else ""))
    return path
