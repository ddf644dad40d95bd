"""Zero-shot classification by likelihood (runtime/classify.py) against transformers' log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_image, reference_embeds

LABELS = ["melanoma", "nevus", "seborrheic keratosis", "basal cell carcinoma", "cafe-au-lait macule", "AIMP"]
LABEL_FILE = Path(__file__).resolve().parents[1] / "skin_offline" / "eval" / "data" / "zero_shot_labels.json"
ATOL = 1e-4  # same budget as test_parity: fp32 onnxruntime vs torch


def _all_labels():
    sets = json.loads(LABEL_FILE.read_text())["datasets"]
    return sorted({x for labels in sets.values() for x in labels})


def test_label_tokens_are_the_answer_tokens_of_a_training_turn(llava_model):
    """encode(label) == the label's ids inside `... [/INST] {label} </s>` tokenized in one piece (LLaVA's turn)."""
    from skin_offline.runtime.classify import QUESTION_TEMPLATE, label_token_ids

    tok = llava_model.runtime.tokenizer
    head = "\n" + QUESTION_TEMPLATE.format(labels="a, b") + " [/INST]"
    for label in _all_labels():
        full = tok.encode(head + " " + label + " ")
        ids = label_token_ids(tok, label)
        assert full[: len(tok.encode(head))] == tok.encode(head)
        assert full[len(tok.encode(head)) : len(tok.encode(head)) + len(ids)] == ids, label


@pytest.fixture(scope="module")
def image():
    return random_image(21, size=(80, 120))


def _reference_logprobs(m, image, question, labels):
    """Per label: transformers' log-probs of its tokens after the prompt (one full forward per label)."""
    from skin_offline.runtime.classify import label_token_ids
    from skin_offline.runtime.prompt import build_prompt_ids

    rt = m.runtime
    ids = build_prompt_ids(rt.tokenizer, question)
    _, prefix = reference_embeds(m.ref, ids, rt.pixels(image))  # [1,S,H] torch
    out = {}
    for label in labels:
        lab = label_token_ids(rt.tokenizer, label)
        emb = torch.cat([prefix, m.ref.get_input_embeddings()(torch.tensor([lab]))], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(m.ref(inputs_embeds=emb).logits[0].double(), -1)
        s = prefix.shape[1]
        out[label] = np.array([logp[s - 1 + j, t].item() for j, t in enumerate(lab)])
    return out


def test_scores_equal_transformers_logprobs(llava_model, image):
    rt = llava_model.runtime
    ranking = rt.classify(image, LABELS)
    ref = _reference_logprobs(llava_model, image, ranking.question, LABELS)
    assert {s.label for s in ranking.scores} == set(LABELS)
    for s in ranking.scores:
        assert s.n_tokens == len(ref[s.label])
        assert s.logprob == pytest.approx(ref[s.label].sum(), abs=ATOL)
        assert s.score == pytest.approx(ref[s.label].mean(), abs=ATOL)  # length-normalised by default
    best = max(LABELS, key=lambda x: ref[x].mean())
    assert ranking.top == best
    probs = np.array([s.probability for s in ranking.scores])
    scores = np.array([s.score for s in ranking.scores])
    assert probs.sum() == pytest.approx(1.0) and np.all(np.diff(scores) <= 0)
    assert np.allclose(probs, np.exp(scores) / np.exp(scores).sum())


def test_unnormalised_scores_are_sums(llava_model, image):
    rt = llava_model.runtime
    ranking = rt.classify(image, LABELS, normalize=False)
    assert not ranking.normalized
    for s in ranking.scores:
        assert s.score == s.logprob


def test_ranking_stable_under_label_order(llava_model, image):
    rt = llava_model.runtime
    base = rt.classify(image, LABELS)
    rng = np.random.default_rng(0)
    for _ in range(2):
        perm = list(rng.permutation(LABELS))
        other = rt.classify(image, perm)
        assert other.question == base.question
        assert [s.label for s in other.scores] == [s.label for s in base.scores]
        assert [s.score for s in other.scores] == pytest.approx([s.score for s in base.scores], abs=1e-6)


def _reference_ranking(rt, image, labels):
    """What the runtime scored before label scoring moved into the engine (tests/decode_loop.py)."""
    from skin_offline.runtime.classify import canonical_labels, label_token_ids, question_for
    from skin_offline.runtime.prompt import build_prompt_ids

    from decode_loop import embed_prompt, label_logprobs_with_decoder

    names = canonical_labels(labels)
    ids = build_prompt_ids(rt.tokenizer, question_for(names))
    embeds = embed_prompt(rt, ids, rt.image_features(rt.pixels(image)))
    lps = label_logprobs_with_decoder(
        rt.bundle.decoder, embeds, rt.bundle.embed, [label_token_ids(rt.tokenizer, n) for n in names]
    )
    return dict(zip(names, lps))


def _label_sets():
    return json.loads(LABEL_FILE.read_text())["datasets"]


def test_every_paper_label_set_scores_as_before_alone_and_batched(llava_model, image):
    """Every label set of the paper, scored through the engine alone (one request) and all at once with a greedy
    request sharing the decoder runs, equals the pre-engine computation within 1e-5 (fp32)."""
    from skin_offline.runtime.pipeline import SkinVL

    rt = llava_model.runtime
    sets = _label_sets()
    refs = {name: _reference_ranking(rt, image, labels) for name, labels in sets.items()}

    def check(name, ranking):
        ref = refs[name]
        assert {s.label for s in ranking.scores} == set(ref)
        for s in ranking.scores:
            assert s.n_tokens == len(ref[s.label]), (name, s.label)
            assert s.logprob == pytest.approx(ref[s.label].sum(), abs=1e-5), (name, s.label)

    for name, labels in sets.items():
        check(name, rt.classify(image, labels))
    m = SkinVL(rt.bundle, rt.tokenizer, parallel=4)
    try:
        greedy = m.engine.submit(m.prepare(image, "Describe it.", max_new_tokens=30))
        reqs = {name: m.prepare_scoring(image, labels) for name, labels in sets.items()}
        streams = {name: m.engine.submit(req) for name, (req, _) in reqs.items()}
        for name, stream in streams.items():
            from skin_offline.runtime.classify import question_for, rank

            last = list(stream)[-1]
            labels = reqs[name][1]
            check(name, rank(labels, list(last.label_logprobs), question_for(labels)))
        assert list(list(greedy)[-1].tokens) == rt.ask(image, "Describe it.", max_new_tokens=30).token_ids
    finally:
        m.close()


def test_batched_labels_equal_one_at_a_time(llava_model, image):
    rt = llava_model.runtime
    a = rt.classify(image, LABELS, batch_size=1)
    b = rt.classify(image, LABELS, batch_size=4)
    assert [s.label for s in a.scores] == [s.label for s in b.scores]
    assert [s.logprob for s in a.scores] == pytest.approx([s.logprob for s in b.scores], abs=1e-5)


@pytest.mark.parametrize("labels", [["melanoma"], ["melanoma", " "], ["Nevus", "nevus"]])
def test_bad_label_lists_are_named_errors(llava_model, image, labels):
    from skin_offline.errors import UsageError

    with pytest.raises(UsageError):
        llava_model.runtime.classify(image, labels)
