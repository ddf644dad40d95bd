"""What a request gives back: `Response` (a text delta, the token; on the last one the finish reason, `Timings`, every
token, and what the request's mode adds), and `FinishReason`. The engine (engine.py) makes them; the facade
(pipeline.py) joins them into an `Answer`. Token log-probabilities (`TokenLogprob`) ride on the responses when asked."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .kv import Snapshot


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

    def to_dict(self) -> dict[str, Any]:
        d = {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        d["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        return d


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's own distribution (log-softmax of the logits, before
    temperature, top-k/top-p and constraint masks), and the `top` most likely tokens there with theirs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class Response:
    text: str  # text delta since the previous response
    token: int | None
    finish_reason: FinishReason | None = None  # set on the last response only
    timings: Timings | None = None  # on the last response
    tokens: tuple[int, ...] = ()  # on the last response: the answer's token ids (EOS included when it ended with one)
    snapshot: Snapshot | None = None  # on the last response, when the request asked (conversations): its slot's KV
    label_logprobs: tuple[np.ndarray, ...] = ()  # on the last response of a label-scoring request: per label [n_tokens]
    logprobs: tuple[
        TokenLogprob, ...
    ] = ()  # when asked: the tokens generated since the previous response (EOS excluded)


def logprob_content(tokenizer: Any, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's `choices[].logprobs.content`: per token its text, logprob, UTF-8 bytes and the top alternatives."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        b = tokenizer.token_bytes(token)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
