"""The generation loop, as layered generators (gpt-fast / mlx-lm style).

`generate_step` yields token ids (prefill once, then one KV-cached decode per token);
`stream_generate` adds detokenized text deltas, finish reason and timings.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .decoder import Decoder, KVCache
from .detokenize import StopText, StreamingDetokenizer
from .kernels.sampling import Sampler

EmbedFn = Callable[[list[int]], np.ndarray]  # ids -> [n, H]


class FinishReason(str, enum.Enum):
    """Why a generation ended (OpenAI's names: a stop string also finishes with STOP)."""

    STOP = "stop"  # EOS, or one of the request's stop strings
    LENGTH = "length"  # max_new_tokens, or the context is full
    CANCELLED = "cancelled"  # the caller cancelled (a closed stream, a disconnected client)

    def __str__(self) -> str:  # the value, on every Python (3.10's str() of a str-enum names the member)
        return self.value


@dataclass
class Timings:
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # request start -> first token (preprocess + vision + prefill + first sample)
    decode_s: float = 0.0  # after the first token
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefix_cached: bool = False  # "[INST] " + image came from the prefix cache (only the question was prefilled)
    prefilled_tokens: int = 0  # positions this request ran through prefill (the rest came from a cache)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        d["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        return d


@dataclass(frozen=True)
class Response:
    text: str  # text delta since the previous response
    token: int | None
    finish_reason: FinishReason | None = None  # set on the last response only
    timings: Timings | None = None


@dataclass
class GenerationState:
    """What a finished generation leaves behind (for follow-up turns that reuse the cache)."""
    tokens: list[int] = field(default_factory=list)
    cache: KVCache | None = None
    finish_reason: FinishReason | None = None
    positions: list = field(default_factory=list)  # the prompt, one entry per decoder position (pipeline.py)


def generate_step(decoder: Decoder, embeds: np.ndarray, embed: EmbedFn, sampler: Sampler, max_new_tokens: int,
                  eos_id: int, cache: KVCache | None = None, state: GenerationState | None = None,
                  cancel: threading.Event | None = None) -> Iterator[int]:
    """[1,S,H] prompt embeddings -> token ids, stopping at EOS, max_new_tokens or cancel.

    `state.cache` always holds the cache of every position fed so far (also when the consumer stops early)."""
    state = state if state is not None else GenerationState()
    logits, state.cache = decoder.forward(embeds, cache if cache is not None else decoder.empty_cache())  # prefill
    state.finish_reason = FinishReason.LENGTH
    for n in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            state.finish_reason = FinishReason.CANCELLED
            break
        token = sampler(logits[0, -1])
        state.tokens.append(token)
        yield token
        if token == eos_id:
            state.finish_reason = FinishReason.STOP
            break
        if n + 1 == max_new_tokens:
            break
        logits, state.cache = decoder.forward(embed([token])[None], state.cache)  # [1,1,H] -> [1,1,V]


class TokenStream:
    """One request's output side: token ids in, text deltas out, ending at EOS or the first stop string."""

    def __init__(self, tokenizer, eos_id: int, stop: tuple[str, ...] = ()):
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = StopText(stop)
        self.eos_id = eos_id
        self.finish: FinishReason | None = None  # STOP once EOS or a stop string was seen

    def add(self, token: int) -> str:
        if token == self.eos_id:
            self.finish = FinishReason.STOP
            return self.flush()
        delta = self.stops.add(self.detok.add(token))
        if self.stops.stopped:
            self.finish = FinishReason.STOP
        return delta

    def flush(self) -> str:
        return self.stops.add(self.detok.flush()) + self.stops.flush()


def stream_generate(decoder: Decoder, embeds: np.ndarray, embed: EmbedFn, sampler: Sampler, tokenizer,
                    max_new_tokens: int, eos_id: int, timings: Timings, t_start: float,
                    cancel: threading.Event | None = None, state: GenerationState | None = None,
                    cache: KVCache | None = None, stop: tuple[str, ...] = ()) -> Iterator[Response]:
    state = state if state is not None else GenerationState()
    out = TokenStream(tokenizer, eos_id, stop)
    t_prefill = time.perf_counter()
    t_first = None
    for token in generate_step(decoder, embeds, embed, sampler, max_new_tokens, eos_id, cache=cache, state=state,
                               cancel=cancel):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            timings.prefill_s += now - t_prefill  # after any cached-prefix prefill the caller timed
            timings.ttft_s = now - t_start
        timings.new_tokens += 1
        timings.decode_s = now - t_first
        delta = out.add(token)
        if out.finish is not None:  # EOS or a stop string: the last delta goes with the final response
            state.finish_reason = out.finish
            yield Response(delta, None, out.finish, timings)
            return
        if delta:
            yield Response(delta, token)
    yield Response(out.flush(), None, state.finish_reason, timings)
