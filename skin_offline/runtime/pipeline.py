"""The Python API: load a bundle once, ask many questions about images.

    model = SkinVL.load("bundles/skinvl")
    answer = model.ask("lesion.jpg", "What is this lesion?")
    for r in model.stream("lesion.jpg", "Describe it."): print(r.text, end="")
    chat = model.conversation("lesion.jpg")          # multi-turn: each follow-up prefills only its own tokens
    chat.ask("What is this lesion?"); chat.ask("Is it benign?")

Data path, top to bottom: image -> pixels (image.py) -> features (vision.py) -> prompt ids (prompt.py) -> a
prepared request (request.py) -> the engine (engine.py): embeddings with the features spliced in, chunked
prefill into a KV-cache slot (slots.py, decoder.py), batched decode -> sampling (kernels/sampling.py) ->
streamed text (detokenize.py).

Thread safety: one SkinVL may be shared by any number of threads. Every request goes through the model's engine,
which runs up to `parallel` of them at once in one batch (the rest wait for a slot) with their own samplers and
KV rows. Image features are cached (small LRU keyed by pixel content) under a lock, and the engine's prompt cache
keeps the KV of recent prompts, so a second question about the same image skips the vision encoder and the
image's prefill.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ContextLengthError
from ..manifest import Precision, Prefill
from .bundle import Bundle
from .generate import FinishReason, GenerationState, Response, Timings
from .image import load_image, preprocess
from .kv import Snapshot
from .prompt import IMAGE_PLACEHOLDER, build_prompt_ids, check_context
from .prompt_cache import PromptCache
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
                 prompt_cache_size: int = 4, parallel: int = 4, max_queue: int | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.tokenizer = tokenizer
        self._features: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = feature_cache_size
        # KV of recent prompts (+ answers): a new question about the same image prefills only its own tokens
        # (~170 MB per 650-token entry at 7B with an fp32 cache, hence few entries and a byte budget)
        self.prompt_cache = PromptCache(max_entries=prompt_cache_size)
        self.parallel, self.max_queue = parallel, max_queue
        self._engine = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, bundle: str | Path | None = None, *, threads: int | None = None,
             precision: Precision | str | None = None, check_hashes: bool = False, device=None,
             prefill: Prefill | str | None = None, parallel: int = 4, max_queue: int | None = None) -> "SkinVL":
        # device: auto (default) | cpu | cuda | tensorrt (runtime/devices.py); unavailable -> DeviceError, no fallback
        # prefill: int8 | decoder | None (auto): the graph many-row calls run through (runtime/bundle.py)
        # parallel: requests decoded together (engine slots; untouched slots cost address space, not memory)
        b = Bundle.load(bundle, threads=threads, precision=precision, check_hashes=check_hashes, device=device,
                        prefill=prefill)
        from .. import names

        return cls(b, TextTokenizer.from_file(b.folder / names.TOKENIZER), parallel=parallel, max_queue=max_queue)

    @property
    def engine(self):
        """The model's request engine (runtime/engine.py), started on first use."""
        with self._lock:
            if self._engine is None:
                from .engine import Engine

                self._engine = Engine(self, parallel=self.parallel, max_queue=self.max_queue,
                                      prompt_cache=self.prompt_cache)
            return self._engine

    def close(self, timeout: float | None = None) -> None:
        """Cancel what is running and stop the engine's threads."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close(cancel=True, timeout=timeout)

    # --- stages ---
    def pixels(self, image) -> np.ndarray:
        """path / bytes / PIL image / ImageSource -> [1,3,S,S] float32."""
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

    # --- requests ---
    def prepare(self, image, question: str, *, history: Sequence[tuple[str, str]] = (), max_new_tokens: int = 256,
                temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                stop: Sequence[str] = (), reuse: Snapshot | None = None, strict_context: bool = False,
                keep_snapshot: bool = False) -> Request:
        """Everything a request needs before it runs, checked in the caller's thread (runtime/request.py).

        The prompt must leave room for one new token; `max_new_tokens` is clipped to the context left, or with
        `strict_context` a prompt + max_new_tokens over the context is refused with both numbers (servers).
        `reuse`: a snapshot of an earlier turn whose positions this prompt may share (Conversation passes it)."""
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
                      reuse=reuse, keep_snapshot=keep_snapshot, t_start=t0)
        req.timings.preprocess_s = time.perf_counter() - t0
        req.timings.prompt_tokens = n_prompt
        return req

    def stream(self, image, question: str, *, cancel: threading.Event | None = None,
               state: GenerationState | None = None, **kw) -> Iterator[Response]:
        """Answer `question` about `image`, streaming; keywords as `prepare` (history, max_new_tokens, sampling,
        stop, reuse). Setting `cancel` (or closing the iterator) stops the request at the engine's next step."""
        return iter(self.engine.submit(self.prepare(image, question, **kw), cancel=cancel, state=state))

    def conversation(self, image) -> "Conversation":
        """A multi-turn chat about one image; each follow-up reuses the previous turns' KV cache."""
        return Conversation(self, image)

    def ask(self, image, question: str, **kw) -> Answer:
        state = GenerationState()
        return collect(self.stream(image, question, state=state, **kw), state)

    def _prompt(self, image, question: str, new_tokens: int) -> tuple[Request, np.ndarray]:
        """A prepared request whose prompt + `new_tokens` must fit the context, and its [1,S,H] embeddings."""
        req = self.prepare(image, question, max_new_tokens=new_tokens, strict_context=True)
        return req, self.prompt_embeddings(req.ids, self.image_features(req.pixels, req.image_key))

    def generate_beam(self, image, question: str, config=None, **kw) -> Answer:
        """Beam search answer (runtime/beam.py); `config` a BeamConfig, or its fields as keywords. Beams keep
        their own batch shape (one row per beam) on the decoder directly, after the shared prepare step."""
        from .beam import BeamConfig, beam_search

        cfg = config if config is not None else BeamConfig(**kw)
        req = self.prepare(image, question, max_new_tokens=cfg.max_new_tokens)
        if req.max_new_tokens < cfg.max_new_tokens:  # clipped to the context left
            cfg = replace(cfg, max_new_tokens=req.max_new_tokens, min_new_tokens=min(cfg.min_new_tokens, req.max_new_tokens))
        embeds = self.prompt_embeddings(req.ids, self.image_features(req.pixels, req.image_key))  # [1,S,H]
        res = beam_search(self.bundle.decoder, embeds, self.bundle.embed, cfg, self.manifest.tokens.eos_id)
        eos = self.manifest.tokens.eos_id
        timings = Timings(prompt_tokens=req.prompt_tokens, new_tokens=len(res.tokens),
                          decode_s=time.perf_counter() - req.t_start)
        text = self.tokenizer.decode([t for t in res.tokens if t != eos])
        return Answer(text, res.tokens, FinishReason(res.finish_reason), timings, req.prompt_tokens)

    def classify(self, image, labels, *, normalize: bool = True, batch_size: int = 8):
        """Rank `labels` by the likelihood of each as the answer to the paper's question (runtime/classify.py)."""
        from . import classify as zs

        names = zs.canonical_labels(labels)
        labels_ids = [zs.label_token_ids(self.tokenizer, n) for n in names]
        question = zs.question_for(names)
        try:
            req, embeds = self._prompt(image, question, max(len(x) for x in labels_ids))
        except ContextLengthError as e:
            raise ContextLengthError(f"{e} (the question lists every label; pass fewer or shorter labels)") from None
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


