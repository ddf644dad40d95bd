"""The Python API: load a bundle once, ask many questions about images.

    model = SkinVL.load("bundles/skinvl")
    answer = model.ask("lesion.jpg", "What is this lesion?")
    for r in model.stream("lesion.jpg", "Describe it."): print(r.text, end="")
    chat = model.conversation("lesion.jpg")          # multi-turn: each follow-up prefills only its own tokens
    chat.ask("What is this lesion?"); chat.ask("Is it benign?")

Data path, top to bottom: image -> pixels (image.py) -> features (vision.py) -> prompt ids (prompt.py)
-> embeddings with the features spliced in -> prefill + KV-cached decode (decoder.py, generate.py)
-> sampling (kernels/sampling.py) -> streamed text (detokenize.py).

Thread safety: one SkinVL may be shared by any number of threads; each call builds its own KV cache
and sampler, and onnxruntime sessions are safe for concurrent Run calls. Image features are cached
(small LRU keyed by pixel content) under a lock, so a second question about the same image skips the
vision encoder.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ContextLengthError
from ..manifest import Precision, Prefill
from .bundle import Bundle
from .decoder import KVCache
from .generate import FinishReason, GenerationState, Response, Timings, stream_generate
from .image import load_image, preprocess
from .kernels.sampling import make_sampler
from .prompt import IMAGE_PLACEHOLDER, build_prompt_ids, check_context
from .request import GenerationParams, Request
from .tokenizer import TextTokenizer


@dataclass(frozen=True)
class Answer:
    answer: str
    token_ids: list[int]
    finish_reason: FinishReason
    timings: Timings
    prompt_tokens: int

    def to_dict(self) -> dict:
        return {"answer": self.answer, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "timings": self.timings.to_dict()}


class SkinVL:
    def __init__(self, bundle: Bundle, tokenizer: TextTokenizer, feature_cache_size: int = 8,
                 prefix_cache_size: int | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.tokenizer = tokenizer
        self._features: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = feature_cache_size
        # KV caches of "[INST] " + image for the last few images: a new question about the same image prefills
        # only its own ~20 tokens instead of ~600 (76 MB each at 7B, so fewer than the feature cache)
        self._prefixes: OrderedDict[tuple, KVCache] = OrderedDict()
        self._prefix_size = min(2, feature_cache_size) if prefix_cache_size is None else prefix_cache_size
        self._lock = threading.Lock()

    @classmethod
    def load(cls, bundle: str | Path | None = None, *, threads: int | None = None,
             precision: Precision | str | None = None, check_hashes: bool = False, device=None,
             prefill: Prefill | str | None = None) -> "SkinVL":
        # device: auto (default) | cpu | cuda | tensorrt (runtime/devices.py); unavailable -> DeviceError, no fallback
        # prefill: int8 | decoder | None (auto): the graph many-row calls run through (runtime/bundle.py)
        b = Bundle.load(bundle, threads=threads, precision=precision, check_hashes=check_hashes, device=device,
                        prefill=prefill)
        from .. import names

        return cls(b, TextTokenizer.from_file(b.folder / names.TOKENIZER))

    # --- stages ---
    def pixels(self, image) -> np.ndarray:
        """path / bytes / PIL image -> [1,3,S,S] float32."""
        return preprocess(load_image(image), self.manifest.preprocess)

    def image_features(self, pixels: np.ndarray, key: str | None = None) -> np.ndarray:
        """[1,3,S,S] -> [N,H], memoised by pixel content (`key`: its sha256 when already computed)."""
        key = key or hashlib.sha256(pixels.tobytes()).hexdigest()
        with self._lock:
            if key in self._features:
                self._features.move_to_end(key)
                return self._features[key]
        feats = self.bundle.vision.encode(pixels)[0]
        with self._lock:
            self._features[key] = feats
            while len(self._features) > self._cache_size:
                self._features.popitem(last=False)
        return feats

    def prompt_embeddings(self, ids: list[int], feats: np.ndarray) -> np.ndarray:
        """prompt ids with one IMAGE_PLACEHOLDER + [N,H] features -> [1, len(ids)-1+N, H]."""
        parts, start = [], 0
        for i, t in enumerate(ids):
            if t == IMAGE_PLACEHOLDER:
                parts += [self.bundle.embed(ids[start:i]), feats]
                start = i + 1
        parts.append(self.bundle.embed(ids[start:]))
        return np.concatenate(parts)[None]

    def prefix_cache(self, key: tuple, prefix_ids: list[int], feats: np.ndarray) -> tuple[KVCache, bool]:
        """KV cache of the prompt up to and including the image features, and whether it was cached.

        The stored cache is never extended; callers get a private copy (select), so threads sharing one
        image never write into each other's buffers."""
        with self._lock:
            cached = self._prefixes.get(key)
            if cached is not None:
                self._prefixes.move_to_end(key)
        hit = cached is not None
        if not hit:
            embeds = np.concatenate([self.bundle.embed(prefix_ids), feats])[None]  # [1, P+N, H]
            _, cached = self.bundle.decoder.forward(embeds, self.bundle.decoder.empty_cache())
            if self._prefix_size <= 0:
                return cached, False  # not shared with anyone: no copy needed
            with self._lock:
                self._prefixes[key] = cached
                while len(self._prefixes) > self._prefix_size:
                    self._prefixes.popitem(last=False)
        return cached.select(np.zeros(1, np.int64)), hit

    # --- requests ---
    def prepare(self, image, question: str, *, history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 256,
                temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                stop: Sequence[str] = (), reuse: "Turn | None" = None, strict_context: bool = False) -> Request:
        """Everything a request needs before it runs, checked in the caller's thread (runtime/request.py).

        The prompt must leave room for one new token; `max_new_tokens` is clipped to the context left, or with
        `strict_context` a prompt + max_new_tokens over the context is refused with both numbers (servers)."""
        t0 = time.perf_counter()
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                  seed=seed, stop=tuple(stop))
        ids = build_prompt_ids(self.tokenizer, question, history)
        pixels = self.pixels(image)
        n_img = self.manifest.model.image_tokens
        n_prompt = len(ids) - 1 + n_img
        limit = self.manifest.model.max_context
        if n_prompt >= limit:
            raise ContextLengthError(
                f"prompt is {n_prompt} tokens ({n_img} image + text) but the context is {limit}; "
                f"shorten the question{' or start a new conversation' if history else ''}"
            )
        if strict_context:
            check_context(n_prompt, max_new_tokens, limit)
        key = hashlib.sha256(pixels.tobytes()).hexdigest()
        req = Request(ids=ids, pixels=pixels, image_key=key, positions=positional_ids(ids, n_img, key),
                      prompt_tokens=n_prompt, max_new_tokens=min(max_new_tokens, limit - n_prompt), params=params,
                      reuse=reuse, t_start=t0)
        req.timings.preprocess_s = time.perf_counter() - t0
        req.timings.prompt_tokens = n_prompt
        return req

    def run(self, req: Request, *, cancel: threading.Event | None = None,
            state: GenerationState | None = None) -> Iterator[Response]:
        """Run a prepared request alone: vision, prefill (reusing cached prefixes), decode, streamed text."""
        timings, ids, n_img = req.timings, req.ids, self.manifest.model.image_tokens
        slot = ids.index(IMAGE_PLACEHOLDER)
        keep = req.reuse.shared_prefix(req.positions) if req.reuse is not None else 0
        if keep > slot + n_img:  # a follow-up: the earlier turns' cache (image included), then only what is new
            t2 = time.perf_counter()
            cache = req.reuse.cache.truncate(keep)
            timings.prefix_cached = True
            suffix = self.bundle.embed(ids[keep - n_img + 1:])[None]  # positions after the image are ids shifted
        else:  # vision, then prefill in two parts: "[INST] " + image (cached per image), then the text after it
            t1 = time.perf_counter()
            feats = self.image_features(req.pixels, req.image_key)  # [N,H]
            timings.vision_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            cache, timings.prefix_cached = self.prefix_cache((req.image_key, tuple(ids[:slot])), ids[:slot], feats)
            suffix = self.bundle.embed(ids[slot + 1:])[None]  # [1, S, H]
        timings.prefill_s = time.perf_counter() - t2
        # positions run through prefill by this request (a prefix computed just now counts; a cached one not)
        timings.prefilled_tokens = req.prompt_tokens - cache.length if timings.prefix_cached else req.prompt_tokens
        state = state if state is not None else GenerationState()
        state.positions = req.positions
        yield from stream_generate(
            self.bundle.decoder, suffix, self.bundle.embed, make_sampler(req.sampling), self.tokenizer,
            req.max_new_tokens, self.manifest.tokens.eos_id, timings, req.t_start, cancel=cancel, state=state,
            cache=cache, stop=req.params.stop,
        )

    def stream(self, image, question: str, *, cancel: threading.Event | None = None,
               state: GenerationState | None = None, **kw) -> Iterator[Response]:
        """Answer `question` about `image`, streaming; keywords as `prepare` (history, max_new_tokens, sampling,
        stop, reuse: the previous turn of the same conversation, whose KV cache is kept for shared positions)."""
        return self.run(self.prepare(image, question, **kw), cancel=cancel, state=state)

    def conversation(self, image) -> "Conversation":
        """A multi-turn chat about one image; each follow-up reuses the previous turns' KV cache."""
        return Conversation(self, image)

    def ask(self, image, question: str, **kw) -> Answer:
        state = GenerationState()
        return collect(self.stream(image, question, state=state, **kw), state)

    def generate_beam(self, image, question: str, config=None, **kw) -> Answer:
        """Beam search answer (runtime/beam.py); `config` a BeamConfig, or its fields as keywords."""
        from .beam import BeamConfig, beam_search

        cfg = config if config is not None else BeamConfig(**kw)
        t0 = time.perf_counter()
        ids = build_prompt_ids(self.tokenizer, question)
        feats = self.image_features(self.pixels(image))
        embeds = self.prompt_embeddings(ids, feats)  # [1,S,H]
        room = self.manifest.model.max_context - embeds.shape[1]
        if room <= 0:
            raise ContextLengthError(f"prompt is {embeds.shape[1]} tokens but the context is "
                                     f"{self.manifest.model.max_context}; shorten the question")
        if cfg.max_new_tokens > room:
            from dataclasses import replace

            cfg = replace(cfg, max_new_tokens=room, min_new_tokens=min(cfg.min_new_tokens, room))
        res = beam_search(self.bundle.decoder, embeds, self.bundle.embed, cfg, self.manifest.tokens.eos_id)
        eos = self.manifest.tokens.eos_id
        timings = Timings(prompt_tokens=embeds.shape[1], new_tokens=len(res.tokens), decode_s=time.perf_counter() - t0)
        text = self.tokenizer.decode([t for t in res.tokens if t != eos])
        return Answer(text, res.tokens, res.finish_reason, timings, embeds.shape[1])

    def classify(self, image, labels, *, normalize: bool = True, batch_size: int = 8):
        """Rank `labels` by the likelihood of each as the answer to the paper's question (runtime/classify.py)."""
        from . import classify as zs

        names = zs.canonical_labels(labels)
        question = zs.question_for(names)
        ids = build_prompt_ids(self.tokenizer, question)
        embeds = self.prompt_embeddings(ids, self.image_features(self.pixels(image)))  # [1,S,H]
        labels_ids = [zs.label_token_ids(self.tokenizer, n) for n in names]
        need = embeds.shape[1] + max(len(x) for x in labels_ids)
        if need > self.manifest.model.max_context:
            raise ContextLengthError(f"question + longest label need {need} tokens but the context is "
                                     f"{self.manifest.model.max_context}; pass fewer or shorter labels")
        logits, cache = self.bundle.decoder.forward(embeds, self.bundle.decoder.empty_cache())  # one prefill
        lps = zs.label_logprobs(self.bundle.decoder, logits[0, -1], cache, self.bundle.embed, labels_ids, batch_size)
        return zs.rank(names, lps, question, normalize)


