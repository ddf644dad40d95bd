"""Beam search as an engine request, following transformers' `_beam_search` (v5) rule for rule.

The prompt is prefilled once into the request's first row and forked to `num_beams` rows; every engine step
decodes the beam rows in the same decoder run as every other request's rows, and a beam reorder is a row gather
inside the request's rows (engine.py, slots.py): the cache is copied, never recomputed. Per step, as in transformers:

  log_probs = log_softmax(logits) -> min_new_tokens mask on EOS -> (sampling) temperature, top-k,
  top-p (min_tokens_to_keep = 2; runtime/sampling.py's chain) -> + running beam scores -> 2k candidates over [k*V]
  (top-k, or sampled without replacement from softmax of the accumulated scores) -> the k best that did not
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
from .constraints import Matcher
from .decoding import Outcome, Step
from .detokenize import drop_answer_space
from .response import FinishReason
from .sampling import SamplingConfig, log_softmax, warp
from .tokenizer import TextTokenizer

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

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, not {self.num_beams}")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ConfigError(
                f"max_new_tokens must be >= 1 and min_new_tokens >= 0, not {self.max_new_tokens} "
                f"and {self.min_new_tokens}"
            )
        if self.do_sample and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 when sampling, not {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"top_p must be in (0, 1] and top_k >= 0, not {self.top_p} and {self.top_k}")


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


class BeamSearch:
    """The `Decoding` of a beam request (runtime/decoding.py): `num_beams` rows."""

    def __init__(self, cfg: BeamConfig, eos_id: int, tokenizer: TextTokenizer, matcher: Matcher | None = None):
        """`matcher` (runtime/constraints.py): every beam keeps to the constraint (its own copy, forked with it)."""
        self.cfg, self.eos_id, self.tokenizer = cfg, eos_id, tokenizer
        self.matchers = None if matcher is None else [matcher]  # per running beam (one until the first step)
        self.rows = k = cfg.num_beams
        self.warping = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        self.rng = np.random.default_rng(cfg.seed)
        self.run_tokens = np.zeros((k, 0), np.int64)  # [k,t]
        self.run_scores = np.full(k, _NEG)
        self.run_scores[0] = 0.0  # only beam 0 is live at first, so the k beams do not pick the same tokens
        self.fin_tokens: list[list[int]] = [[] for _ in range(k)]
        self.fin_scores = np.full(k, _NEG)
        self.fin_done = np.zeros(k, bool)
        self.can_improve = True
        self.cur = 0  # tokens chosen so far per beam
        self.steps = 0  # decoder runs after the prefill

    def start(self, logits: np.ndarray) -> Step:
        """[V] after the prompt: every beam starts from it (the engine forks the prompt's row to the others)."""
        step = self._advance(np.repeat(logits[None], self.rows, axis=0))
        return step if step.finish is not None else Step(feed=step.feed, restart=True)

    def step(self, logits: np.ndarray) -> Step:
        self.steps += 1
        return self._advance(logits)

    def _advance(self, logits: np.ndarray) -> Step:
        """[k,V] logits of the running beams -> the next tokens per beam and their parents, or the finish."""
        cfg, eos, k = self.cfg, self.eos_id, self.rows
        n_cand, cur = 2 * k, self.cur  # transformers keeps (1 + #eos) * k candidates
        logp = log_softmax(logits)  # [k,V]
        vocab = logp.shape[-1]
        if self.matchers is not None:  # each beam's own allowed tokens (all beams share beam 0's at the first step)
            masks = [m.allowed() for m in self.matchers]
            for r in range(k):
                allowed = masks[r if len(masks) > 1 else 0]
                logp[r, : len(allowed)][~allowed] = -np.inf
                logp[r, len(allowed) :] = -np.inf
        if cur < cfg.min_new_tokens:
            logp[:, eos] = -np.inf
        if cfg.do_sample:
            logp = warp(logp, self.warping, min_keep=2)
        acc = (logp + self.run_scores[:, None]).reshape(-1)  # [k*V]
        idx = _sample_without_replacement(acc, n_cand, self.rng) if cfg.do_sample else _top(acc, n_cand)
        cand_scores, src, tok = acc[idx], idx // vocab, idx % vocab  # [2k] each
        cand_tokens = np.concatenate([self.run_tokens[src], tok[:, None]], axis=1)  # [2k,t+1]
        hits = (tok == eos) | (cur + 1 >= cfg.max_new_tokens)  # [2k]

        # running beams: the k best candidates that did not stop
        nxt = _top(cand_scores + hits * _NEG, k)
        self.run_tokens, self.run_scores, parents = cand_tokens[nxt], (cand_scores + hits * _NEG)[nxt], src[nxt]
        if self.matchers is not None:  # fork each running beam's matcher from its parent's and advance it
            forked = []
            for j in nxt:
                m = self.matchers[src[j] if len(self.matchers) > 1 else 0].copy()
                if np.isfinite(cand_scores[j]) and tok[j] != eos:  # a -inf candidate is dead: never consumed
                    m.consume(int(tok[j]))
                forked.append(m)
            self.matchers = forked

        # finished pool: candidates among the first k that stopped, length-penalised, merged by score
        just = hits & (np.arange(n_cand) < k)
        fscore = cand_scores / float(cur + 1) ** cfg.length_penalty
        if cfg.early_stopping is EarlyStopping.EAGER and self.fin_done.all():
            fscore = fscore + _NEG
        if not self.can_improve:
            fscore = fscore + _NEG
        fscore = fscore + (~just) * _NEG
        merged = np.concatenate([self.fin_scores, fscore])
        pick = _top(merged, k)
        pool_tokens = self.fin_tokens + [list(map(int, t)) for t in cand_tokens]
        self.fin_tokens = [pool_tokens[i] for i in pick]
        self.fin_scores, self.fin_done = merged[pick], np.concatenate([self.fin_done, just])[pick]

        # stopping rule for the whole search (transformers' _check_early_stop_heuristic)
        length = (
            cfg.max_new_tokens if (cfg.early_stopping is EarlyStopping.NEVER and cfg.length_penalty > 0) else cur + 1
        )
        best_running = self.run_scores[0] / float(length) ** cfg.length_penalty
        worst = np.where(self.fin_done, self.fin_scores.min(), _NEG)
        self.can_improve = self.can_improve and bool(np.any(best_running > worst))
        eager_done = cfg.early_stopping is EarlyStopping.EAGER and self.fin_done.all()
        self.cur += 1
        if not self.can_improve or eager_done or hits.all():
            best = self.fin_tokens[0]
            reason = FinishReason.STOP if best and best[-1] == eos else FinishReason.LENGTH
            text = self.tokenizer.decode([t for t in best if t != eos])
            return Step(delta=drop_answer_space(text) if self.matchers is not None else text, finish=reason)
        same = np.array_equal(parents, np.arange(k))
        return Step(
            feed=tuple(int(t) for t in self.run_tokens[:, -1]), parents=None if same else tuple(int(p) for p in parents)
        )

    def prefetch(self) -> None:
        for m in self.matchers or ():
            m.prefetch()

    def outcome(self) -> Outcome:
        return Outcome(tuple(self.fin_tokens[0]))
