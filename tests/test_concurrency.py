"""One loaded SkinVL serving many threads (the desktop-tool case).

Contract (README "Reliability and privacy"): a SkinVL may be shared by any number of threads; each call
owns its KV cache, sampler and detokenizer; the image-feature cache is locked and bounded. Checked
here: 12 requests on 8+ threads (different images and questions, greedy and seeded sampling, streaming
and not, the same image from several threads at once) give exactly the answers of sequential runs,
the answers differ from each other (so cross-talk would show), the feature cache stays at its size
and memory does not grow from one round to the next.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import random_image

QUESTIONS = [
    "What is this lesion?",
    "Describe the colour.",
    "Is the border regular?",
    "Where might this be?",
    "Is it benign or malignant?",
    "What should the doctor check next?",
]
N_NEW = 24


def _requests():
    reqs = []
    for i in range(12):
        img = random_image(100 + i % 9, size=(40 + 3 * i, 30 + 2 * i))  # 9 images: some shared by 2 requests
        kw = dict(max_new_tokens=N_NEW)
        if i % 3 == 2:
            kw.update(temperature=0.8, top_p=0.9, seed=i)  # sampled, seeded: must be reproducible per call
        reqs.append((img, QUESTIONS[i % len(QUESTIONS)], kw, i % 2 == 1))  # odd: consume the stream
    return reqs


def _run(model, req):
    img, q, kw, streaming = req
    if streaming:
        return "".join(r.text for r in model.stream(img, q, **kw))
    return model.ask(img, q, **kw).answer


@pytest.fixture(scope="module")
def shared_model(llava_model):
    from skin_offline.runtime.pipeline import SkinVL

    return SkinVL.load(llava_model.bundle_dir, threads=1)


def test_threads_match_sequential(shared_model):
    reqs = _requests()
    sequential = [_run(shared_model, r) for r in reqs]
    assert len(set(sequential)) >= len(reqs) - 2  # different requests give different answers
    shared_model.vision._cache.clear()  # the threads start cold, racing on the feature cache too
    barrier = threading.Barrier(8)

    def job(i, r):
        if i < 8:
            barrier.wait(timeout=60)  # the first 8 start together
        return _run(shared_model, r)

    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(job, range(len(reqs)), reqs))
    assert concurrent == sequential


def test_same_image_many_threads(shared_model):
    img = random_image(7, size=(50, 41))
    want = shared_model.ask(img, "What is this lesion?", max_new_tokens=N_NEW).answer
    shared_model.vision._cache.clear()
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(
            pool.map(lambda _: shared_model.ask(img, "What is this lesion?", max_new_tokens=N_NEW).answer, range(8))
        )
    assert got == [want] * 8


def test_bounded_memory_and_cache(shared_model):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    reqs = _requests()

    def round_():
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda r: _run(shared_model, r), reqs))
        assert len(shared_model.vision._cache) <= shared_model.vision.cache_size

    round_()
    base = proc.memory_info().rss
    for _ in range(3):
        round_()
    grown = proc.memory_info().rss - base
    # each request's KV cache is a few hundred KB here; a leak of caches/features would add MBs per round
    m = shared_model.manifest.model
    per_round = len(reqs) * (m.kv_bytes_per_token() * (64 + N_NEW) + m.image_tokens * m.hidden_size * 4)
    assert grown < 3 * per_round + (32 << 20), (grown, per_round)
