"""Beam search over the KV-cached decoder, following transformers' `_beam_search` (v5) rule for rule.

One prefill of the [1,S,H] prompt; its cache rows are repeated to `num_beams` rows, and every step
reorders them with `KVCache.select` (a row gather, never a recompute). Per step, as in transformers:

  log_probs = log_softmax(logits) -> min_new_tokens mask on EOS -> (sampling) temperature, top-k,
  top-p (min_tokens_to_keep = 2) -> + running beam scores -> 2k candidates over [k*V] (top-k, or
  sampled without replacement from softmax of the accumulated scores) -> the k best that did not
  hit a stop (EOS or max length) keep running; the ones among the first k that did stop enter the
  finished pool with score / (generated length ** length_penalty), the pool keeping its k best.
  Stop when no running beam can still beat the worst finished one (the `early_stopping` heuristic),
  when all k slots are finished (early_stopping=True), or at max_new_tokens.

Greedy beams (do_sample=False) are token-identical to transformers on the same logits. Sampling
uses a seeded numpy Generator (Gumbel/exponential-race sampling without replacement, the method
torch.multinomial uses): reproducible run to run, but not the same draws as torch's RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..errors import ConfigError
from .decoder import Decoder
from .generate import EmbedFn

_NEG = -1.0e9  # transformers' "impossible" score offset; kept so scores compare the same way


class EarlyStopping(Enum):
    HEURISTIC = "heuristic"  # transformers' default (early_stopping=False)
    EAGER = "eager"  # early_stopping=True: stop once num_beams hypotheses are finished
    NEVER = "never"  # early_stopping="never": canonical beam search bound


@dataclass(frozen=True)
class BeamConfig:
    num_beams: int = 5
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = EarlyStopping.HEURISTIC
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # transformers' default, applied only when sampling (VQA_test.py relied on it)
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, not {self.num_beams}")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 1 and min_new_tokens >= 0, not {self.max_new_tokens} "
                              f"and {self.min_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, not {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"top_p must be in (0, 1] and top_k >= 0, not {self.top_p} and {self.top_k}")


@dataclass(frozen=True)
class BeamResult:
    tokens: list[int]  # best hypothesis, EOS included when it finished with one
    score: float  # its length-penalised sum of (warped) log-probs
    finish_reason: str  # "stop" (EOS) or "length"
    steps: int  # decoder steps run after the prefill


def log_softmax(x: np.ndarray) -> np.ndarray:
    """[..., V] -> [..., V] in float64."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def warp(logp: np.ndarray, cfg: BeamConfig, min_keep: int = 2) -> np.ndarray:
    """[k,V] log-probs -> warped, as transformers' Temperature -> TopK -> TopP warpers (filtered = -inf).

    After top-k only a few dozen entries per row are finite, so top-p sorts those, not the vocabulary.
    """
    out = logp / cfg.temperature if cfg.temperature != 1.0 else logp.copy()
    if cfg.top_k and cfg.top_k < out.shape[-1]:
        k = max(cfg.top_k, min_keep)
        top = np.argpartition(out, out.shape[-1] - k, axis=-1)[:, -k:]  # [k_rows,k] the k largest, unordered
        kth = np.take_along_axis(out, top, axis=-1).min(axis=-1, keepdims=True)  # [k_rows,1]
        out[out < kth] = -np.inf  # ties with the k-th value stay, as in transformers
    if cfg.top_p < 1.0:
        for row in out:  # a handful of beam rows
            cand = np.flatnonzero(np.isfinite(row))
            order = cand[np.argsort(row[cand], kind="stable")]  # ascending, like torch.sort(descending=False)
            vals = row[order]
            probs = np.exp(vals - vals[-1])
            remove = np.cumsum(probs / probs.sum()) <= 1.0 - cfg.top_p
            remove[-min_keep:] = False
            row[order[remove]] = -np.inf
    return out


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest, best first (lowest index first on ties)."""
    idx = np.argpartition(-scores, n - 1)[:n] if n < scores.size else np.arange(scores.size)
    return idx[np.lexsort((idx, -scores[idx]))]


def _sample_without_replacement(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct indices drawn from softmax(scores), then ordered by score (transformers sorts them).

    Exponential race (key = p / Exp(1), keep the n largest) = sequential draws without replacement, the
    method torch.multinomial uses. Zero-probability entries only fill up when fewer than n have mass.
    """
    live = np.flatnonzero(np.isfinite(scores))
    p = np.exp(scores[live] - scores[live].max()) if live.size else live.astype(float)
    picked = live[_top(p / rng.exponential(size=live.size), min(n, live.size))] if live.size else live
    if picked.size < n:
        dead = np.setdiff1d(np.arange(scores.size), live)[: n - picked.size]
        picked = np.concatenate([picked, dead])
    return picked[np.lexsort((picked, -scores[picked]))]


