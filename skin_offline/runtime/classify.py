"""Zero-shot diagnosis by likelihood: score every label as the answer to the paper's question.

A scoring request (engine.py) prefills image + question once: the prompt's last logits give every label's first
token. The labels' remaining tokens are then teacher-forced in waves: a wave forks the prompt's row to one row per
label (at most the request's rows), and every engine step feeds each row its label's next token in the same decoder
run as every other request's rows (right-padded: a finished row is fed a pad token whose logits are ignored, and no
real token ever attends to it since it comes later). The next wave rewinds the rows to the prompt. One token per
row per step is the shape every decoder flavor accepts (onnxruntime's GroupQueryAttention refuses several new
tokens on a batch > 1), and a step reads the weights once for all rows, which is what costs time on a
bandwidth-bound CPU.

Label tokens: LLaVA's training turn is `... [/INST] {answer} </s>`, one sentencepiece call over the
whole text, so the answer starts after a space and its first piece carries the word-start "▁".
sentencepiece never merges across that space, hence the answer's ids are exactly `encode(label)`
(dummy prefix = the "▁"); tests/test_classify.py checks this against tokenizing the full turn.
The score is the log-likelihood of the label tokens only (not of a following "</s>": SkinVL's
answers are sentences, so "end right after the label" is not what the model learnt).

Order: the question lists the labels in a canonical order (case-folded sort) so the ranking does not
depend on how the caller ordered them; ties in score are broken by that same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UsageError
from .decoding import Outcome, Step
from .response import FinishReason
from .sampling import log_softmax
from .tokenizer import TextTokenizer

QUESTION_TEMPLATE = "This is a skin lesion image. From the following categories: {labels}, which one is the diagnosis?"


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float  # mean (normalised) or sum of the label tokens' log-probs
    logprob: float  # sum of the label tokens' log-probs
    n_tokens: int
    probability: float  # softmax of `score` over the label set

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "probability": round(self.probability, 6),
            "score": round(self.score, 6),
            "logprob": round(self.logprob, 6),
            "n_tokens": self.n_tokens,
        }


@dataclass(frozen=True)
class Ranking:
    question: str
    scores: tuple[LabelScore, ...]  # best first
    normalized: bool
    notices: tuple[str, ...] = ()  # what the image loader noticed (e.g. text burned into the pixels)

    @property
    def top(self) -> str:
        return self.scores[0].label

    def to_dict(self) -> dict:
        d = {
            "question": self.question,
            "normalized": self.normalized,
            "prediction": self.top,
            "ranking": [s.to_dict() for s in self.scores],
        }
        if self.notices:
            d["notices"] = list(self.notices)
        return d


def canonical_labels(labels: Sequence[str]) -> list[str]:
    """Cleaned, de-duplicated labels in canonical (case-folded) order; raises on an unusable list."""
    clean = [str(x).strip() for x in labels]
    if any(not x for x in clean):
        raise UsageError("a label is empty; pass non-empty labels separated by commas")
    if len({x.casefold() for x in clean}) != len(clean):
        raise UsageError("labels repeat (case-insensitively); pass each label once")
    if len(clean) < 2:
        raise UsageError(f"need at least 2 labels to rank, got {len(clean)}; pass a comma-separated list")
    return sorted(clean, key=lambda x: (x.casefold(), x))


def question_for(labels: list[str], template: str = QUESTION_TEMPLATE) -> str:
    return template.format(labels=", ".join(labels))


def label_token_ids(tokenizer: TextTokenizer, label: str) -> list[int]:
    """Ids of `label` as the answer after "[/INST] " (see module docstring), for either tokenizer family."""
    return tokenizer.answer_ids(label)


class LabelScoring:
    """The `Decoding` of a label-scoring request (runtime/decoding.py): `rows` labels per wave."""

    PAD = 0  # fed to rows whose label has ended; their logits are ignored

    def __init__(self, labels_ids: list[list[int]], rows: int):
        self.labels = labels_ids
        self.rest = [i for i, ids in enumerate(labels_ids) if len(ids) > 1]  # labels with tokens to teacher-force
        self.rows = max(1, min(rows, len(self.rest)))
        self.logprobs: list[list[float]] = [[] for _ in labels_ids]
        self.wave: list[int] = []  # label indices of the current wave, one per row
        self.j = 0  # tokens fed per row in this wave
        self.next = 0  # index in `rest` of the next wave's first label

    def start(self, logits: np.ndarray) -> Step:
        first = log_softmax(logits)  # [V]
        for i, ids in enumerate(self.labels):
            self.logprobs[i].append(float(first[ids[0]]))
        return self._wave(0)

    def _wave(self, start: int) -> Step:
        self.wave, self.j, self.next = self.rest[start : start + self.rows], 0, start + self.rows
        if not self.wave:
            return Step(finish=FinishReason.STOP)
        return Step(feed=self._feed(), restart=True)

    def _feed(self) -> tuple[int, ...]:
        # the last token of a label is predicted, never fed
        return tuple(self.labels[i][self.j] if self.j < len(self.labels[i]) - 1 else self.PAD for i in self.wave)

    def step(self, logits: np.ndarray) -> Step:
        logp = log_softmax(logits)  # [n,V]
        for r, i in enumerate(self.wave):
            if self.j + 1 < len(self.labels[i]):
                self.logprobs[i].append(float(logp[r, self.labels[i][self.j + 1]]))
        self.j += 1
        if self.j < max(len(self.labels[i]) - 1 for i in self.wave):
            return Step(feed=self._feed())
        return self._wave(self.next)

    def outcome(self) -> Outcome:
        return Outcome(label_logprobs=tuple(np.array(lp) for lp in self.logprobs))

    def prefetch(self) -> None:
        pass


def rank(
    labels: list[str],
    token_logprobs: list[np.ndarray],
    question: str,
    normalize: bool = True,
    notices: tuple[str, ...] = (),
) -> Ranking:
    """Labels (canonical order) + their tokens' log-probs -> Ranking, best first, with softmax probabilities."""
    sums = np.array([lp.sum() for lp in token_logprobs])
    scores = np.array([lp.mean() for lp in token_logprobs]) if normalize else sums
    e = np.exp(scores - scores.max())
    probs = e / e.sum()
    order = sorted(range(len(labels)), key=lambda i: -scores[i])  # stable: ties keep the canonical order
    return Ranking(
        question,
        tuple(
            LabelScore(labels[i], float(scores[i]), float(sums[i]), len(token_logprobs[i]), float(probs[i]))
            for i in order
        ),
        normalize,
        notices,
    )
