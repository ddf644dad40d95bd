"""The contrib-op decoder graph (GroupQueryAttention, fused norms) and the share-buffer decode loop.

Reference: transformers on the same random weights (token-identical greedy, step logits within the fp32
tolerance of test_parity.py), plus the invariants the in-place KV cache could break: cached == uncached,
chunked prefill == one shot, a prefix continued twice (copy-on-write), beam-style row selection, and
buffers recycled across requests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import decoder_greedy_vs_reference

ATOL = 1e-4  # same budget as test_parity.py (fp32, different summation order than torch)
QUESTION = "Describe the morphology, colour and border of the lesion in this dermoscopy image."


def _decoders(model):
    """(standard Decoder, FastDecoder) over the same bundle."""
    from skin_offline import names
    from skin_offline.manifest import Flavor
    from skin_offline.runtime.decoder import Decoder, FastDecoder
    from skin_offline.runtime.sessions import SessionFactory

    man, sf = model.manifest, SessionFactory(threads=1)
    std = man.pick(names.ROLE_DECODER, flavor=Flavor.STANDARD)
    fast = man.pick(names.ROLE_DECODER, flavor=Flavor.CONTRIB)
    assert (std.flavor, fast.flavor) == (Flavor.STANDARD, Flavor.CONTRIB)
    return (
        Decoder(sf.create(model.bundle_dir / std.file), man.model),
        FastDecoder(sf.create(model.bundle_dir / fast.file), man.model),
    )


@pytest.fixture(scope="module")
def fast(llava_model):
    return _decoders(llava_model)[1]


def _embeds(model, n, seed):
    rng = np.random.default_rng(seed)
    return model.runtime.bundle.embed(rng.integers(3, 32000, n))[None]  # [1,n,H]


def _ref_logits(model, embeds):
    with torch.no_grad():
        return model.ref(inputs_embeds=torch.from_numpy(embeds)).logits.numpy()  # [1,S,V]


def test_export_writes_contrib_variant_and_runtime_prefers_it_on_cpu(llava_model):
    from skin_offline import names
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.decoder import FastDecoder

    assert llava_model.manifest.verification["graphs"][names.DECODER_CONTRIB_GRAPH]["max_layer_rel_diff"] < ATOL
    assert isinstance(Bundle.load(llava_model.bundle_dir).decoder, FastDecoder)
    assert not isinstance(Bundle.load(llava_model.bundle_dir, flavor="standard").decoder, FastDecoder)


def test_fast_greedy_tokens_and_step_logits_match_transformers(llava_model, fast):
    tokens, ref_tokens, diff = decoder_greedy_vs_reference(fast, llava_model, QUESTION, 7, 32)
    assert tokens == ref_tokens
    assert diff < ATOL


def test_fast_all_positions_match_transformers_and_standard_graph(llava_model):
    std, fast = _decoders(llava_model)
    embeds = _embeds(llava_model, 24, 0)
    ref = _ref_logits(llava_model, embeds)
    assert np.abs(fast.logits_all(embeds) - ref).max() < ATOL
    assert np.abs(std.logits_all(embeds) - ref).max() < ATOL


def test_fast_cached_and_chunked_equal_one_pass(llava_model, fast):
    embeds = _embeds(llava_model, 20, 1)
    full = _ref_logits(llava_model, embeds)[0]  # [20,V]
    logits, cache = fast.forward(embeds[:, :7], fast.empty_cache(), keep=7)
    steps = [logits[0]]
    for i in range(7, 20, 3):  # mixed chunk sizes, then single tokens
        logits, cache = fast.forward(embeds[:, i : i + 3], cache, keep=min(3, 20 - i))
        steps.append(logits[0])
    assert np.abs(np.concatenate(steps) - full).max() < ATOL
    assert cache.length == 20
    single = fast.empty_cache()
    for i in range(20):
        logits, single = fast.forward(embeds[:, i : i + 1], single)
        assert np.abs(logits[0, 0] - full[i]).max() < ATOL
    # the cache seen through its views equals the standard graph's presents
    std, _ = _decoders(llava_model)
    _, std_cache = std.forward(embeds, std.empty_cache())
    assert np.abs(cache.keys[1] - std_cache.keys[1]).max() < ATOL


def test_prefix_continued_twice_keeps_both_continuations(llava_model, fast):
    """Two continuations of one prefix cache (follow-up questions) must not overwrite each other's keys."""
    a, b = _embeds(llava_model, 14, 2), _embeds(llava_model, 14, 3)
    prefix = a[:, :8]
    _, cache = fast.forward(prefix, fast.empty_cache())
    la, ca = fast.forward(a[:, 8:12], cache, keep=4)
    lb, cb = fast.forward(b[:, 8:12], cache, keep=4)  # same prefix, other tokens: copy-on-write
    la2, _ = fast.forward(a[:, 12:], ca, keep=2)  # continue A after B was written
    lb2, _ = fast.forward(b[:, 12:], cb, keep=2)
    ref_a = _ref_logits(llava_model, a)[0]
    ref_b = _ref_logits(llava_model, np.concatenate([prefix, b[:, 8:]], axis=1))[0]
    assert np.abs(np.concatenate([la[0], la2[0]]) - ref_a[8:]).max() < ATOL
    assert np.abs(np.concatenate([lb[0], lb2[0]]) - ref_b[8:]).max() < ATOL
    assert ca.store is cache.store and cb.store is not cache.store  # linear decode stays in place


