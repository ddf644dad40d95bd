"""The batching engine (issue 13): every request's fp32 greedy tokens are those of the same request run alone and
of transformers, whatever else shares the batch (1-8 slots, different images and prompt lengths, requests
arriving mid-decode, rows finishing at different steps, a row cancelled mid-way), on both decoder graphs;
seeded sampling does not depend on the batch; chunked prefill equals one-shot; memory does not grow."""

from __future__ import annotations

import threading

import pytest

from skin_offline import names
from skin_offline.runtime.pipeline import SkinVL
from skin_offline.runtime.response import FinishReason
from skin_offline.runtime.tokenizer import TextTokenizer

from conftest import random_image, reference_generate, reference_pixels

QUESTIONS = [
    "What is this lesion?",
    "Describe the colour and the border of the lesion in detail.",
    "Benign?",
    "Where on the body might this be, and what should the doctor check next?",
]


def _model(bundle_dir, flavor, parallel, **kw):
    from skin_offline.runtime.bundle import Bundle

    b = Bundle.load(bundle_dir, threads=1, flavor=flavor)
    return SkinVL(b, TextTokenizer.from_file(b.folder / names.TOKENIZER), parallel=parallel, **kw)


def _tokens(stream) -> list[int]:
    """Drain a stream: its answer's token ids (from the last response)."""
    return list(list(stream)[-1].tokens)


def _jobs(n):
    """n requests: different images (sizes), questions (prompt lengths) and answer lengths."""
    return [
        (random_image(200 + i, size=(40 + 7 * i, 30 + 3 * i)), QUESTIONS[i % len(QUESTIONS)], 6 + 5 * (i % 4))
        for i in range(n)
    ]


@pytest.fixture(scope="module", params=["contrib", "standard"])
def flavor(request):
    return request.param


@pytest.fixture(scope="module")
def alone(llava_model, flavor):
    """The same requests one at a time (one slot, no prompt cache): the reference the batch must equal."""
    m = _model(llava_model.bundle_dir, flavor, 1, prompt_cache_size=0, feature_cache_size=0)
    return {i: m.ask(img, q, max_new_tokens=n).token_ids for i, (img, q, n) in enumerate(_jobs(8))}


def test_alone_equals_transformers(llava_model, alone):
    """The one-slot engine is token-identical to transformers (the contract every batch composition inherits)."""
    from skin_offline.runtime.prompt import build_prompt_ids

    rt = llava_model.runtime
    for i, (img, q, n) in list(enumerate(_jobs(8)))[:3]:
        ids = build_prompt_ids(rt.tokenizer, q)
        ref, _ = reference_generate(llava_model.ref, ids, reference_pixels(img, llava_model.spec.image_size), n)
        assert alone[i] == ref[: len(alone[i])]


@pytest.mark.parametrize("parallel", [2, 3, 8])
def test_concurrent_batch_equals_alone(llava_model, flavor, alone, parallel):
    m = _model(llava_model.bundle_dir, flavor, parallel)
    jobs = _jobs(8)
    streams = [m.engine.submit(m.prepare(img, q, max_new_tokens=n)) for img, q, n in jobs]  # all at once
    assert {i: _tokens(s) for i, s in enumerate(streams)} == alone
    assert len({len(t) for t in alone.values()}) > 1  # rows finished at different steps


def test_arrivals_mid_decode_and_a_cancelled_row(llava_model, flavor, alone):
    """Requests join while others decode (continuous batching), one is cancelled half-way: the rest are unchanged,
    the cancelled one's tokens are a prefix of its own answer, and its slot serves the next request."""
    m = _model(llava_model.bundle_dir, flavor, 3)
    jobs = _jobs(8)
    first = m.engine.submit(m.prepare(*jobs[0][:2], max_new_tokens=jobs[0][2]))
    it = iter(first)
    next(it)  # decoding now
    doomed = m.engine.submit(m.prepare(jobs[1][0], jobs[1][1], max_new_tokens=200))
    rest = []
    for k, r in enumerate(doomed):
        if k == 2:
            rest = [m.engine.submit(m.prepare(img, q, max_new_tokens=n)) for img, q, n in jobs[2:]]
            doomed.cancel()
        last = r
    assert list(list(it)[-1].tokens) == alone[0]
    cut = list(last.tokens)
    assert last.finish_reason == FinishReason.CANCELLED and len(cut) < 200
    k = min(len(cut), len(alone[1]))  # its own greedy answer, cut where it was cancelled
    assert k >= 3 and cut[:k] == alone[1][:k]
    assert {i + 2: _tokens(s) for i, s in enumerate(rest)} == {i: alone[i] for i in range(2, 8)}
    assert m.engine.stats().active == 0


def test_threads_sharing_one_model_are_batched_and_exact(llava_model, flavor, alone):
    m = _model(llava_model.bundle_dir, flavor, 4)
    jobs = _jobs(8)
    out, barrier = {}, threading.Barrier(8)

    def run(i):
        barrier.wait(timeout=60)
        out[i] = m.ask(jobs[i][0], jobs[i][1], max_new_tokens=jobs[i][2]).token_ids

    ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert out == alone


