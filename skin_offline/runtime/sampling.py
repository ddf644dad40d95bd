"""Next-token selection for every decoding mode: log-softmax, the warper chain, greedy and seeded draws.

One chain serves sampling (`make_sampler`, one row) and beam search (runtime/beam.py, k rows): transformers'
logits warpers in their order, temperature -> top-k -> top-p, written once over [..., V] scores (filtered entries
become -inf). Rules as transformers: top-k keeps every token tied with the k-th value; top-p removes the tokens whose
ascending cumulative probability is <= 1 - p, keeping at least `min_keep` (1 when sampling, 2 inside beams, as
transformers' beam search asks). Greedy is argmax (first index on ties, as torch.argmax). Every draw comes from the
request's own seeded `numpy.random.Generator`, so what else shares a batch never changes a seeded request's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from .response import TokenLogprob

Sampler = Callable[[np.ndarray], int]  # [V] float32 logits -> token id
_CANDIDATES = 512  # top-p alone works on the top candidates when they already hold the probability mass


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}; 1 keeps every token, 0.9 the usual nucleus")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), not {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(x: np.ndarray) -> np.ndarray:
    """[..., V] -> [..., V] in float64."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token: int, top: int) -> "TokenLogprob":
    """[V] raw logits -> the token's log-probability and the `top` most likely tokens' (what a caller wants as a
    confidence signal: the model's own distribution, before warpers and masks)."""
    from .response import TokenLogprob

    lp = log_softmax(logits)  # [V] float64
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        idx = np.argpartition(-lp, top - 1)[:top] if top < lp.size else np.arange(lp.size)
        idx = idx[np.lexsort((idx, -lp[idx]))]  # most likely first, lower id first on ties
        best = tuple((int(i), float(lp[i])) for i in idx)
    return TokenLogprob(int(token), float(lp[token]), best)


def _top_k(scores: np.ndarray, k: int) -> None:
    """In place on [R,V]: -inf below each row's k-th largest value (ties with it stay)."""
    top = np.argpartition(scores, scores.shape[-1] - k, axis=-1)[:, -k:]  # [R,k] the k largest, unordered
    kth = np.take_along_axis(scores, top, axis=-1).min(axis=-1, keepdims=True)  # [R,1]
    scores[scores < kth] = -np.inf


def _top_p_row(row: np.ndarray, top_p: float, min_keep: int) -> None:
    """In place on one [V] row of finite-or--inf scores (already temperature-scaled)."""
    cand = np.flatnonzero(np.isfinite(row))
    outside = 0.0
    if cand.size > _CANDIDATES:  # sort only the head when it already holds >= top_p of the mass
        head = cand[np.argpartition(-row[cand], _CANDIDATES - 1)[:_CANDIDATES]]
        z = row[cand].max()
        total = np.exp(row[cand] - z).sum()
        mass = np.exp(row[head] - z).sum() / total
        if mass >= top_p:  # every other token lies in the ascending tail whose mass is <= 1 - top_p: removed
            kept = row[head]
            row.fill(-np.inf)
            row[head] = kept
            outside, cand = 1.0 - mass, head
    order = cand[np.argsort(row[cand], kind="stable")]  # ascending, like torch.sort(descending=False)
    vals = row[order]
    probs = np.exp(vals - vals[-1])
    probs *= (1.0 - outside) / probs.sum()
    remove = np.cumsum(probs) + outside <= 1.0 - top_p
    remove[len(remove) - min_keep :] = False
    row[order[remove]] = -np.inf


def warp(scores: np.ndarray, cfg: SamplingConfig, min_keep: int = 1) -> np.ndarray:
    """[R,V] logits or log-probs -> temperature -> top-k -> top-p, as float64 (filtered entries = -inf)."""
    out = scores.astype(np.float64)
    if cfg.temperature not in (0.0, 1.0):
        out /= cfg.temperature
    if cfg.top_k and cfg.top_k < out.shape[-1]:
        _top_k(out, max(cfg.top_k, min_keep))
    if cfg.top_p < 1.0:
        for row in out:  # one sampled row, or a handful of beams
            _top_p_row(row, cfg.top_p, min_keep)
    return out


def draw(scores: np.ndarray, rng: np.random.Generator) -> int:
    """One token from softmax of a [V] warped row (ids in ascending order, inverse-CDF with one uniform)."""
    ids = np.flatnonzero(np.isfinite(scores))
    p = np.exp(scores[ids] - scores[ids].max())
    cdf = np.cumsum(p)
    return int(ids[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), ids.size - 1)])


def sample_from(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """[V] logits -> one token id."""
    if cfg.greedy:
        return int(np.argmax(logits))
    return draw(warp(logits[None], cfg)[0], rng)


def make_sampler(cfg: SamplingConfig) -> Sampler:
    rng = np.random.default_rng(cfg.seed)
    return lambda logits: sample_from(logits, cfg, rng)
