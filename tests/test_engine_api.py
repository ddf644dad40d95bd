"""The engine's API contract (what the server builds on): submit prepared requests, iterate (sync or async),
cancel, bounded admission, close. Answers equal the single-request path's token for token."""

from __future__ import annotations

import asyncio

import pytest

from skin_offline.errors import ContextLengthError, EngineBusy, EngineClosed, UsageError
from skin_offline.runtime.engine import Engine
from skin_offline.runtime.response import FinishReason

from conftest import random_image


@pytest.fixture(scope="module")
def model(llava_model):
    from skin_offline.runtime.pipeline import SkinVL

    return SkinVL.load(llava_model.bundle_dir, threads=1)


def test_submit_matches_ask_sync_and_async(model):
    img = random_image(3)
    want = model.ask(img, "What is this lesion?", max_new_tokens=20)
    engine = Engine.for_bundle(model.bundle, model.tokenizer, model.vision, parallel=2)
    try:
        got = list(engine.submit(model.prepare(img, "What is this lesion?", max_new_tokens=20)))
        assert "".join(r.text for r in got) == want.answer
        assert got[-1].finish_reason == want.finish_reason and got[-1].timings.new_tokens == len(want.token_ids)

        async def consume():
            s = engine.submit(model.prepare(img, "What is this lesion?", max_new_tokens=20))
            out = [r async for r in s]
            return out, list(out[-1].tokens)

        out, tokens = asyncio.run(consume())
        assert "".join(r.text for r in out) == want.answer and tokens == want.token_ids
    finally:
        assert engine.close(timeout=30)


def test_stop_strings_cut_the_answer(model):
    img = random_image(4)
    full = model.ask(img, "Describe it.", max_new_tokens=30).answer
    assert len(full) > 6
    stop = full[3:6]
    cut = model.ask(img, "Describe it.", max_new_tokens=30, stop=[stop, "\x00never"])
    assert cut.answer == full[: full.index(stop)] and cut.finish_reason == FinishReason.STOP
    streamed = "".join(r.text for r in model.stream(img, "Describe it.", max_new_tokens=30, stop=[stop]))
    assert streamed == cut.answer


def test_cancel_and_busy_and_close(model):
    img = random_image(5)
    engine = Engine.for_bundle(model.bundle, model.tokenizer, model.vision, parallel=1, max_queue=1)
    try:
        first = engine.submit(model.prepare(img, "What is this lesion?", max_new_tokens=200))
        it = iter(first)
        next(it)  # running now
        engine.submit(model.prepare(img, "Second?", max_new_tokens=5))  # the one queue place
        with pytest.raises(EngineBusy):
            engine.submit(model.prepare(img, "Third?", max_new_tokens=5))
        first.cancel()
        last = list(it)[-1]
        assert last.finish_reason == FinishReason.CANCELLED and last.timings.new_tokens < 200
    finally:
        assert engine.close(timeout=30)
    with pytest.raises(EngineClosed):
        engine.submit(model.prepare(img, "After close?", max_new_tokens=5))


def test_prepare_refuses_before_admission(model):
    img = random_image(6)
    with pytest.raises(UsageError):
        model.prepare(img, "q", top_p=0.0, temperature=1.0)
    with pytest.raises(UsageError):
        model.prepare(img, "q", stop=[""])
    limit = model.manifest.model.max_context
    with pytest.raises(ContextLengthError) as e:
        model.prepare(img, "q", max_new_tokens=limit, strict_context=True)
    assert str(limit) in str(e.value)
    assert model.prepare(img, "q", max_new_tokens=limit).max_new_tokens < limit  # clipped by default


def test_closed_consumer_cancels(model):
    engine = Engine.for_bundle(model.bundle, model.tokenizer, model.vision, parallel=1)
    try:
        s = engine.submit(model.prepare(random_image(7), "What is this lesion?", max_new_tokens=300))
        it = iter(s)
        next(it)
        it.close()  # e.g. a client that disconnected
        assert s.cancelled.is_set()
    finally:
        assert engine.close(timeout=30)
