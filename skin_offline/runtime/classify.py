"""Zero-shot diagnosis by likelihood: score every label as the answer to the paper's question.

One prefill of image + question gives the KV cache of the shared prefix and the distribution of the
first answer token; the labels' remaining tokens then continue from that cache. Labels are batched:
the prefix rows are repeated with `KVCache.select`, and the labels advance one token per step, all
rows together (right-padded: a finished row is fed a pad token whose logits are ignored, and no real
token ever attends to it since it comes later). One token per step is the shape every decoder
flavor accepts (onnxruntime's GroupQueryAttention refuses several new tokens on a batch > 1), and a
step reads the weights once for all labels of a chunk instead of once per label, which is what
costs time on a bandwidth-bound CPU. The chunk size bounds the memory of the repeated cache (one
prompt-sized cache per row); batch_size=1 is the plain one-label-at-a-time loop.

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

import numpy as np

from ..errors import UsageError
from .beam import log_softmax
from .decoder import Decoder
from .kv import KVCache
from .generate import EmbedFn
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
        return {"label": self.label, "probability": round(self.probability, 6), "score": round(self.score, 6),
                "logprob": round(self.logprob, 6), "n_tokens": self.n_tokens}


@dataclass(frozen=True)
class Ranking:
    question: str
    scores: tuple[LabelScore, ...]  # best first
    normalized: bool

    @property
    def top(self) -> str:
        return self.scores[0].label

    def to_dict(self) -> dict:
        return {"question": self.question, "normalized": self.normalized, "prediction": self.top,
                "ranking": [s.to_dict() for s in self.scores]}


def canonical_labels(labels) -> list[str]:
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


def label_logprobs(decoder: Decoder, first_logits: np.ndarray, cache: KVCache, embed: EmbedFn,
                   labels_ids: list[list[int]], batch_size: int = 8) -> list[np.ndarray]:
    """[V] logits after the prefix + the prefix cache -> per label, [n_tokens] log-probs of its tokens."""
    first = log_softmax(first_logits)  # [V]
    out: list[np.ndarray] = [np.array([first[ids[0]]]) for ids in labels_ids]
    rest = [i for i, ids in enumerate(labels_ids) if len(ids) > 1]
    for start in range(0, len(rest), batch_size):
        chunk = rest[start:start + batch_size]
        width = max(len(labels_ids[i]) - 1 for i in chunk)
        feed = np.zeros((len(chunk), width), np.int64)  # [b,w] right-padded with id 0 (ignored)
        for r, i in enumerate(chunk):
            ids = labels_ids[i][:-1]  # the last token is predicted, never fed
            feed[r, :len(ids)] = ids
        rows = cache.select(np.zeros(len(chunk), np.int64))  # the prefix cache once per label row
        for j in range(width):
            logits, rows = decoder.forward(embed(feed[:, j])[:, None], rows)  # [b,1,H] -> [b,1,V]
            logp = log_softmax(logits[:, -1])  # [b,V]
            for r, i in enumerate(chunk):
                if j + 1 < len(labels_ids[i]):
                    out[i] = np.append(out[i], logp[r, labels_ids[i][j + 1]])
    return out


def rank(labels: list[str], token_logprobs: list[np.ndarray], question: str, normalize: bool = True) -> Ranking:
    """Labels (canonical order) + their tokens' log-probs -> Ranking, best first, with softmax probabilities."""
    sums = np.array([lp.sum() for lp in token_logprobs])
    scores = np.array([lp.mean() for lp in token_logprobs]) if normalize else sums
    e = np.exp(scores - scores.max())
    probs = e / e.sum()
    order = sorted(range(len(labels)), key=lambda i: -scores[i])  # stable: ties keep the canonical order
    return Ranking(question, tuple(LabelScore(labels[i], float(scores[i]), float(sums[i]), len(token_logprobs[i]),
                                              float(probs[i])) for i in order), normalize)
