"""Text metrics of MM-Skin's VQA evaluation, computed with the packages that define them.

- BLEU-1..4: NLTK `corpus_bleu` over whitespace tokens (`str.split()`, case kept), one reference
  per question, cumulative uniform weights, no smoothing: exactly the paper's recipe.
- ROUGE-1/2/L: Google's `rouge-score` F-measure per question (its default tokenizer: lower-case,
  alphanumeric tokens, no stemmer), averaged over questions.
- METEOR: NLTK `meteor_score` needs the WordNet corpus, which cannot be downloaded offline; when it
  is not installed the metric is reported as unavailable (None + a note), never guessed.
- Token recall: MM-Skin's metric code is not public in source form, so it is defined plainly here:
  per question, the fraction of the reference's distinct lower-cased word tokens (`\\w+`) that occur
  in the prediction; averaged over questions.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

BLEU_WEIGHTS = {1: (1.0,), 2: (0.5, 0.5), 3: (1 / 3, 1 / 3, 1 / 3), 4: (0.25, 0.25, 0.25, 0.25)}
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class TextMetrics:
    n: int
    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    rouge1: float
    rouge2: float
    rougeL: float
    meteor: float | None  # None when NLTK's WordNet data is not installed
    token_recall: float

    def to_dict(self) -> dict:
        return asdict(self)


def bleu(references: list[str], predictions: list[str]) -> dict[int, float]:
    """Corpus BLEU-1..4 (0..1) over whitespace tokens."""
    from nltk.translate.bleu_score import corpus_bleu

    refs = [[r.split()] for r in references]
    hyps = [p.split() for p in predictions]
    with warnings.catch_warnings():  # NLTK warns (and returns 0) when an n-gram order has no match
        warnings.simplefilter("ignore")
        return {n: float(corpus_bleu(refs, hyps, weights=w)) for n, w in BLEU_WEIGHTS.items()}


def rouge(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0..1)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for r, p in zip(references, predictions):
        for k, s in scorer.score(r, p).items():
            totals[k] += s.fmeasure
    n = max(len(references), 1)
    return {k: v / n for k, v in totals.items()}


@lru_cache(maxsize=1)
def meteor_available() -> bool:
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return True
    except (LookupError, OSError):
        return False


METEOR_UNAVAILABLE = "METEOR unavailable: NLTK's WordNet data is not installed (it cannot be downloaded offline)"


def meteor(references: list[str], predictions: list[str]) -> float | None:
    """Mean NLTK METEOR over questions, or None when WordNet is missing."""
    if not meteor_available():
        return None
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([r.split()], p.split()) for r, p in zip(references, predictions)]
    return sum(scores) / max(len(scores), 1)


def token_recall(reference: str, prediction: str) -> float:
    """Fraction of the reference's distinct lower-cased word tokens present in the prediction."""
    ref = set(_WORD.findall(reference.lower()))
    if not ref:
        return 0.0
    return len(ref & set(_WORD.findall(prediction.lower()))) / len(ref)


def text_metrics(references: list[str], predictions: list[str]) -> TextMetrics:
    if len(references) != len(predictions):
        raise ValueError("references and predictions differ in length")
    b = bleu(references, predictions) if references else {n: 0.0 for n in BLEU_WEIGHTS}
    r = rouge(references, predictions)
    recall = sum(token_recall(x, y) for x, y in zip(references, predictions)) / max(len(references), 1)
    return TextMetrics(
        len(references),
        b[1],
        b[2],
        b[3],
        b[4],
        r["rouge1"],
        r["rouge2"],
        r["rougeL"],
        meteor(references, predictions),
        recall,
    )
