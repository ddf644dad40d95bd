"""The byte-level BPE family (GPT-2 style tokenizer.json, the real-weights proxy's SmolLM2 tokenizer): exported
ids equal the original tokenizer's, text round-trips, control tokens never come from typed text, control ids come
from the checkpoint's configs, and label ids are their ids inside a full answer turn."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxy_checkpoint import mmskin_csv, proxy_checkpoint
from tokenizers import Tokenizer

from skin_offline.errors import CheckpointError
from skin_offline.export.tokenizer import token_config, write_tokenizer_json
from skin_offline.manifest import TokenizerFamily
from skin_offline.runtime.prompt import IMAGE_PLACEHOLDER, build_prompt_ids
from skin_offline.runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def proxy() -> Path:
    return proxy_checkpoint()


@pytest.fixture(scope="module")
def original(proxy) -> Tokenizer:
    """The checkpoint's own tokenizer.json, as transformers loads it (specials registered)."""
    return Tokenizer.from_file(str(proxy / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok(proxy, tmp_path_factory) -> TextTokenizer:
    out = write_tokenizer_json(proxy, tmp_path_factory.mktemp("bl") / "tokenizer.json")
    return TextTokenizer.from_file(out, token_config(proxy, out))


def _texts() -> list[str]:
    rows = list(csv.DictReader(open(mmskin_csv(), newline="", encoding="utf-8")))
    return [r[k] for r in rows for k in ("question", "answer")]


def test_control_ids_come_from_the_checkpoint_configs(proxy, tok, original):
    cfg = token_config(proxy, Path(tok._tok and proxy / "tokenizer.json"))  # the source file itself: same answer
    tconf = json.loads((proxy / "tokenizer_config.json").read_text())
    assert tok.family == TokenizerFamily.BYTE_LEVEL
    assert (tok.bos_id, tok.eos_id) == (
        original.token_to_id(tconf["bos_token"]),
        original.token_to_id(tconf["eos_token"]),
    )
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # text_config's bos_token_id / eos_token_id
    assert cfg.pad_id == original.token_to_id("<pad>") == 49153
    assert tok.vocab_size == 49152 and 0 in cfg.control_ids  # <|endoftext|>: special, inside the vocabulary


def test_configs_that_disagree_are_refused(proxy, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(proxy / f, ck / f)
    conf = json.loads((ck / "config.json").read_text())
    conf["text_config"]["eos_token_id"] = 0
    (ck / "config.json").write_text(json.dumps(conf))
    out = write_tokenizer_json(ck, tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="eos_token_id 0 but tokenizer_config.json"):
        token_config(ck, out)


def test_decode_encode_round_trips_the_mmskin_csv(tok, original):
    texts = _texts()
    assert len(texts) == 2 * 5452
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t, t
    # and the ids are the original tokenizer's (transformers' own file): the CSV holds no special token
    for t in texts[::7]:
        assert tok.encode(t) == original.encode(t, add_special_tokens=False).ids, t


SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<pad>", "<repo_name>", "</s>", "<s>"]


@pytest.mark.parametrize("special", SPECIALS)
def test_special_tokens_are_never_matched_inside_user_text(tok, original, special):
    question = f"is {special} here? {special}"
    ids = build_prompt_ids(tok, question, history=[(f"a {special} b", f"answer {special}")])
    controls = {tok.bos_id, tok.eos_id, *tok._skip}
    assert ids[0] == tok.bos_id and ids.count(IMAGE_PLACEHOLDER) == 1
    assert ids.count(tok.eos_id) == 1  # the one separator after the answered turn
    assert not controls & set(ids[1:]) - {tok.eos_id}
    assert all(0 <= i < tok.vocab_size for i in ids if i != IMAGE_PLACEHOLDER)
    assert tok.decode(tok.encode(question)) == question
    sid = original.token_to_id(special)
    assert sid is None or sid not in tok.encode(question)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=-5, max_value=49216 + 5), max_size=40))
def test_decode_equals_the_original_decoder_skipping_specials(tok, original, ids):
    want = original.decode([i for i in ids if 0 <= i < tok.vocab_size], skip_special_tokens=True)
    assert tok.decode(ids) == want


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_any_text_round_trips(tok, original, text):
    """Exact whenever the vocabulary has every byte of the text (SmolLM2's lacks a few lead bytes of rare planes,
    e.g. 0xF1, which its BPE drops: the original tokenizer loses them the same way)."""
    got = tok.decode(tok.encode(text))
    assert got == original.decode(original.encode(text, add_special_tokens=False).ids)
    if all(_BYTE_CHAR[b] in _vocab(tok) for b in text.encode("utf-8")):
        assert got == text


_VOCABS: dict[int, dict[str, int]] = {}


def _vocab(tok) -> dict[str, int]:
    """The tokenizer's vocabulary, built once (get_vocab() builds a 49k-entry dict per call)."""
    if id(tok) not in _VOCABS:
        _VOCABS[id(tok)] = tok._tok.get_vocab()
    return _VOCABS[id(tok)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet), for the test's check."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHAR = _bytes_to_unicode()


def test_label_ids_are_their_ids_inside_the_full_answer_turn(tok):
    """Both families' rule (classify.label_token_ids): the label's ids in `... [/INST] {label} </s>` tokenized whole."""
    from skin_offline.runtime.classify import QUESTION_TEMPLATE, label_token_ids

    sets = json.loads((mmskin_csv().parent / "zero_shot_labels.json").read_text())["datasets"]
    labels = sorted({x for v in sets.values() for x in v})
    head = "\n" + QUESTION_TEMPLATE.format(labels="a, b") + " [/INST]"
    h = tok.encode(head)
    for label in labels:
        full = tok.encode(head + " " + label + " ")
        ids = label_token_ids(tok, label)
        assert full[: len(h)] == h and full[len(h) : len(h) + len(ids)] == ids, label
        assert tok.decode(ids) == " " + label


def test_streaming_detokenizer_invariant_on_byte_level(tok):
    from skin_offline.runtime.detokenize import StreamingDetokenizer

    ids = tok.encode("Erythema 🙂 naïve 皮肤 – done.") + [tok.eos_id]
    d = StreamingDetokenizer(tok)
    out = "".join(d.add(i) for i in ids) + d.flush()
    assert out == tok.decode(ids)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rand = [int(x) for x in rng.integers(0, tok.vocab_size, 12)]
        d = StreamingDetokenizer(tok)
        assert "".join(d.add(i) for i in rand) + d.flush() == tok.decode(rand)


def test_bare_byte_level_file_needs_its_manifest(tok, tmp_path):
    from skin_offline.errors import BundleError

    path = tmp_path / "tokenizer.json"
    tok._tok.save(str(path))
    with pytest.raises(BundleError, match="control ids"):
        TextTokenizer.from_file(path)
