"""Multi-turn conversations: every turn equals transformers on the full LLaVA template with the earlier
answers as text, while a follow-up prefills only what its cache does not already hold."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import random_image, reference_generate, reference_pixels

QUESTIONS = ("What is this lesion?", "Is the border regular?", "What should the patient do next?")
N = 10


@pytest.fixture(scope="module", params=["contrib", "standard"])
def model(llava_model, request):
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.pipeline import SkinVL

    b = Bundle.load(llava_model.bundle_dir, threads=1, flavor=request.param)
    return SkinVL(b, llava_model.runtime.tokenizer)


def test_each_turn_matches_transformers_on_the_full_history_prompt(llava_model, model):
    from skin_offline.runtime.prompt import build_prompt_ids

    img = random_image(21)
    pixels = reference_pixels(img, llava_model.spec.image_size)
    conv = model.conversation(img)
    history, previous_prompt = [], 0
    for i, q in enumerate(QUESTIONS):
        a = conv.ask(q, max_new_tokens=N)
        ids = build_prompt_ids(model.tokenizer, q, history)
        ref_tokens, _ = reference_generate(llava_model.ref, ids, pixels, N)
        assert a.token_ids == ref_tokens, f"turn {i + 1}"
        assert a.prompt_tokens == len(ids) - 1 + model.manifest.model.image_tokens
        if i:  # the whole previous prompt came from the cache; only the new turn's text was prefilled
            assert a.timings.prefix_cached
            assert 0 < a.timings.prefilled_tokens <= a.prompt_tokens - previous_prompt
        history.append((q, a.answer))
        previous_prompt = a.prompt_tokens
    assert conv.history == history


def test_follow_up_equals_a_fresh_uncached_request(llava_model, model):
    """Same tokens as SkinVL.ask(history=...) on a model with every cache off (the whole prompt prefilled)."""
    from skin_offline.runtime.pipeline import SkinVL

    cold = SkinVL(model.bundle, model.tokenizer, feature_cache_size=0, prompt_cache_size=0)
    img = random_image(22)
    conv = model.conversation(img)
    first = conv.ask(QUESTIONS[0], max_new_tokens=N)
    second = conv.ask(QUESTIONS[1], max_new_tokens=N)
    fresh = cold.ask(img, QUESTIONS[1], history=[(QUESTIONS[0], first.answer)], max_new_tokens=N)
    assert second.token_ids == fresh.token_ids
    assert fresh.timings.prefilled_tokens == fresh.prompt_tokens
    assert second.timings.prefilled_tokens < fresh.prompt_tokens - first.prompt_tokens + 1


def test_abandoned_turn_leaves_the_conversation_intact(llava_model, model):
    img = random_image(23)
    conv = model.conversation(img)
    conv.ask(QUESTIONS[0], max_new_tokens=N)
    stream = conv.stream(QUESTIONS[1], max_new_tokens=N)
    next(stream)
    stream.close()  # the caller walked away mid-answer: no history entry, the previous turn's cache untouched
    assert len(conv.history) == 1
    again = conv.ask(QUESTIONS[1], max_new_tokens=N)
    ref = model.conversation(img)
    ref.ask(QUESTIONS[0], max_new_tokens=N)
    assert again.token_ids == ref.ask(QUESTIONS[1], max_new_tokens=N).token_ids


def test_cli_chat_answers_each_question_and_reports_the_prefill(llava_model):
    img = llava_model.bundle_dir.parent / "chat.png"
    random_image(24).save(img)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "chat",
            str(img),
            "--bundle",
            str(llava_model.bundle_dir),
            "-q",
            QUESTIONS[0],
            "-q",
            QUESTIONS[1],
            "--max-new-tokens",
            "4",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and all("prefilled" in ln for ln in lines)
    total = [int(ln.split("prefilled ")[1].split(" of ")[1].split(",")[0]) for ln in lines]
    done = [int(ln.split("prefilled ")[1].split(" of ")[0]) for ln in lines]
    assert done[0] == total[0] and done[1] < total[1] - total[0] + 1
    stdin = subprocess.run(
        [
            sys.executable,
            "-m",
            "skin_offline.cli",
            "chat",
            str(img),
            "--bundle",
            str(llava_model.bundle_dir),
            "--max-new-tokens",
            "3",
            "--threads",
            "1",
        ],
        input=f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\nexit\nignored\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stdin.returncode == 0, stdin.stderr
    assert sum(ln.startswith("[") for ln in stdin.stderr.splitlines()) == 2


def test_follow_up_skips_the_vision_encoder_even_without_a_feature_cache(llava_model, model, monkeypatch):
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.vision import VisionEncoder

    calls = []
    orig = VisionEncoder.encode
    monkeypatch.setattr(VisionEncoder, "encode", lambda self, px: calls.append(1) or orig(self, px))
    cold = SkinVL(model.bundle, model.tokenizer, feature_cache_size=0, prompt_cache_size=0)
    conv = cold.conversation(random_image(25))
    conv.ask(QUESTIONS[0], max_new_tokens=4)
    second = conv.ask(QUESTIONS[1], max_new_tokens=4)
    assert len(calls) == 1 and second.timings.vision_s == 0.0 and second.timings.prefix_cached
