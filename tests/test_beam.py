"""Beam search (runtime/beam.py) as an engine request, against transformers' beam search on the tiny random model.

Greedy beams must be token-identical: through the engine for k = 1, 3, 5, alone and while greedy and sampled
requests share its decoder runs, on both decoder graphs. A random model rarely emits the real EOS, so the search's
rules are also checked on their own (a decoder-driven loop, tests/decode_loop.py) with a stand-in "EOS": a token
the reference's own beams produce early, so hypotheses finish at different lengths, which exercises the finished
pool, the length penalty, min_new_tokens and the early-stopping rules. Sampling in beams cannot match torch's RNG;
its runs are checked for seeded reproducibility and for independence from what else shares the batch.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from skin_offline import names

from conftest import random_image, reference_embeds
from decode_loop import beam_with_decoder, embed_prompt

MAX_NEW = 14
QUESTION = "What is this lesion?"


@pytest.fixture(scope="module")
def prompt(llava_model):
    from skin_offline.runtime.prompt import build_prompt_ids

    rt = llava_model.runtime
    img = random_image(3)
    ids = build_prompt_ids(rt.tokenizer, QUESTION)
    pixels = rt.pixels(img)
    embeds = embed_prompt(rt, ids, rt.image_features(pixels))
    _, ref_embeds = reference_embeds(llava_model.ref, ids, pixels)
    return img, embeds, ref_embeds


def _reference_beams(ref, embeds, eos, **kw):
    with torch.no_grad():
        out = ref.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            **kw,
        )
    tokens = out[0].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _config(**kw):
    from skin_offline.runtime.beam import BeamConfig, EarlyStopping

    es = {False: EarlyStopping.HEURISTIC, True: EarlyStopping.EAGER, "never": EarlyStopping.NEVER}[
        kw.pop("early_stopping", False)
    ]
    return BeamConfig(early_stopping=es, **kw)


@pytest.fixture(scope="module")
def base_beams(llava_model, prompt):
    """The reference's own 4-beam output: its tokens serve as frequent stand-in EOS ids."""
    return _reference_beams(llava_model.ref, prompt[2], 2, num_beams=4, max_new_tokens=MAX_NEW)


CASES = [  # (num_beams, length_penalty, early_stopping, min_new_tokens, EOS = id 2 or base_beams[i], max_new)
    (2, 1.0, False, 0, None, MAX_NEW),
    (4, 1.0, False, 0, 2, MAX_NEW),
    (4, 0.0, True, 0, 4, MAX_NEW),
    (3, 2.0, "never", 3, 2, MAX_NEW),
    (5, -0.5, False, 5, 4, MAX_NEW),
    (4, 1.0, True, 2, 4, MAX_NEW),
    (3, 0.0, False, 0, 4, 40),
    (3, 0.0, "never", 0, 4, 40),
]


@pytest.mark.parametrize("case", CASES)
def test_search_rules_identical_to_transformers(llava_model, prompt, base_beams, case):
    k, lp, es, mn, eos_pos, max_new = case
    _, embeds, ref_embeds = prompt
    kw = dict(num_beams=k, max_new_tokens=max_new, length_penalty=lp, early_stopping=es, min_new_tokens=mn)
    eos = 2 if eos_pos is None else base_beams[eos_pos]
    ref = _reference_beams(llava_model.ref, ref_embeds, eos, **kw)
    rt = llava_model.runtime
    tokens, finish, steps = beam_with_decoder(
        rt.bundle.decoder, embeds, rt.bundle.embed, _config(**kw), eos, rt.tokenizer
    )
    assert tokens == ref
    assert finish.value == ("stop" if ref[-1] == eos else "length")
    if max_new == 40:  # these cases must exercise the early-stopping rule: nothing can improve long before 40
        assert steps < 20


def _engine_model(llava_model, flavor, parallel):
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.tokenizer import TextTokenizer

    b = Bundle.load(llava_model.bundle_dir, threads=1, flavor=flavor)
    return SkinVL(b, TextTokenizer.from_file(b.folder / names.TOKENIZER), parallel=parallel)


@pytest.fixture(scope="module", params=["contrib", "standard"])
def flavor(request):
    return request.param


@pytest.mark.parametrize("k", [1, 3, 5])
def test_engine_beams_identical_to_transformers_alone_and_batched(llava_model, prompt, flavor, k):
    """One prefill, forked to k rows, decoded in the engine's shared runs: the same tokens as transformers, alone and
    while a greedy and a sampled request share every decoder run (whose own tokens stay those they get alone)."""
    img, _, ref_embeds = prompt
    ref = _reference_beams(llava_model.ref, ref_embeds, 2, num_beams=k, max_new_tokens=MAX_NEW)
    m = _engine_model(llava_model, flavor, parallel=3)
    try:
        alone = m.generate_beam(img, QUESTION, num_beams=k, max_new_tokens=MAX_NEW)
        assert alone.token_ids == ref
        assert alone.answer == m.tokenizer.decode(ref)
        others = [
            (random_image(40), "Describe the border.", dict(max_new_tokens=30)),
            (random_image(41), "Benign?", dict(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=5)),
        ]
        solo = [m.ask(i, q, **kw).token_ids for i, q, kw in others]
        streams = [m.engine.submit(m.prepare(i, q, **kw)) for i, q, kw in others]
        beam = m.engine.submit(m.prepare_beam(random_image(3), QUESTION, num_beams=k, max_new_tokens=MAX_NEW))
        last = list(beam)[-1]
        assert list(last.tokens) == ref
        assert [list(list(s)[-1].tokens) for s in streams] == solo
    finally:
        m.close()


