"""The generation loop, as layered generators (gpt-fast / mlx-lm style).

`generate_step` yields token ids (prefill once, then one KV-cached decode per token);
`stream_generate` adds detokenized text deltas, finish reason and timings.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .decoder import Decoder, KVCache
from .detokenize import StreamingDetokenizer
from .kernels.sampling import Sampler

EmbedFn = Callable[[list[int]], np.ndarray]  # ids -> [n, H]


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
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled"
    timings: Timings | None = None


@dataclass
class GenerationState:
    """What a finished generation leaves behind (for follow-up turns that reuse the cache)."""
    tokens: list[int] = field(default_factory=list)
    cache: KVCache | None = None
    finish_reason: str | None = None
    positions: list = field(default_factory=list)  # the prompt, one entry per decoder position (pipeline.py)


def generate_step(decoder: Decoder, embeds: np.ndarray, embed: EmbedFn, sampler: Sampler, max_new_tokens: int,
                  eos_id: int, cache: KVCache | None = None, state: GenerationState | None = None,
                  cancel: threading.Event | None = None) -> Iterator[int]:
    """[1,S,H] prompt embeddings -> token ids, stopping at EOS, max_new_tokens or cancel."""
    state = state if state is not None else GenerationState()
    logits, cache = decoder.forward(embeds, cache if cache is not None else decoder.empty_cache())  # prefill
    for n in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            state.finish_reason = "cancelled"
            break
        token = sampler(logits[0, -1])
        state.tokens.append(token)
        yield token
        if token == eos_id:
            state.finish_reason = "stop"
            break
        if n + 1 == max_new_tokens:
            state.finish_reason = "length"
            break
        logits, cache = decoder.forward(embed([token])[None], cache)  # [1,1,H] -> [1,1,V]
    else:
        state.finish_reason = "length"
    state.cache = cache


def stream_generate(decoder: Decoder, embeds: np.ndarray, embed: EmbedFn, sampler: Sampler, tokenizer,
                    max_new_tokens: int, eos_id: int, timings: Timings, t_start: float,
                    cancel: threading.Event | None = None, state: GenerationState | None = None,
                    cache: KVCache | None = None) -> Iterator[Response]:
    state = state if state is not None else GenerationState()
    detok = StreamingDetokenizer(tokenizer)
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
        if token == eos_id:
            break
        delta = detok.add(token)
        if delta:
            yield Response(delta, token)
    tail = detok.flush()
    yield Response(tail, None, state.finish_reason, timings)
