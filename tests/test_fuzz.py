"""Bounded fuzzing (hypothesis) of what reads untrusted input and is not fuzzed elsewhere.

- prompt builder with multi-turn history, any Unicode including lone surrogates (what undecodable argv
  bytes become): a PromptError or a well-formed prompt, never another exception. (test_prompt.py fuzzes
  single questions against LLaVA; test_image.py fuzzes the image loader.)
- the runtime's ONNX external-data scan on mutated graph files: a BundleError or exactly the locations the
  `onnx` package itself reads from the same bytes.
- manifest parsing of mutated manifests: a Manifest or a BundleError.

Each test is bounded by max_examples (CI time is a few seconds per test on 2 cores).
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from skin_offline import names
from skin_offline.errors import BundleError, PromptError
from skin_offline.manifest import Manifest
from skin_offline.runtime.prompt import IMAGE_PLACEHOLDER, build_prompt_ids, clean_text
from skin_offline.runtime.tokenizer import TextTokenizer

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# any code point, surrogates included, plus the markup a user might type
_char = st.one_of(st.characters(exclude_categories=()), st.integers(0xD800, 0xDFFF).map(chr))
_piece = st.one_of(
    st.text(alphabet=_char, max_size=12),
    st.sampled_from(["<image>", "</s>", "<s>", "[INST]", "[/INST]", " ", "\n", "\r", "\x00", "\t"]),
)
TEXT = st.lists(_piece, max_size=6).map("".join)


@pytest.fixture(scope="module")
def tok(llava_model) -> TextTokenizer:
    return TextTokenizer.from_file(llava_model.bundle_dir / names.TOKENIZER)


def _bad(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@FUZZ
@given(question=TEXT, history=st.lists(st.tuples(TEXT, TEXT), max_size=3))
def test_prompt_builder_fuzz(tok, question, history):
    texts = [question, *(t for turn in history for t in turn)]
    questions = [question, *(q for q, _ in history)]
    try:
        ids = build_prompt_ids(tok, question, history)
    except PromptError as e:
        assert "\n" not in str(e)
        assert any(_bad(t) for t in texts) or any(not clean_text(q) for q in questions if not _bad(q))
        return
    assert not any(_bad(t) for t in texts) and all(clean_text(q) for q in questions)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids.count(IMAGE_PLACEHOLDER) == 1  # typed "<image>" never adds a slot
    # one "</s>" per finished turn with a non-empty answer, never from user text
    assert ids.count(tok.eos_id) == sum(1 for _, a in history if clean_text(a))
    assert all(0 <= i < tok.vocab_size for i in ids if i != IMAGE_PLACEHOLDER)


# --------------------------------------------------------------------------- external-data scan


def _onnx_locations(data: bytes) -> list[str] | None:
    """Locations as the onnx package reads them, or None when onnx cannot parse the bytes."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load_from_string(data)
        # protobuf hands back raw bytes for a string that is not UTF-8; the scanner decodes those with
        # "replace" (such a name never matches a bundle file, so the graph is refused either way)
        return [
            kv.value.decode("utf-8", "replace") if isinstance(kv.value, bytes) else kv.value
            for t in _get_all_tensors(model)
            for kv in t.external_data
            if kv.key == "location"
        ]
    except Exception:  # protobuf DecodeError and friends: the scan must then refuse or agree, checked below
        return None


_MUTATION = st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete"]), st.floats(0, 1), st.integers(0, 255))


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, where, byte in ops:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if not b:
            break
        if op == "flip":
            b[i] ^= 1 << (byte % 8)
        elif op == "truncate":
            del b[i:]
        elif op == "insert":
            b.insert(i, byte)
        else:
            del b[i]
    return bytes(b)


@FUZZ
@given(
    ops=st.lists(_MUTATION, min_size=1, max_size=3), which=st.sampled_from([names.VISION_GRAPH, names.DECODER_GRAPH])
)
def test_external_data_scan_fuzz(llava_model, tmp_path_factory, ops, which):
    from skin_offline.runtime.external_data import external_locations

    data = _mutate((llava_model.bundle_dir / which).read_bytes(), ops)
    path = tmp_path_factory.getbasetemp() / f"fuzz-{which}"
    path.write_bytes(data)
    try:
        got = external_locations(path)
    except BundleError as e:
        assert "\n" not in str(e)
        return
    want = _onnx_locations(data)
    if want is not None:
        assert got == want


# ------------------------------------------------------------------------------ manifest parsing


_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2, 10**6)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.just("../x"),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(["delete", "replace"]), _JSONISH), min_size=1, max_size=4
    )
)
def test_manifest_fuzz(llava_model, edits):
    base = json.loads((llava_model.bundle_dir / names.MANIFEST).read_text())
    d = copy.deepcopy(base)
    for index, op, value in edits:
        # walk to a random container inside the manifest
        node = d
        path_choices = index
        while isinstance(node, (dict, list)) and node:
            keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
            k = keys[path_choices % len(keys)]
            path_choices //= len(keys) + 1
            if path_choices == 0 or not isinstance(node[k], (dict, list)) or not node[k]:
                if op == "delete":
                    del node[k]
                else:
                    node[k] = value
                break
            node = node[k]
    assume(d != base)
    try:
        m = Manifest.from_dict(d)
    except BundleError as e:
        assert "\n" not in str(e)
        return
    # accepted: every file name it lists stays inside the bundle
    for name in m.files:
        assert not name.startswith("/") and ".." not in name.split("/")
