"""Next-token selection: greedy, temperature, top-k, top-p, with an explicit seeded Generator.

Order and rules follow transformers' logits warpers (temperature -> top-k -> top-p, top-p removing
tokens whose ascending cumulative probability is <= 1 - p, keeping at least one), so a seeded run is
reproducible and a greedy run is exactly argmax (first index on ties, as torch.argmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...errors import ConfigError

Sampler = Callable[[np.ndarray], int]  # [V] float32 logits -> token id
_CANDIDATES = 512  # top-p works on the top candidates when they already hold the probability mass


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}; 1 keeps every token, 0.9 the usual nucleus")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), not {self.top_k}")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_filter(ids: np.ndarray, probs: np.ndarray, top_p: float, outside_mass: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Keep the HF top-p set among candidate (ids, probs); `outside_mass` = mass of non-candidates."""
    order = np.argsort(probs, kind="stable")  # ascending, like HF's sort
    cum = np.cumsum(probs[order]) + outside_mass
    keep = cum > 1.0 - top_p
    keep[-1] = True
    sel = order[keep]
    return ids[sel], probs[sel]


def filtered_distribution(logits: np.ndarray, cfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """[V] logits -> (ids, probs) of the tokens that survive temperature -> top-k -> top-p (probs sum to 1)."""
    scaled = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < scaled.size:
        kth = scaled[np.argpartition(-scaled, cfg.top_k - 1)[cfg.top_k - 1]]
        ids = np.flatnonzero(scaled >= kth)  # HF keeps every token tied with the k-th value
    else:
        ids = np.arange(scaled.size)
    probs = softmax(scaled[ids])
    if cfg.top_p < 1.0:
        outside = 0.0
        if ids.size > _CANDIDATES:  # only sort the head when it already holds >= top_p of the mass
            head = np.argpartition(-probs, _CANDIDATES - 1)[:_CANDIDATES]
            mass = probs[head].sum()
            if mass >= cfg.top_p:
                outside = 1.0 - mass
                ids, probs = ids[head], probs[head]
        ids, probs = top_p_filter(ids, probs, cfg.top_p, outside)
        probs = probs / probs.sum()
    return ids, probs


def sample_from(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """[V] logits -> one token id."""
    if cfg.temperature == 0.0:
        return int(np.argmax(logits))
    ids, probs = filtered_distribution(logits, cfg)
    cdf = np.cumsum(probs)
    return int(ids[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), ids.size - 1)])


def make_sampler(cfg: SamplingConfig) -> Sampler:
    rng = np.random.default_rng(cfg.seed)
    return lambda logits: sample_from(logits, cfg, rng)