def test_paper_beam_sampling_is_seeded_and_batch_independent(llava_model, prompt):
    """The paper protocol (sampling inside 5 beams, seeded per row) draws the same tokens alone and among others."""
    from dataclasses import replace

    from skin_offline.eval.vqa import PAPER_BEAMS

    img = prompt[0]
    cfg = replace(PAPER_BEAMS, max_new_tokens=12, min_new_tokens=4, seed=7)
    m = _engine_model(llava_model, "contrib", parallel=4)
    try:
        a = m.generate_beam(img, QUESTION, config=cfg).token_ids
        assert a == m.generate_beam(img, QUESTION, config=cfg).token_ids
        assert len(a) >= 4 and 2 not in a[:4]
        hot = replace(cfg, temperature=1.5)
        assert any(
            m.generate_beam(img, QUESTION, config=replace(hot, seed=s)).token_ids
            != m.generate_beam(img, QUESTION, config=hot).token_ids
            for s in range(8, 12)
        )
        batch = [
            m.engine.submit(m.prepare_beam(random_image(50 + i), QUESTION, config=replace(cfg, seed=i)))
            for i in range(3)
        ]
        mine = m.engine.submit(m.prepare_beam(img, QUESTION, config=cfg))
        assert list(list(mine)[-1].tokens) == a
        for i, s in enumerate(batch):
            assert (
                list(list(s)[-1].tokens)
                == m.generate_beam(random_image(50 + i), QUESTION, config=replace(cfg, seed=i)).token_ids
            )
    finally:
        m.close()


def test_beam_rows_are_forked_and_reordered_never_recomputed(llava_model, prompt):
    """After the one prefill, every decoder run feeds exactly one token per beam row (no prompt recomputed)."""
    img = prompt[0]
    m = _engine_model(llava_model, "contrib", parallel=1)
    calls = []
    real_prefill, real_decode = m.engine.slots.prefill, m.engine.slots.decode
    m.engine.slots.prefill = lambda slot, e: (calls.append(("prefill", e.shape[1])), real_prefill(slot, e))[1]
    m.engine.slots.decode = lambda slots, e: (calls.append(("decode", len(slots))), real_decode(slots, e))[1]
    try:
        m.prompt_cache.max_entries = 0
        ans = m.generate_beam(img, QUESTION, num_beams=3, max_new_tokens=6)
        assert len(ans.token_ids) == 6
        prompt_len = ans.timings.prompt_tokens
        assert sum(n for kind, n in calls if kind == "prefill") == prompt_len  # the prompt once (in chunks)
        assert [c for c in calls if c[0] == "decode"] == [("decode", 3)] * 5
    finally:
        m.close()


def test_cancelled_beam_request_frees_its_rows_and_leaves_others_unchanged(llava_model):
    m = _engine_model(llava_model, "contrib", parallel=2)
    try:
        img = random_image(60)
        solo = m.ask(img, "Describe the border.", max_new_tokens=40).token_ids
        other = m.engine.submit(m.prepare(img, "Describe the border.", max_new_tokens=40))
        # as long as the context allows (1000 forced tokens: seconds even on a fast machine), so the cancel lands
        # mid-search
        beam = m.engine.submit(
            m.prepare_beam(random_image(61), QUESTION, num_beams=5, max_new_tokens=1000, min_new_tokens=1000)
        )
        stop = threading.Timer(0.3, beam.cancel)
        stop.start()
        last = list(beam)[-1]
        stop.cancel()
        assert last.finish_reason.value == "cancelled"
        assert list(list(other)[-1].tokens) == solo
        assert m.engine.stats().active == 0
        assert sorted(m.engine._free) == list(range(m.engine.slots.n))  # every row back
        assert (
            m.generate_beam(random_image(61), QUESTION, num_beams=5, max_new_tokens=4).finish_reason.value == "length"
        )
    finally:
        m.close()


def test_too_many_beams_for_the_engine_is_a_usage_error(llava_model, prompt):
    from skin_offline.errors import UsageError

    m = _engine_model(llava_model, "contrib", parallel=1)
    try:
        with pytest.raises(UsageError, match="KV rows"):
            m.generate_beam(prompt[0], QUESTION, num_beams=9, max_new_tokens=4)
    finally:
        m.close()


def test_beam_search_clips_to_the_context(llava_model, prompt):
    """max_new_tokens past the context is clipped (and min_new_tokens with it), as a greedy answer is."""
    rt = llava_model.runtime
    req = rt.prepare_beam(prompt[0], QUESTION, num_beams=2, max_new_tokens=10_000, min_new_tokens=9_000)
    left = rt.manifest.model.max_context - req.prompt_tokens
    assert req.mode.max_new_tokens == left and req.mode.min_new_tokens == left


def test_sampling_without_replacement_is_distinct_and_sorted():
    from skin_offline.runtime.beam import _sample_without_replacement

    rng = np.random.default_rng(0)
    scores = np.log(np.array([0.5, 0.3, 0.2, 0.0, 0.0]) + 1e-300)
    scores[3:] = -np.inf
    for _ in range(20):
        idx = _sample_without_replacement(scores, 4, rng)
        assert len(set(idx.tolist())) == 4 and set(idx[:3].tolist()) == {0, 1, 2}  # zero-mass ones come last
    counts = np.bincount([_sample_without_replacement(scores, 1, rng)[0] for _ in range(3000)], minlength=5)
    assert np.allclose(counts / 3000, [0.5, 0.3, 0.2, 0, 0], atol=0.04)
