"""A request prepared once (prompt, pixels, limits, decoding mode, image notices), then advanced by the engine.

`SkinVL.prepare` builds it in the caller's thread, so everything a request can be refused for (an unreadable
image, an empty question, a prompt longer than the context, bad sampling values) fails there, before it takes a
slot or a queue place; the engine only runs prepared requests. Its mode says how tokens are chosen:
`GenerationParams` (greedy / sampled, streamed), `BeamConfig` (runtime/beam.py) or `Scoring` (runtime/classify.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from ..errors import UsageError
from .beam import BeamConfig
from .constraints import Matcher
from .kv import Snapshot
from .prompt import Prompt
from .response import Timings
from .sampling import SamplingConfig


@dataclass(frozen=True)
class GenerationParams:
    """What a caller may set per request (the OpenAI-style knobs), validated once."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings; it is not part of the answer
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (0-20)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError("stop strings must be non-empty strings")
        if self.logprobs is not None and not (
            isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise UsageError(f"top logprobs must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        try:
            self.sampling  # noqa: B018 (validates temperature / top_p / top_k)
        except ValueError as e:
            raise UsageError(f"{e}; fix the sampling parameters") from None

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)


@dataclass(frozen=True)
class Scoring:
    """Score these labels' token ids as the answer (zero-shot classification), `rows` labels per wave."""

    labels_ids: tuple[tuple[int, ...], ...]
    rows: int = 8


Mode = Union[GenerationParams, BeamConfig, Scoring]
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class Request:
    """One question about one image, ready to run: built by `SkinVL.prepare`."""

    prompt: Prompt  # ids and image span
    pixels: np.ndarray  # [1,3,S,S] float32
    image_key: str  # sha256 of the pixels (feature and prefix caches are keyed by content)
    positions: list[Any]  # one entry per decoder position (image rows tagged by image_key): prefix matching
    mode: Mode
    max_new_tokens: int  # already clipped to the context left after the prompt
    notices: tuple[str, ...] = ()  # what the image loader noticed (e.g. text burned into the pixels), for the user
    matcher: Matcher | None = None  # the constraint the answer keeps to (runtime/constraints.py), checked already
    reuse: Snapshot | None = None  # an earlier turn's KV: kept for the positions this prompt shares with it
    keep_snapshot: bool = False  # hand the finished slot's KV back in the last response (conversations)
    t_start: float = field(default_factory=time.perf_counter)
    timings: Timings = field(default_factory=Timings)

    @property
    def prompt_tokens(self) -> int:
        """Decoder positions the prompt fills (text ids + image rows)."""
        return self.prompt.length
