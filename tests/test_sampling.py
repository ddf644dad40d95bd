"""The one warper chain (runtime/sampling.py) vs transformers' logits warpers, and seeded reproducibility."""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from skin_offline.runtime.sampling import SamplingConfig, log_softmax, make_sampler, warp


def distribution(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """[V] -> the probabilities the sampler draws from (0 for filtered tokens)."""
    w = warp(logits[None], cfg)[0]
    p = np.where(np.isfinite(w), np.exp(w - w.max()), 0.0)
    return p / p.sum()


def hf_distribution(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    scores = torch.from_numpy(logits.astype(np.float64))[None]
    scores = TemperatureLogitsWarper(cfg.temperature)(None, scores)
    if cfg.top_k:
        scores = TopKLogitsWarper(cfg.top_k)(None, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize(
    "temperature,top_p,top_k",
    [
        (1.0, 1.0, 0),
        (0.2, 0.9, 0),
        (0.7, 0.5, 0),
        (1.3, 1.0, 40),
        (0.8, 0.95, 50),
        (1.0, 0.01, 0),
        (2.0, 0.999, 0),
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_filtered_distribution_matches_hf_warpers(temperature, top_p, top_k, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(32000) * rng.choice([0.5, 3.0, 10.0])).astype(np.float32)
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
    ref = hf_distribution(logits, cfg)
    ours = distribution(logits, cfg)
    assert set(np.flatnonzero(ours > 0).tolist()) == set(np.flatnonzero(ref > 0).tolist())
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_greedy_is_argmax_first_on_ties():
    logits = np.array([0.1, 3.0, 3.0, -1.0], np.float32)
    assert make_sampler(SamplingConfig())(logits) == int(torch.argmax(torch.from_numpy(logits)))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    cfg = SamplingConfig(temperature=0.8, top_p=0.9, seed=123)
    a = [make_sampler(cfg)(logits) for _ in range(1)]
    s1, s2 = make_sampler(cfg), make_sampler(cfg)
    draws1 = [s1(logits) for _ in range(4000)]
    assert draws1 == [s2(logits) for _ in range(4000)]
    assert a[0] == draws1[0]
    probs = distribution(logits, cfg)
    ids = np.flatnonzero(probs > 0)
    probs = probs[ids]
    freq = np.bincount(draws1, minlength=50)[ids] / len(draws1)
    assert set(draws1) <= set(ids.tolist())
    assert np.abs(freq - probs).max() < 0.03  # 4000 draws: 3 sigma of a Bernoulli(p<=0.5) is <= 0.024


def test_invalid_config_rejected():
    for kw in ({"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ValueError):
            SamplingConfig(**kw)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.2, 50, 0.9), (1.0, 0, 0.5), (0.7, 3, 1.0), (0.2, 50, 0.0001)])
def test_beam_warping_matches_transformers(temperature, top_k, top_p):
    """Inside beams the same chain runs on log-probs with min_tokens_to_keep = 2, as transformers' beam search."""
    from transformers.generation.logits_process import LogitsProcessorList

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    # no exact ties: torch.sort orders tied values in an unspecified way, so no rule could match it
    logp = log_softmax(logits)
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
    if top_k:
        procs.append(TopKLogitsWarper(top_k, min_tokens_to_keep=2))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p, min_tokens_to_keep=2))
    ref = procs(None, torch.from_numpy(logp)).numpy()
    ours = warp(logp, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p), min_keep=2)
    assert np.array_equal(np.isinf(ours), np.isinf(ref))
    assert np.allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], atol=1e-9)
