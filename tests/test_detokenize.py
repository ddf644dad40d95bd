"""Streaming detokenizer invariant: concatenated deltas == decode(all tokens), for any token sequence."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skin_offline.export.tokenizer import write_tokenizer_json
from skin_offline.runtime.detokenize import StreamingDetokenizer
from skin_offline.runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    write_tokenizer_json(tokenizer_model, path)
    return TextTokenizer.from_file(path)


def stream(tok, ids):
    d = StreamingDetokenizer(tok)
    parts = [d.add(i) for i in ids]
    return parts, d.flush()


# byte-fallback pieces (3..258) split multi-byte characters across tokens: the hard case
token_ids = st.one_of(st.integers(3, 258), st.integers(259, 31999))


@settings(max_examples=300, deadline=None)
@given(st.lists(token_ids, max_size=40))
def test_stream_concatenation_equals_full_decode(tok, ids):
    parts, tail = stream(tok, ids)
    assert "".join(parts) + tail == tok.decode(ids)


def test_text_round_trip_streams_incrementally(tok):
    text = "Erythematous plaque, 3 cm — café-au-lait spots 🙂 on the 皮膚."
    ids = tok.encode(text)
    parts, tail = stream(tok, ids)
    assert "".join(parts) + tail == tok.decode(ids) == text
    assert sum(1 for p in parts if p) > len(ids) // 2  # really streaming, not all at the end
    assert not any("\ufffd" in p for p in parts)  # split UTF-8 characters are held back, not garbled