def beam_search(decoder: Decoder, embeds: np.ndarray, embed: EmbedFn, cfg: BeamConfig, eos_id: int) -> BeamResult:
    """[1,S,H] prompt embeddings -> the best hypothesis under `cfg`."""
    k, n_cand = cfg.num_beams, 2 * cfg.num_beams  # transformers keeps (1 + #eos) * k candidates
    rng = np.random.default_rng(cfg.seed)
    logits, cache = decoder.forward(embeds, decoder.empty_cache())  # [1,1,V]
    cache = cache.select(np.zeros(k, np.int64))  # the prompt's rows, once per beam
    logits = np.repeat(logits[:, -1], k, axis=0)  # [k,V]
    vocab = logits.shape[-1]
    run_tokens = np.zeros((k, 0), np.int64)  # [k,t]
    run_scores = np.full(k, _NEG)
    run_scores[0] = 0.0  # only beam 0 is live at first, so the k beams do not pick the same tokens
    fin_tokens: list[list[int]] = [[] for _ in range(k)]
    fin_scores = np.full(k, _NEG)
    fin_done = np.zeros(k, bool)
    can_improve = True
    steps = 0
    for cur in range(cfg.max_new_tokens):
        logp = log_softmax(logits)  # [k,V]
        if cur < cfg.min_new_tokens:
            logp[:, eos_id] = -np.inf
        if cfg.do_sample:
            logp = warp(logp, cfg)
        acc = (logp + run_scores[:, None]).reshape(-1)  # [k*V]
        idx = _sample_without_replacement(acc, n_cand, rng) if cfg.do_sample else _top(acc, n_cand)
        cand_scores, src, tok = acc[idx], idx // vocab, idx % vocab  # [2k] each
        cand_tokens = np.concatenate([run_tokens[src], tok[:, None]], axis=1)  # [2k,t+1]
        hits = (tok == eos_id) | (cur + 1 >= cfg.max_new_tokens)  # [2k]

        # running beams: the k best candidates that did not stop
        nxt = _top(cand_scores + hits * _NEG, k)
        run_tokens, run_scores, rows = cand_tokens[nxt], (cand_scores + hits * _NEG)[nxt], src[nxt]

        # finished pool: candidates among the first k that stopped, length-penalised, merged by score
        just = hits & (np.arange(n_cand) < k)
        fscore = cand_scores / float(cur + 1) ** cfg.length_penalty
        if cfg.early_stopping is EarlyStopping.EAGER and fin_done.all():
            fscore = fscore + _NEG
        if not can_improve:
            fscore = fscore + _NEG
        fscore = fscore + (~just) * _NEG
        merged = np.concatenate([fin_scores, fscore])
        pick = _top(merged, k)
        pool_tokens = fin_tokens + [list(map(int, t)) for t in cand_tokens]
        fin_tokens = [pool_tokens[i] for i in pick]
        fin_scores, fin_done = merged[pick], np.concatenate([fin_done, just])[pick]

        # stopping rule for the whole search (transformers' _check_early_stop_heuristic)
        length = cfg.max_new_tokens if (cfg.early_stopping is EarlyStopping.NEVER and cfg.length_penalty > 0) else cur + 1
        best_running = run_scores[0] / float(length) ** cfg.length_penalty
        worst = np.where(fin_done, fin_scores.min(), _NEG)
        can_improve = can_improve and bool(np.any(best_running > worst))
        eager_done = cfg.early_stopping is EarlyStopping.EAGER and fin_done.all()
        if not can_improve or eager_done or hits.all():
            break
        if not np.array_equal(rows, np.arange(k)):  # reorder the cache rows to the surviving beams' parents
            cache = cache.select(rows)
        logits, cache = decoder.forward(embed(run_tokens[:, -1].tolist())[:, None], cache)  # [k,1,H] -> [k,1,V]
        logits = logits[:, -1]
        steps += 1
    best = fin_tokens[0]
    reason = "stop" if best and best[-1] == eos_id else "length"
    return BeamResult(best, float(fin_scores[0]), reason, steps)
