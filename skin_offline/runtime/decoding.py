"""What a request does with its logits each engine step: the `Decoding` protocol, and sampling (one row).

The engine (engine.py) owns rows, prefill and decoder runs; a request's decoding mode owns the choice of tokens.
After the prompt, `start(logits [V])` returns the first `Step`; after every decoder run over the rows it asked for,
`step(logits [n,V])` returns the next. A step says which token each row feeds next, how the rows are re-arranged
first (beam reorder: a row gather; `restart`: every row back at the prompt, for label-scoring waves), the text to
stream, and, last, why it finished. Modes: `Sampling` here (greedy or seeded sampling, streamed), `BeamSearch`
(runtime/beam.py, k rows), `LabelScoring` (runtime/classify.py, one row per label of a wave).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .constraints import Matcher
from .detokenize import TokenStream
from .response import FinishReason, TokenLogprob
from .sampling import SamplingConfig, make_sampler, token_logprob
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class Step:
    feed: tuple[int, ...] = ()  # next token per row (rows [0, len(feed)) of the request); () once finished
    parents: tuple[int, ...] | None = None  # before feeding, row j takes the contents of row parents[j]
    restart: bool = False  # before feeding, every row is at the prompt (a copy of the first row's; beams fork so)
    delta: str = ""  # text to stream
    token: int | None = None  # the token this step chose (a streamed answer's; None for beams and scores)
    finish: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # when asked: the tokens since the last step that had text


@dataclass(frozen=True)
class Outcome:
    """What a finished decoding hands back in the request's last response."""

    tokens: tuple[int, ...] = ()  # the answer's ids (EOS included when it ended with one)
    first_row: tuple[int, ...] = ()  # tokens after the prompt in the request's first row (for the prompt cache)
    label_logprobs: tuple[np.ndarray, ...] = ()  # label scoring: per label, its tokens' log-probs


class Decoding(Protocol):
    rows: int  # KV rows the request needs at once

    def start(self, logits: np.ndarray) -> Step: ...  # [V] logits after the prompt

    def step(self, logits: np.ndarray) -> Step: ...  # [n,V] logits of the n rows the previous step fed

    def outcome(self) -> Outcome: ...

    def prefetch(self) -> None: ...  # the rows' next tokens are known: start what can run during the decoder run


class Sampling:
    """One row: greedy or seeded sampling (runtime/sampling.py), streamed through the detokenizer; ends at EOS, a stop
    string, a constraint's complete answer, or `max_new_tokens` (already clipped to the context).

    `matcher` (runtime/constraints.py): only tokens that keep the answer in the constraint's language are drawn from.
    `logprobs`: report each token's log-probability and that many alternatives (runtime/sampling.token_logprob)."""

    rows = 1

    def __init__(
        self,
        sampling: SamplingConfig,
        max_new_tokens: int,
        tokenizer: TextTokenizer,
        eos_id: int,
        stop: tuple[str, ...] = (),
        matcher: Matcher | None = None,
        logprobs: int | None = None,
    ):
        self.sample = make_sampler(sampling)
        self.out = TokenStream(tokenizer, eos_id, stop, answer_space=matcher is not None)
        self.eos_id = eos_id
        self.max_new_tokens = max_new_tokens
        self.matcher, self.logprobs = matcher, logprobs
        self.tokens: list[int] = []
        self._held: list[TokenLogprob] = []  # logprobs of tokens whose text is still held back

    def prefetch(self) -> None:
        if self.matcher is not None:
            self.matcher.prefetch()

    def start(self, logits: np.ndarray) -> Step:
        return self._next(logits)

    def step(self, logits: np.ndarray) -> Step:
        return self._next(logits[0])

    def _next(self, logits: np.ndarray) -> Step:  # [V]
        token = self.sample(self.matcher.mask(logits) if self.matcher is not None else logits)
        self.tokens.append(token)
        if self.logprobs is not None and token != self.eos_id:
            self._held.append(token_logprob(logits, token, self.logprobs))
        if self.matcher is not None and token != self.eos_id:
            self.matcher.consume(token)
        delta = self.out.add(token)
        finish = None
        if self.out.stopped or (self.matcher is not None and self.matcher.complete):
            finish, delta = FinishReason.STOP, delta + ("" if self.out.stopped else self.out.flush())
        elif len(self.tokens) >= self.max_new_tokens:
            finish, delta = FinishReason.LENGTH, delta + self.out.flush()
        logprobs: tuple[TokenLogprob, ...] = ()
        if delta or finish is not None:
            logprobs, self._held = tuple(self._held), []
        return Step(
            feed=() if finish is not None else (token,), delta=delta, token=token, finish=finish, logprobs=logprobs
        )

    def outcome(self) -> Outcome:
        return Outcome(tuple(self.tokens), tuple(self.tokens))