def test_seeded_sampling_does_not_depend_on_the_batch(llava_model, flavor):
    kw = dict(temperature=0.9, top_p=0.9, max_new_tokens=12)
    one = _model(llava_model.bundle_dir, flavor, 1)
    jobs = _jobs(5)
    want = [one.ask(img, q, seed=i, **kw).token_ids for i, (img, q, _) in enumerate(jobs)]
    many = _model(llava_model.bundle_dir, flavor, 5)
    streams = [many.engine.submit(many.prepare(img, q, seed=i, **kw)) for i, (img, q, _) in enumerate(jobs)]
    assert [_tokens(s) for s in streams] == want
    assert len({tuple(w) for w in want}) == len(want)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_prefill_equals_one_shot(llava_model, flavor, alone, chunk):
    from skin_offline.runtime.engine import Engine

    m = _model(llava_model.bundle_dir, flavor, 2, prompt_cache_size=0)
    e = Engine.for_bundle(m.bundle, m.tokenizer, m.vision, parallel=2, chunk_tokens=chunk, prompt_cache=m.prompt_cache)
    try:
        jobs = _jobs(3)
        streams = [e.submit(m.prepare(img, q, max_new_tokens=n)) for img, q, n in jobs]
        assert [_tokens(s) for s in streams] == [alone[i] for i in range(3)]
    finally:
        assert e.close(timeout=30)


def test_prompt_cache_serves_other_slots(llava_model, flavor, alone):
    """A question about an image seen before copies the cached "[INST] " + image into whichever slot it gets."""
    m = _model(llava_model.bundle_dir, flavor, 3)
    img, q, n = _jobs(1)[0]
    assert m.ask(img, q, max_new_tokens=n).token_ids == alone[0]
    busy = m.engine.submit(m.prepare(*_jobs(2)[1][:2], max_new_tokens=30))  # holds slot 0
    next(iter(busy))
    again = m.ask(img, q, max_new_tokens=n)
    list(busy)
    assert again.token_ids == alone[0] and again.timings.prefix_cached and again.timings.vision_s == 0.0
    assert again.timings.prefilled_tokens < again.timings.prompt_tokens - llava_model.manifest.model.image_tokens + 1


def test_memory_does_not_grow_with_requests(llava_model):
    """RSS after 200 mixed requests (greedy, sampled, beam search, label scoring, cancelled) equals RSS after 20:
    rows, prompt cache and feature cache are bounded, and nothing per request stays."""
    psutil = pytest.importorskip("psutil")
    m = _model(llava_model.bundle_dir, "contrib", 4)
    proc = psutil.Process()

    def burst(k):
        streams = []
        for j in range(k):
            img, q = random_image(300 + (j % 12)), QUESTIONS[j % 4]
            kind = j % 5
            if kind == 0:
                req = m.prepare(img, q, max_new_tokens=4 + j % 5)
            elif kind == 1:
                req = m.prepare(img, q, max_new_tokens=6, temperature=0.8, seed=j)
            elif kind == 2:
                req = m.prepare_beam(img, q, num_beams=3, max_new_tokens=5)
            elif kind == 3:
                req = m.prepare_scoring(img, ["melanoma", "nevus", "basal cell carcinoma"])[0]
            else:
                req = m.prepare(img, q, max_new_tokens=300)
            streams.append(m.engine.submit(req))
        streams[-1].cancel()  # the long one
        for s in streams:
            list(s)

    for _ in range(4):
        burst(5)  # 20 requests
    base = proc.memory_info().rss
    for _ in range(36):
        burst(5)  # 180 more
    grown = proc.memory_info().rss - base
    assert grown < 16 << 20, grown
    assert len(m.prompt_cache) <= m.prompt_cache.max_entries
    assert m.engine.stats().active == 0 and sorted(m.engine._free) == list(range(m.engine.slots.n))


def test_old_gqa_bundle_refuses_parallel_with_the_fix(llava_model, tmp_path):
    import json
    import shutil

    from skin_offline.errors import BundleError

    old = tmp_path / "old"
    shutil.copytree(llava_model.bundle_dir, old)
    raw = json.loads((old / names.MANIFEST).read_text())
    for g in raw[names.K_GRAPHS]:  # as written before the typed fields existed
        g.pop("attention", None)
        g.pop("kernel", None)
    (old / names.MANIFEST).write_text(json.dumps(raw))
    one = SkinVL.load(old, threads=1, parallel=1)
    assert one.ask(random_image(1), "What is this?", max_new_tokens=4).token_ids  # still loads and answers
    with pytest.raises(BundleError, match="re-export"):
        _ = SkinVL.load(old, threads=1, parallel=4).engine


def test_decode_steps_pick_the_kernel_by_active_rows(llava_model, tmp_path, monkeypatch):
    """Hybrid bundle: a decode step of >= gemm_min_rows rows runs on the int8 GEMM graph, a lone row on int4."""
    from skin_offline.export.quantize import QuantConfig, quantize_bundle
    from skin_offline.runtime.kernels import policy

    out = tmp_path / "int4"
    quantize_bundle(llava_model.bundle_dir, out, QuantConfig("int4"), quality=False, log=lambda m: None)
    monkeypatch.setenv(policy.GEMM_MIN_ROWS_ENV, "3")
    m = SkinVL.load(out, threads=1, prefill="int8", parallel=4)
    dec = m.bundle.decoder
    used = []
    pick = dec.session_for
    dec.session_for = lambda rows: used.append((rows, pick(rows) is dec.gemm_session)) or pick(rows)
    # steps forced, not left to timing (a loaded machine admits slowly): all three answers are long, so
    # while the last one decodes the other two are still in the batch (3 rows); then two are cancelled
    # and the last decodes alone (1 row)
    streams = [m.engine.submit(m.prepare(img, q, max_new_tokens=400)) for img, q, _ in _jobs(3)]
    last = iter(streams[-1])
    for _ in range(4):
        next(last)
    for s in streams[:2]:
        s.cancel()
        assert [r.finish_reason for r in s][-1] == FinishReason.CANCELLED  # not an early EOS: they overlapped
    for _ in range(4):
        next(last)
    last.close()
    assert all(g == (rows >= 3) for rows, g in used)
    assert any(rows == 3 and g for rows, g in used) and any(rows == 1 and not g for rows, g in used)