class Conversation:
    """Multi-turn chat about one image (LLaVA's template: `[INST] <image>\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST]`).

    The prompt of every turn is the full template with the earlier answers as text, exactly what a fresh
    request with that history would prefill; the previous turn's KV (a snapshot of its slot) is kept for the
    positions the two share (the image, the earlier questions, the answer tokens as generated), so a follow-up
    prefills only its own question and the few tokens where the re-tokenized answer differs from the generated
    ids (the template's " </s>" after the answer)."""

    def __init__(self, model: SkinVL, image):
        self.model = model
        self.image = image
        self.history: list[tuple[str, str]] = []
        self._last: Snapshot | None = None
        self._lock = threading.Lock()  # one turn at a time: each extends the previous one's cache

    def stream(self, question: str, *, state: GenerationState | None = None, **kw) -> Iterator[Response]:
        state = state if state is not None else GenerationState()
        with self._lock:
            answer = []
            for r in self.model.stream(self.image, question, history=tuple(self.history), state=state,
                                       reuse=self._last, keep_snapshot=True, **kw):
                answer.append(r.text)
                yield r
            self._last = state.snapshot or self._last
            self.history.append((question, "".join(answer)))  # what the user saw (cut at a stop string)

    def ask(self, question: str, **kw) -> Answer:
        state = GenerationState()
        return collect(self.stream(question, state=state, **kw), state)
