"""A request prepared once (prompt ids, pixels, limits, sampling), then advanced by the engine.

`SkinVL.prepare` builds it in the caller's thread, so everything a request can be refused for (an unreadable
image, an empty question, a prompt longer than the context) fails there, before it takes a slot or a queue
place; the engine only runs prepared requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .generate import Timings
from .kernels.sampling import SamplingConfig


@dataclass(frozen=True)
class GenerationParams:
    """What a caller may set per request (the OpenAI-style knobs), validated once."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings; it is not part of the answer

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UsageError("stop strings must be non-empty strings")
        try:
            self.sampling  # noqa: B018 (validates temperature / top_p / top_k)
        except ValueError as e:
            raise UsageError(f"{e}; fix the sampling parameters") from None

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)


@dataclass
class Request:
    """One question about one image, ready to run: built by `SkinVL.prepare`."""

    ids: list[int]  # BOS + prompt ids with one IMAGE_PLACEHOLDER
    pixels: np.ndarray  # [1,3,S,S] float32
    image_key: str  # sha256 of the pixels (feature and prefix caches are keyed by content)
    positions: list  # one entry per decoder position (image rows tagged by image_key): prefix matching
    prompt_tokens: int  # decoder positions the prompt fills (text ids + image rows)
    max_new_tokens: int  # already clipped to the context left after the prompt
    params: GenerationParams
    reuse: object | None = None  # pipeline.Turn of the same conversation: its cache is kept for shared positions
    t_start: float = field(default_factory=time.perf_counter)
    timings: Timings = field(default_factory=Timings)

    @property
    def sampling(self) -> SamplingConfig:
        return self.params.sampling
