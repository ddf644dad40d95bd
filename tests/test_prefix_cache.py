"""Feature and prompt caches: a second question about the same image skips the vision encoder and the image
prefill (the engine copies the longest cached prefix into its slot), and gives exactly the tokens of a cold run."""

import numpy as np
import pytest

from skin_offline import names
from skin_offline.runtime.pipeline import SkinVL
from skin_offline.runtime.tokenizer import TextTokenizer

from conftest import random_image


@pytest.fixture(scope="module", params=["contrib", "standard"])
def warm_and_cold(llava_model, request):
    from skin_offline.runtime.bundle import Bundle

    def load(**kw):
        b = Bundle.load(llava_model.bundle_dir, threads=1, flavor=request.param)
        return SkinVL(b, TextTokenizer.from_file(b.folder / names.TOKENIZER), **kw)

    return load(), load(feature_cache_size=0, prompt_cache_size=0)


QUESTIONS = ["What is this lesion?", "Describe the border.", "Is it malignant? Answer in one word."]


def test_cache_hits_give_identical_tokens(warm_and_cold):
    warm, cold = warm_and_cold
    img = random_image(31, size=(80, 120))
    calls = []
    encode = warm.bundle.vision.encode
    warm.bundle.vision.encode = lambda px: calls.append(1) or encode(px)
    try:
        for i, q in enumerate(QUESTIONS + QUESTIONS[:1]):
            a = warm.ask(img, q, max_new_tokens=12)
            b = cold.ask(img, q, max_new_tokens=12)
            assert a.token_ids == b.token_ids
            assert a.timings.prefix_cached == (i > 0) and not b.timings.prefix_cached
            assert a.timings.prompt_tokens == b.timings.prompt_tokens
    finally:
        warm.bundle.vision.encode = encode
    assert len(calls) == 1  # the vision encoder ran once for four questions
    other = random_image(33, size=(80, 120))  # same prompt text, another image: must not hit
    a, b = warm.ask(other, QUESTIONS[0], max_new_tokens=12), cold.ask(other, QUESTIONS[0], max_new_tokens=12)
    assert a.token_ids == b.token_ids and not a.timings.prefix_cached


def test_sampled_answers_reproduce_with_the_cache(warm_and_cold):
    warm, cold = warm_and_cold
    img = random_image(32)
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=5)
    first = warm.ask(img, QUESTIONS[0], **kw).token_ids
    assert warm.ask(img, QUESTIONS[0], **kw).token_ids == first == cold.ask(img, QUESTIONS[0], **kw).token_ids


def test_prompt_cache_is_bounded_and_never_extended(warm_and_cold):
    warm, _ = warm_and_cold
    for seed in range(40, 46):
        warm.ask(random_image(seed), QUESTIONS[1], max_new_tokens=3)
    cache = warm.prompt_cache
    assert 0 < len(cache) <= cache.max_entries and cache.nbytes <= cache.max_bytes
    snap = next(iter(cache._entries.values()))
    keys0 = np.array(snap.keys[0], copy=True)
    a = warm.ask(random_image(45), QUESTIONS[2], max_new_tokens=5)  # continues a copy of a cached prefix
    assert a.timings.prefix_cached
    assert np.array_equal(snap.keys[0], keys0)  # the entry itself is never written