def test_gathered_rows_continue_like_each_sequence_alone(llava_model, fast):
    """Batch rows gathered (reordered, repeated: beam rows over the functional API) then decoded equal each
    sequence alone: a host cache of other rows is copied into fresh KV rows before it is continued."""
    from decode_loop import gather

    x, y = _embeds(llava_model, 10, 4), _embeds(llava_model, 10, 5)
    _, cache = fast.forward(np.concatenate([x[:, :9], y[:, :9]]), fast.empty_cache(2))  # [2,9,H]
    picked = gather(cache, [1, 0, 1])
    nxt = np.concatenate([y[:, 9:], x[:, 9:], y[:, 9:]])  # [3,1,H]
    logits, new = fast.forward(nxt, picked)
    ref_x, ref_y = _ref_logits(llava_model, x)[0, -1], _ref_logits(llava_model, y)[0, -1]
    for row, ref in zip(logits[:, -1], (ref_y, ref_x, ref_y)):
        assert np.abs(row - ref).max() < ATOL
    assert new.length == 10 and new.store is not cache.store


def test_fast_decoder_feeds_float16_graphs(llava_model, tmp_path):
    """dtype-generic: an fp16 conversion of the contrib graph gets fp16 embeddings and an fp16 KV cache."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from skin_offline import names
    from skin_offline.manifest import Flavor
    from skin_offline.runtime.decoder import FastDecoder
    from skin_offline.runtime.sessions import SessionFactory

    g = llava_model.manifest.pick(names.ROLE_DECODER, flavor=Flavor.CONTRIB)
    model = onnx.load(str(llava_model.bundle_dir / g.file))
    onnx.save(convert_float_to_float16(model, keep_io_types=False), str(tmp_path / "fp16.onnx"))
    dec = FastDecoder(SessionFactory(threads=1).create(tmp_path / "fp16.onnx"), llava_model.manifest.model)
    assert dec.kv_dtype == np.float16 and dec.embeds_dtype == np.float16
    embeds = _embeds(llava_model, 12, 8)
    logits, cache = dec.forward(embeds[:, :11], dec.empty_cache())
    step, cache = dec.forward(embeds[:, 11:], cache)
    assert cache.keys[0].dtype == np.float16 and step.dtype == np.float32
    ref = _ref_logits(llava_model, embeds)[0]
    scale = np.abs(ref).max()
    assert np.abs(logits[0, -1] - ref[10]).max() < 0.05 * scale  # fp16 rounding, not a wrong cache
    assert np.abs(step[0, -1] - ref[11]).max() < 0.05 * scale


def test_left_padded_cache_rows_decode_like_each_row_alone(llava_model, fast):
    """A batch cache with a left-padded row (mask zeros, garbage keys there) decodes each row as if alone:
    positions count real tokens and padded slots are masked (the general, non-step input path)."""
    from skin_offline.runtime.kv import HostCache

    a, b = _embeds(llava_model, 10, 9), _embeds(llava_model, 7, 10)
    _, ca = fast.forward(a[:, :9], fast.empty_cache())
    _, cb = fast.forward(b[:, :6], fast.empty_cache())
    junk = np.full((1, ca.keys[0].shape[1], 3, ca.keys[0].shape[3]), 7.0, np.float32)  # padded slots
    keys = [np.concatenate([k1, np.concatenate([junk, k2], axis=2)]) for k1, k2 in zip(ca.keys, cb.keys)]
    values = [np.concatenate([v1, np.concatenate([junk, v2], axis=2)]) for v1, v2 in zip(ca.values, cb.values)]
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    logits, cache = fast.forward(np.concatenate([a[:, 9:], b[:, 6:]]), HostCache(keys, values, mask))
    assert np.abs(logits[0, -1] - _ref_logits(llava_model, a)[0, -1]).max() < ATOL
    assert np.abs(logits[1, -1] - _ref_logits(llava_model, b)[0, -1]).max() < ATOL
    assert cache.length == 10