def collect(responses: Iterator[Response], state: GenerationState) -> Answer:
    """Drain a stream into one Answer (text deltas joined; tokens from the generation state)."""
    text, last = [], None
    for r in responses:
        text.append(r.text)
        last = r
    return Answer("".join(text), state.tokens, last.finish_reason, last.timings, last.timings.prompt_tokens)


def positional_ids(ids: list[int], image_tokens: int, image_key: str) -> list:
    """Prompt ids with the image slot expanded to one entry per feature row (tagged with the image's hash),
    so two prompts can be compared position by position."""
    slot = ids.index(IMAGE_PLACEHOLDER)
    return [*ids[:slot], *((image_key, i) for i in range(image_tokens)), *ids[slot + 1:]]


@dataclass
class Turn:
    """What the decoder has seen after a turn: its KV cache and the id at each of its positions."""
    cache: KVCache
    positions: list

    def shared_prefix(self, positions: list) -> int:
        """Positions this cache can keep for a prompt: the common prefix, leaving at least one to prefill."""
        n = min(self.cache.length, len(positions) - 1)
        i = 0
        while i < n and self.positions[i] == positions[i]:
            i += 1
        return i


class Conversation:
    """Multi-turn chat about one image (LLaVA's template: `[INST] <image>\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST]`).

    The prompt of every turn is the full template with the earlier answers as text, exactly what a fresh
    request with that history would prefill; the previous turn's cache is kept for the positions the two
    share (the image, the earlier questions, the answer tokens as generated), so a follow-up prefills only
    its own question and the few tokens where the re-tokenized answer differs from the generated ids (the
    template's " </s>" after the answer)."""

    def __init__(self, model: SkinVL, image):
        self.model = model
        self.image = image
        self.history: list[tuple[str, str]] = []
        self._turn: Turn | None = None
        self._lock = threading.Lock()  # one turn at a time: each extends the previous one's cache

    def stream(self, question: str, *, state: GenerationState | None = None, **kw) -> Iterator[Response]:
        state = state if state is not None else GenerationState()
        with self._lock:
            answer = []
            for r in self.model.stream(self.image, question, history=tuple(self.history), state=state,
                                       reuse=self._turn, **kw):
                answer.append(r.text)
                yield r
            if state.cache is not None:  # positions the cache holds: prompt + the answer tokens fed back
                self._turn = Turn(state.cache, (state.positions + state.tokens)[: state.cache.length])
            self.history.append((question, "".join(answer)))  # what the user saw (cut at a stop string)

    def ask(self, question: str, **kw) -> Answer:
        state = GenerationState()
        return collect(self.stream(question, state=state, **kw), state)
