"""Constrained answers and log-probabilities (runtime/constraints.py) on the random-weight model, whose arbitrary
tokens exercise the masks hard.

- Every greedy and seeded-sampled answer of the suite (tests/constraint_cases.py) that finishes with `stop` is valid:
  JSON schemas by the `jsonschema` library, regexes by full match, choices by membership, Lark grammars by the `lark`
  parser. Answers cut by max_new_tokens finish with `length` and are never claimed valid.
- The constrained greedy tokens equal an independent reference: transformers' `generate` on the same fp32 model with
  a logits processor that applies llguidance's mask (also for beam search, one matcher per beam).
- Unconstrained rows sharing decoder runs with constrained ones are token-identical to running alone.
- Log-probabilities equal log-softmax of transformers' logits at every position (1e-4), streamed or not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skin_offline import names
from skin_offline.errors import ConstraintError
from skin_offline.runtime.constraints import Choice, Grammar, JsonObject, JsonSchema, Regex

from conftest import random_image, reference_embeds
from constraint_cases import CHOICES, CLINIC_FORM, GRAMMARS, REGEXES, SCHEMAS, valid

QUESTION = "Describe the lesion."
MAX_NEW = 48


@pytest.fixture(scope="module")
def model(llava_model):
    from skin_offline.runtime.bundle import Bundle
    from skin_offline.runtime.pipeline import SkinVL
    from skin_offline.runtime.tokenizer import TextTokenizer

    b = Bundle.load(llava_model.bundle_dir, threads=1)
    # the suite is submitted at once: its queue holds every case, so the test does not depend on the engine taking
    # requests into slots while they are submitted (on a loaded machine it sometimes did not: EngineBusy)
    m = SkinVL(b, TextTokenizer.from_file(b.folder / names.TOKENIZER), parallel=8, max_queue=len(suite()))
    yield m
    m.close()


def suite():
    return (
        [JsonSchema(s) for s in SCHEMAS]
        + [JsonObject()]
        + [Regex(r) for r in REGEXES]
        + [Choice(c) for c in CHOICES]
        + [Grammar(g) for g in GRAMMARS]
    )


def _run_all(model, constraints, **kw):
    """Submit every constrained request at once (the engine decodes them together); their answers."""
    from skin_offline.runtime.pipeline import collect

    streams = [
        model.engine.submit(
            model.prepare(random_image(80 + i % 5), QUESTION, max_new_tokens=MAX_NEW, constraint=c, **kw)
        )
        for i, c in enumerate(constraints)
    ]
    return [collect(s) for s in streams]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_p=0.95, seed=11)], ids=["greedy", "sampled"])
def test_every_finished_answer_of_the_suite_is_valid(model, sampling):
    cases = suite()
    assert len([c for c in cases if isinstance(c, JsonSchema)]) >= 30
    answers = _run_all(model, cases, **sampling)
    stopped = 0
    for c, a in zip(cases, answers):
        if a.finish_reason.value == "stop":
            stopped += 1
            assert valid(c, a.answer), (c, a.answer)
        else:
            assert a.finish_reason.value == "length" and len(a.token_ids) == MAX_NEW
    assert stopped >= 0.75 * len(cases), stopped  # bounded strings and arrays: most answers finish


def test_a_constraint_that_cannot_finish_in_time_stops_at_max_tokens(model):
    """1000 items cannot fit in 12 tokens: the answer stops at max_new_tokens, `length`, not claimed complete."""
    c = JsonSchema({"type": "array", "items": {"type": "integer"}, "minItems": 1000})
    a = model.ask(random_image(1), QUESTION, max_new_tokens=12, constraint=c)
    assert a.finish_reason.value == "length" and len(a.token_ids) == 12 and not valid(c, a.answer)


class _MaskProcessor:
    """transformers LogitsProcessor: llguidance's mask for each row, rebuilt from that row's generated tokens."""

    def __init__(self, grammar: str, tokenizer_json, prompt_len: int):
        import llguidance

        self.tok = llguidance.LLTokenizer(str(tokenizer_json), eos_token=2)
        self.grammar, self.prompt_len = grammar, prompt_len

    def __call__(self, input_ids, scores):
        import llguidance
        import llguidance.numpy as lln

        out = scores.clone()
        for r in range(input_ids.shape[0]):
            m = llguidance.LLMatcher(self.tok, self.grammar, log_level=0)
            assert m.consume_tokens(input_ids[r, self.prompt_len :].tolist()), m.get_error()
            bits = lln.allocate_token_bitmask(1, self.tok.vocab_size)
            lln.fill_next_token_bitmask(m, bits)
            allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: self.tok.vocab_size].astype(bool)
            row = out[r]
            row[: len(allowed)][torch.from_numpy(~allowed)] = -float("inf")
            row[len(allowed) :] = -float("inf")
        return out


def _reference(llava_model, model, c, image, max_new, **gen):
    """transformers' generate (greedy or beams) with llguidance's mask: the answer tokens, EOS stripped."""
    from skin_offline.runtime.prompt import build_prompt_ids

    ids = build_prompt_ids(model.tokenizer, QUESTION)
    _, embeds = reference_embeds(llava_model.ref, ids, model.pixels(image))
    grammar = model.vocabulary.compile(c).grammar
    proc = _MaskProcessor(grammar, llava_model.bundle_dir / names.TOKENIZER, 0)
    with torch.no_grad():
        out = llava_model.ref.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
            logits_processor=[proc],
            **gen,
        )
    tokens = out[0].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


PARITY = [JsonSchema(SCHEMAS[i]) for i in (1, 6, 14, 26, 30)] + [
    JsonSchema(CLINIC_FORM),
    Regex(REGEXES[0]),
    Choice(CHOICES[2]),
    Grammar(GRAMMARS[1]),
]


@pytest.mark.parametrize("c", PARITY, ids=lambda c: type(c).__name__)
def test_constrained_greedy_equals_transformers_with_llguidance_mask(llava_model, model, c):
    img = random_image(5)
    ours = model.ask(img, QUESTION, max_new_tokens=MAX_NEW, constraint=c).token_ids
    ref = _reference(llava_model, model, c, img, MAX_NEW)
    assert [t for t in ours if t != 2] == ref


@pytest.mark.parametrize(
    "c", [Choice(CHOICES[2]), JsonSchema(SCHEMAS[6]), Regex(REGEXES[3])], ids=lambda c: type(c).__name__
)
def test_constrained_beams_equal_transformers_with_llguidance_mask(llava_model, model, c):
    """A mask per beam row, each beam's matcher forked with it: transformers' beam search with the same masks."""
    img = random_image(6)
    ours = model.generate_beam(img, QUESTION, num_beams=3, max_new_tokens=24, constraint=c)
    ref = _reference(llava_model, model, c, img, 24, num_beams=3)
    assert [t for t in ours.token_ids if t != 2] == ref
    if ours.finish_reason.value == "stop":
        assert valid(c, ours.answer), ours.answer


def test_unconstrained_rows_beside_constrained_ones_are_unchanged(model):
    jobs = [(random_image(90 + i), q) for i, q in enumerate(["What is this?", "Describe the border.", "Benign?"])]
    alone = [model.ask(img, q, max_new_tokens=20).token_ids for img, q in jobs]
    alone_sampled = model.ask(jobs[0][0], "Colour?", max_new_tokens=20, temperature=0.9, seed=3).token_ids
    constrained = [
        model.engine.submit(model.prepare(random_image(70 + i), QUESTION, max_new_tokens=MAX_NEW, constraint=c))
        for i, c in enumerate(PARITY[:4])
    ]
    free = [model.engine.submit(model.prepare(img, q, max_new_tokens=20)) for img, q in jobs]
    sampled = model.engine.submit(model.prepare(jobs[0][0], "Colour?", max_new_tokens=20, temperature=0.9, seed=3))
    assert [list(list(s)[-1].tokens) for s in free] == alone
    assert list(list(sampled)[-1].tokens) == alone_sampled
    for s in constrained:
        list(s)


def test_logprobs_are_the_models_own_distribution_streamed_or_not(llava_model, model):
    """Each token's logprob and top-5 equal log-softmax of transformers' logits at that position (before masks and
    temperature), for a free and a constrained answer; the streamed responses carry the same entries."""
    from skin_offline.runtime.prompt import build_prompt_ids
    from skin_offline.runtime.sampling import log_softmax

    img = random_image(7)
    ids = build_prompt_ids(model.tokenizer, QUESTION)
    _, embeds = reference_embeds(llava_model.ref, ids, model.pixels(img))
    for c in (None, JsonSchema(CLINIC_FORM)):
        a = model.ask(img, QUESTION, max_new_tokens=24, constraint=c, logprobs=5)
        streamed = [
            e for r in model.stream(img, QUESTION, max_new_tokens=24, constraint=c, logprobs=5) for e in r.logprobs
        ]
        # the second run starts from the prompt cache (image prefill reused): the same tokens, logprobs within 1e-6
        assert [(e.token, [t for t, _ in e.top]) for e in streamed] == [
            (e.token, [t for t, _ in e.top]) for e in a.logprobs
        ]
        assert np.allclose([e.logprob for e in streamed], [e.logprob for e in a.logprobs], atol=1e-6)
        toks = [t for t in a.token_ids if t != 2]
        assert [e.token for e in a.logprobs] == toks
        with torch.no_grad():  # teacher-forced over the answer: the logits at every position
            feed = torch.cat([embeds, llava_model.ref.get_input_embeddings()(torch.tensor([toks]))], dim=1)
            logits = llava_model.ref(inputs_embeds=feed).logits[0, embeds.shape[1] - 1 : -1].double().numpy()
        for e, lg in zip(a.logprobs, logits):
            ref = log_softmax(lg)
            assert abs(e.logprob - ref[e.token]) < 1e-4
            top = np.argsort(-ref, kind="stable")[:5]
            assert [t for t, _ in e.top] == top.tolist()
            assert np.allclose([lp for _, lp in e.top], ref[top], atol=1e-4)


def test_logprobs_in_openai_shape(model):
    from skin_offline.runtime.response import logprob_content

    a = model.ask(random_image(8), QUESTION, max_new_tokens=6, logprobs=2)
    content = logprob_content(model.tokenizer, a.logprobs)
    assert len(content) == len(a.logprobs) and all(
        set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in content
    )
    assert all(
        len(e["top_logprobs"]) == 2 and e["bytes"] == list(e["token"].encode()) or "\ufffd" in e["token"]
        for e in content
    )
    assert model.ask(random_image(8), QUESTION, max_new_tokens=3).logprobs is None  # not asked: not computed


@pytest.mark.parametrize(
    "c,field,match",
    [
        (JsonSchema({"type": "array", "uniqueItems": True}), "response_format", "uniqueItems"),
        (JsonSchema({"type": "string", "format": "no-such-format"}), "schema", "no-such-format"),
        (JsonSchema({"not": {"type": "string"}}), "schema", "not"),
        (Regex("("), "--regex", "unclosed group"),
        (Choice([]), "choice", "one or more"),
        (Choice(["a", "a"]), "choice", "repeat"),
        (Grammar("start: foo"), "grammar", "unknown name"),
        (JsonSchema({"enum": ["x" * 70_000]}), "schema", "over the limit"),
    ],
)
def test_unusable_constraints_are_named_errors_before_any_work(model, c, field, match):
    with pytest.raises(ConstraintError, match=match) as e:
        model.prepare(random_image(1), QUESTION, constraint=c, constraint_field=field)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)
    assert model.engine.stats().queued == 0


def test_constraints_refuse_what_they_cannot_work_with(model):
    with pytest.raises(ConstraintError, match="stop"):
        model.prepare(random_image(1), QUESTION, constraint=Choice(["a", "b"]), stop=["\n"])
    with pytest.raises(ConstraintError, match="min_new_tokens"):
        model.prepare_beam(random_image(1), QUESTION, num_beams=2, min_new_tokens=3, constraint=Choice(["a", "b"]))


def test_masks_in_a_worker_or_before_sampling_give_the_same_answers(model):
    """Without a core beyond the decoder's threads the engine computes each mask just before sampling instead of in
    a worker thread (engine.spare_core); where the mask was computed must not change an answer."""
    from skin_offline.runtime.engine import spare_core

    assert model.engine.masks_in_worker == spare_core(model.bundle.decoder.session)
    cases = [JsonSchema(CLINIC_FORM), Regex(REGEXES[0]), Choice(CHOICES[0]), Grammar(GRAMMARS[0])]
    before = model.engine.masks_in_worker
    try:
        model.engine.masks_in_worker = True
        worker = _run_all(model, cases)
        model.engine.masks_in_worker = False
        inline = _run_all(model, cases)
    finally:
        model.engine.masks_in_worker = before
    assert [a.token_ids for a in worker] == [a.token_ids for a in inline]
    assert all(a.token_ids for a in inline)


def test_a_spare_core_is_one_beyond_the_sessions_threads():
    import os
    from types import SimpleNamespace

    from skin_offline.runtime.engine import spare_core

    def session(threads):
        return SimpleNamespace(get_session_options=lambda: SimpleNamespace(intra_op_num_threads=threads))

    cores = len(os.sched_getaffinity(0))
    assert not spare_core(session(cores)) and not spare_core(session(cores + 2))
    assert not spare_core(session(0))  # onnxruntime's default: a thread per core
    assert spare_core(session(cores - 1)) == (cores > 1)
