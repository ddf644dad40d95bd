"""The runtime tokenizer (tokenizer.json via `tokenizers`) must encode and decode exactly like
sentencepiece on the real Mistral model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skin_offline.errors import BundleError, CheckpointError
from skin_offline.export.tokenizer import find_mistral_tokenizer_model, write_tokenizer_json
from skin_offline.runtime.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sp_model_path() -> Path:
    return find_mistral_tokenizer_model()  # CheckpointError says: run scripts/fetch_tokenizer.py


@pytest.fixture(scope="session")
def sp(sp_model_path: Path):
    return spm.SentencePieceProcessor(model_file=str(sp_model_path))


@pytest.fixture(scope="session")
def tokenizer_json(sp_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_json(sp_model_path, tmp_path_factory.mktemp("bundle") / "tokenizer.json")


@pytest.fixture(scope="session")
def tok(tokenizer_json: Path) -> TextTokenizer:
    return TextTokenizer.from_file(tokenizer_json)


CASES = [
    "",
    " ",
    "  ",
    "   ",
    "\n",
    "\t",
    "\r\n",
    "a",
    "Hello world",
    " leading",
    "trailing ",
    "  two  spaces  ",
    " " * 17,
    " " * 33 + "x",
    "x" + " " * 100,
    "What is this lesion?",
    "What is this lesion? ",
    "[INST] ",
    "\nWhat is this lesion? [/INST]",
    "[INST] <image>\nWhat is this lesion? [/INST]",
    "</s>",
    "<s>",
    "<unk>",
    "a </s>[INST] b",
    "<image>",
    "<<image>>",
    "<0x41>",
    "\u2581",
    "\u2581\u2581 x",
    "naïve café résumé Ångström",
    "皮肤病变是什么？",
    "日本語のテキスト",
    "한국어",
    "Ελληνικά",
    "русский текст",
    "emoji 🙂👍🏽👨‍👩‍👧 ok",
    "🙂🙂🙂",
    "\u200b\u200d\ufeff",
    "\x00\x01\x1b[31m",
    "\u3000full width",
    "0123456789",
    "3.14159e-10",
    "1,234,567.89",
    "2024-11-29T01:19:00Z",
    "def f(x):\n\treturn x ** 2  # square\n",
    "if (a && b) { return c[i]; }",
    "SELECT * FROM t WHERE x='y';",
    "........",
    "----------",
    "==========",
    "**bold** __it__ ~~strike~~",
    "https://example.org/a?b=c&d=e",
    "Melanoma vs. seborrheic keratosis: ABCDE criteria (asymmetry, border, colour, diameter >6 mm).",
    "multi\nline\n\ntext\n",
    "tabs\t\tand  spaces \t mixed",
]


@pytest.mark.parametrize("text", CASES)
def test_encode_matches_sentencepiece(tok: TextTokenizer, sp, text: str) -> None:
    assert tok.encode(text) == sp.encode(text)


@pytest.mark.parametrize("text", CASES)
def test_roundtrip_matches_sentencepiece_decode(tok: TextTokenizer, sp, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == sp.decode(ids)


def test_known_ids(tok: TextTokenizer) -> None:
    # A typed "</s>" is text, never EOS (mid-text: "</" "s" ">"; at the start the dummy prefix joins "▁</").
    assert tok.encode("a</s>")[-3:] == [700, 28713, 28767]
    assert 2 not in tok.encode("</s> <s> </s>")
    assert tok.encode("[INST] ") == [733, 16289, 28793, 28705]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)


def test_whitespace_runs(tok: TextTokenizer, sp) -> None:
    # The 16 "▁"-run pieces share one score; sentencepiece breaks the tie leftmost.
    for n in range(1, 70):
        for text in (" " * n, "a" + " " * n + "b", " " * n + "the", "x\n" + " " * n):
            assert tok.encode(text) == sp.encode(text), repr(text)


def test_repeated_pieces(tok: TextTokenizer, sp) -> None:
    # Periodic strings are where BPE merge order (rank vs. leftmost) could diverge.
    for unit in [".", "-", "=", "*", "/", "a", "l", "ab", "aba", "ll", "...", "-=", "\u2581", "ww", "0"]:
        for n in range(1, 40):
            assert tok.encode(unit * n) == sp.encode(unit * n), repr(unit * n)


def test_very_long_text(tok: TextTokenizer, sp) -> None:
    text = ("The lesion shows an irregular pigment network, 12 mm × 8 mm; atypical vessels? " * 800)[:60000]
    assert tok.encode(text) == sp.encode(text)


_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=120)
_PIECEY = st.lists(
    st.sampled_from(
        [
            " ",
            "  ",
            "\n",
            "\t",
            "a",
            "the",
            "ing",
            "</s>",
            "<s>",
            "[INST]",
            "<image>",
            "é",
            "皮",
            "🙂",
            ".",
            "..",
            "=",
            "1",
            "\x00",
            "\u2581",
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(_TEXT, _PIECEY))
def test_encode_property(tok: TextTokenizer, sp, text: str) -> None:
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(
        st.one_of(st.integers(1, 31999), st.integers(3, 258), st.sampled_from([28705, 259, 35, 1, 2])), max_size=16
    )
)
def test_decode_property(tok: TextTokenizer, sp, ids: list[int]) -> None:
    # Arbitrary ids (what a model may generate): byte runs with invalid UTF-8, controls, leading spaces.
    assert tok.decode(ids) == sp.decode(ids)


def test_decode_skips_control_and_out_of_vocab(tok: TextTokenizer, sp) -> None:
    ids = sp.encode("A red papule")
    assert tok.decode([1, *ids, 2]) == "A red papule"
    assert tok.decode([0, *ids, 32000, 32001, 32063]) == "A red papule"
    # A truncated emoji keeps the complete characters before it (one U+FFFD per stray byte).
    emoji = tok.encode("é🙂")
    assert tok.decode(emoji + emoji[-4:-2]) == sp.decode(emoji + emoji[-4:-2])


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="missing"):
        TextTokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(BundleError, match="corrupt"):
        TextTokenizer.from_file(bad)


def test_rejects_text_matching_added_tokens(tokenizer_json: Path, tmp_path: Path) -> None:
    data = json.loads(tokenizer_json.read_text())
    data["added_tokens"] = [
        {
            "id": 2,
            "content": "</s>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="added tokens"):
        TextTokenizer.from_file(tmp_path / "tokenizer.json")


def test_write_from_checkpoint_folder(sp_model_path: Path, tokenizer_json: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        write_tokenizer_json(ckpt, tmp_path / "out.json")
    shutil.copy(sp_model_path, ckpt / "tokenizer.model")
    out = write_tokenizer_json(ckpt, tmp_path / "out.json")
    assert json.loads(out.read_text()) == json.loads(tokenizer_json.read_text())


def test_write_from_tokenizer_json_only(tok: TextTokenizer, tokenizer_json: Path, tmp_path: Path) -> None:
    # A transformers-style file registers the specials as text-matching added tokens and adds BOS.
    data = json.loads(tokenizer_json.read_text())
    data["added_tokens"] = [
        {
            "id": i,
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, c in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (32000, "<image>")]
    ]
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "tokenizer.json").write_text(json.dumps(data))
    out = TextTokenizer.from_file(write_tokenizer_json(ckpt, tmp_path / "out.json"))
    text = "typed </s> and <image> stay text"
    assert out.encode(text) == tok.encode(text)
    assert out.vocab_size == 32000


def test_unsupported_sentencepiece_model(sp_model_path: Path, tmp_path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model_path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    other = tmp_path / "tokenizer.model"
    other.write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match="unsupported"):
        write_tokenizer_json(other, tmp_path / "out.json")
    (tmp_path / "garbage.model").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        write_tokenizer_json(tmp_path / "garbage.model", tmp_path / "out.json")


def test_find_model_env_and_checksum(sp_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIN_OFFLINE_TOKENIZER_MODEL", str(sp_model_path))
    assert find_mistral_tokenizer_model() == sp_model_path
    monkeypatch.setenv("SKIN_OFFLINE_TOKENIZER_MODEL", str(tmp_path / "missing.model"))
    with pytest.raises(CheckpointError, match="fetch_tokenizer.py"):
        find_mistral_tokenizer_model()
    wrong = tmp_path / "wrong.model"
    wrong.write_bytes(b"not the model")
    monkeypatch.setenv("SKIN_OFFLINE_TOKENIZER_MODEL", str(wrong))
    with pytest.raises(CheckpointError, match="sha256"):
        find_mistral_tokenizer_model()


def test_fetch_script_is_idempotent_and_offline_with_local_wheel(sp_model_path: Path, tmp_path: Path) -> None:
    script = REPO / "scripts" / "fetch_tokenizer.py"
    done = subprocess.run([sys.executable, str(script), str(sp_model_path)], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    # a wheel laid out like mistral-common's (a zip holding mistral_common/data/tokenizer.model.v1)
    import zipfile

    with zipfile.ZipFile(tmp_path / "mistral_common-1.13.1-py3-none-any.whl", "w") as z:
        z.writestr("mistral_common/data/tokenizer.model.v1", sp_model_path.read_bytes())
    dest = tmp_path / "tokenizer.model.v1"
    made = subprocess.run([sys.executable, str(script), str(dest)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert dest.read_bytes() == sp_model_path.read_bytes()


def test_runtime_imports_stay_light() -> None:
    code = (
        "import sys, skin_offline.runtime.tokenizer, skin_offline.runtime.prompt; "
        "heavy = {'transformers', 'sentencepiece', 'torch'} & set(sys.modules); assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
