"""VQA metrics against hand-computed values and against sacrebleu (an independent BLEU implementation)."""

from __future__ import annotations

import math

import pytest

from skin_offline.eval import metrics

REFS = ["the cat is on the mat", "a red scaly plaque on the arm"]
HYPS = ["the cat sat on the mat", "red plaque on the arm"]


def test_bleu_by_hand_single_sentence():
    # unigrams 5/6 (clipped "the" x2), bigrams 3/5, trigrams 1/4, equal lengths (no brevity penalty)
    b = metrics.bleu(REFS[:1], HYPS[:1])
    assert b[1] == pytest.approx(5 / 6)
    assert b[2] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b[3] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_corpus_bleu_matches_sacrebleu(order):
    """Corpus-level (pooled counts + brevity penalty over the corpus), as sacrebleu with whitespace tokens."""
    from sacrebleu.metrics import BLEU

    refs = REFS + ["benign nevus with regular pigment network", "the image shows a digital mucous cyst ."]
    hyps = HYPS + ["a benign nevus with a regular network", "the image shows a mucous cyst on a finger ."]
    ref = BLEU(tokenize="none", smooth_method="none", max_ngram_order=order, effective_order=False)
    expected = ref.corpus_score(hyps, [refs]).score / 100
    assert metrics.bleu(refs, hyps)[order] == pytest.approx(expected, abs=1e-9)


def test_bleu_is_corpus_level_not_a_mean():
    b = metrics.bleu(REFS, HYPS)[1]
    per_sentence = [metrics.bleu([r], [h])[1] for r, h in zip(REFS, HYPS)]
    # pooled: 10 matching unigrams of 11, times the corpus brevity penalty exp(1 - 13/11)
    assert b == pytest.approx(10 / 11 * math.exp(1 - 13 / 11))
    assert b != pytest.approx(sum(per_sentence) / 2)


def test_rouge_by_hand():
    r = metrics.rouge(["the cat sat on the mat", "benign nevus"], ["the cat on the mat", "Benign nevus."])
    # row 1: R1 P=5/5 R=5/6 -> 10/11; R2 P=3/4 R=3/5 -> 2/3; LCS 5 -> 10/11. Row 2 identical after lower-casing -> 1.
    assert r["rouge1"] == pytest.approx((10 / 11 + 1) / 2)
    assert r["rouge2"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["rougeL"] == pytest.approx((10 / 11 + 1) / 2)


def test_token_recall_by_hand():
    assert metrics.token_recall("A red, scaly plaque.", "scaly red patch") == pytest.approx(2 / 4)
    assert metrics.token_recall("Nevus", "") == 0.0
    assert metrics.token_recall("", "anything") == 0.0


def test_meteor_reported_unavailable_without_wordnet():
    value = metrics.meteor(REFS, HYPS)
    if metrics.meteor_available():
        assert 0.0 < value <= 1.0
    else:
        assert value is None


def test_text_metrics_summary_and_edge_cases():
    m = metrics.text_metrics(REFS, HYPS)
    assert m.n == 2 and m.bleu1 == pytest.approx(metrics.bleu(REFS, HYPS)[1])
    assert m.token_recall == pytest.approx(
        (4 / 5 + 5 / 7) / 2
    )  # 4 of {the,cat,is,on,mat}; 5 of {a,red,scaly,plaque,on,the,arm}
    empty = metrics.text_metrics(["a lesion"], [""])  # an empty answer scores 0, never crashes
    assert empty.bleu1 == 0.0 and empty.rouge1 == 0.0
    with pytest.raises(ValueError):
        metrics.text_metrics(["a"], [])
