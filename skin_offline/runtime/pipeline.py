"""The Python API: load a bundle once, ask many questions about images.

    model = SkinVL.load("bundles/skinvl")
    answer = model.ask("lesion.jpg", "What is this lesion?")
    for r in model.stream("lesion.jpg", "Describe it."): print(r.text, end="")
    chat = model.conversation("lesion.jpg")          # multi-turn: each follow-up prefills only its own tokens
    chat.ask("What is this lesion?"); chat.ask("Is it benign?")
    model.generate_beam("lesion.jpg", "Describe it.", num_beams=5)     # beam search (runtime/beam.py)
    model.classify("lesion.jpg", ["melanoma", "nevus"])                # zero-shot labels (runtime/classify.py)

Every mode is prepared here (`prepare`, `prepare_beam`, `prepare_scoring`: runtime/request.py) and run by the
model's one engine (runtime/engine.py), which decodes up to `parallel` requests together; the request path is
listed in runtime/__init__.py.

Thread safety: one SkinVL may be shared by any number of threads. Every request goes through the engine, with its
own sampler and KV rows; image features are cached by pixel content (vision.py) and the engine's prompt cache keeps
the KV of recent prompts, so a second question about the same image skips the vision encoder and the image's
prefill.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .. import names
from ..errors import ConstraintError, ContextLengthError
from ..manifest import Precision, Prefill
from .beam import BeamConfig
from .bundle import Bundle
from .classify import Ranking, canonical_labels, label_token_ids, question_for, rank
from .constraints import Constraint, Matcher, Vocabulary, structured_value
from .engine import Engine, Stream
from .image import load_image, preprocess, read_image
from .kv import Snapshot
from .prompt import Prompt, build_prompt_ids, check_context
from .prompt_cache import PromptCache
from .request import GenerationParams, Mode, Request, Scoring
from .response import FinishReason, Response, Timings, TokenLogprob, logprob_content
from .tokenizer import TextTokenizer
from .vision import VisionStage, pixel_key


@dataclass(frozen=True)
class Answer:
    answer: str
    token_ids: list[int]
    finish_reason: FinishReason
    timings: Timings
    prompt_tokens: int
    notices: tuple[str, ...] = ()  # what the image loader noticed (e.g. text burned into the pixels)
    logprobs: tuple[TokenLogprob, ...] | None = None  # when asked: per answer token (EOS excluded)
    structured: Any = None  # a complete constrained answer, parsed (JSON value, or the text of regex/choice/grammar)

    def to_dict(self, tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
        """JSON-ready; with a `tokenizer`, logprobs in OpenAI's `logprobs.content` shape."""
        d: dict[str, Any] = {
            "answer": self.answer,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "timings": self.timings.to_dict(),
        }
        if self.logprobs is not None and tokenizer is not None:
            d["logprobs"] = {"content": logprob_content(tokenizer, self.logprobs)}
        if self.structured is not None:
            d["structured"] = self.structured
        if self.notices:
            d["notices"] = list(self.notices)
        return d


class SkinVL:
    def __init__(
        self,
        bundle: Bundle,
        tokenizer: TextTokenizer,
        feature_cache_size: int = 8,
        prompt_cache_size: int = 4,
        parallel: int = 4,
        max_queue: int | None = None,
    ):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.tokenizer = tokenizer
        self.vision = VisionStage(bundle.vision, feature_cache_size)
        self.vocabulary = Vocabulary(bundle.folder / names.TOKENIZER, bundle.manifest.tokens.eos_id)  # constraints
        # KV of recent prompts (+ answers): a new question about the same image prefills only its own tokens
        # (~170 MB per 650-token entry at 7B with an fp32 cache, hence few entries and a byte budget)
        self.prompt_cache = PromptCache(max_entries=prompt_cache_size)
        self.parallel, self.max_queue = parallel, max_queue
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        bundle: str | Path | None = None,
        *,
        threads: int | None = None,
        precision: Precision | str | None = None,
        check_hashes: bool = False,
        device: Any = None,
        prefill: Prefill | str | None = None,
        parallel: int = 4,
        max_queue: int | None = None,
    ) -> "SkinVL":
        # device: auto (default) | cpu | cuda | tensorrt (runtime/devices.py); unavailable -> DeviceError, no fallback
        # prefill: int8 | decoder | None (auto): the graph many-row calls run through (runtime/bundle.py)
        # parallel: requests decoded together (engine slots; untouched rows cost address space, not memory)
        b = Bundle.load(
            bundle, threads=threads, precision=precision, check_hashes=check_hashes, device=device, prefill=prefill
        )
        return cls(b, TextTokenizer.from_file(b.folder / names.TOKENIZER), parallel=parallel, max_queue=max_queue)

    @property
    def engine(self) -> Engine:
        """The model's request engine (runtime/engine.py), started on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = Engine.for_bundle(
                    self.bundle,
                    self.tokenizer,
                    self.vision,
                    parallel=self.parallel,
                    max_queue=self.max_queue,
                    prompt_cache=self.prompt_cache,
                )
            return self._engine

    def close(self, timeout: float | None = None) -> None:
        """Cancel what is running and stop the engine's threads."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close(cancel=True, timeout=timeout)

    # --- stages ---
    def pixels(self, image: Any) -> np.ndarray:
        """path / bytes / PIL image / ImageSource -> [1,3,S,S] float32."""
        return preprocess(load_image(image), self.manifest.preprocess)

    def image_features(self, pixels: np.ndarray, key: str | None = None) -> np.ndarray:
        """[1,3,S,S] -> [N,H], memoised by pixel content (`key`: its sha256 when already computed)."""
        return self.vision.features(pixels, key)

    # --- requests ---
    def _request(
        self,
        image: Any,
        question: str,
        mode: Mode,
        max_new_tokens: int,
        *,
        history: Sequence[tuple[str, str]] = (),
        strict_context: bool = False,
        reuse: Snapshot | None = None,
        keep_snapshot: bool = False,
        constraint: Constraint | None = None,
        constraint_field: str = "constraint",
    ) -> Request:
        """The prompt, pixels and limits every mode shares, checked in the caller's thread."""
        t0 = time.perf_counter()
        matcher: Matcher | None = None
        if constraint is not None:  # checked before the image is read: the cheap refusal first
            matcher = self.vocabulary.compile(constraint, constraint_field).matcher()
        n_img = self.manifest.model.image_tokens
        prompt = Prompt.of(build_prompt_ids(self.tokenizer, question, history), n_img)
        loaded = read_image(image)
        pixels = preprocess(loaded.image, self.manifest.preprocess)
        limit = self.manifest.model.max_context
        if prompt.length >= limit:
            raise ContextLengthError(
                f"prompt is {prompt.length} tokens ({n_img} image + text) but the context is {limit}; "
                f"shorten the question{' or start a new conversation' if history else ''}"
            )
        if strict_context:
            check_context(prompt.length, max_new_tokens, limit)
        key = pixel_key(pixels)
        req = Request(
            prompt=prompt,
            pixels=pixels,
            image_key=key,
            positions=prompt.positions(key),
            mode=mode,
            max_new_tokens=min(max_new_tokens, limit - prompt.length),
            notices=loaded.notices,
            matcher=matcher,
            reuse=reuse,
            keep_snapshot=keep_snapshot,
            t_start=t0,
        )
        req.timings.preprocess_s = time.perf_counter() - t0
        req.timings.prompt_tokens = prompt.length
        return req

    def prepare(
        self,
        image: Any,
        question: str,
        *,
        history: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        reuse: Snapshot | None = None,
        strict_context: bool = False,
        keep_snapshot: bool = False,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        constraint_field: str = "constraint",
    ) -> Request:
        """A greedy or sampled answer, ready for `engine.submit` (runtime/request.py).

        The prompt must leave room for one new token; `max_new_tokens` is clipped to the context left, or with
        `strict_context` a prompt + max_new_tokens over the context is refused with both numbers (servers).
        `reuse`: a snapshot of an earlier turn whose positions this prompt may share (Conversation passes it).
        `constraint` (runtime/constraints.py): the answer keeps to it (refused here, naming `constraint_field`, when
        it cannot be used); `logprobs`: each token's log-probability and that many alternatives on the responses."""
        params = GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop),
            logprobs=logprobs,
        )
        if constraint is not None and params.stop:
            raise ConstraintError(
                f"{constraint_field}: stop strings cannot be combined with a constraint (a stop "
                f"string could cut the answer short of valid); drop `stop`"
            )
        return self._request(
            image,
            question,
            params,
            max_new_tokens,
            history=history,
            strict_context=strict_context,
            reuse=reuse,
            keep_snapshot=keep_snapshot,
            constraint=constraint,
            constraint_field=constraint_field,
        )

    def prepare_beam(
        self,
        image: Any,
        question: str,
        config: BeamConfig | None = None,
        *,
        constraint: Constraint | None = None,
        **kw: Any,
    ) -> Request:
        """A beam-search answer (runtime/beam.py): `config`, or its fields as keywords; max_new_tokens (and
        min_new_tokens) are clipped to the context left. With a `constraint` every beam keeps to it."""
        cfg = config if config is not None else BeamConfig(**kw)
        if constraint is not None and cfg.min_new_tokens:
            raise ConstraintError(
                f"constraint: min_new_tokens ({cfg.min_new_tokens}) cannot be combined with a "
                f"constraint (a complete answer must be able to end); set it to 0"
            )
        req = self._request(image, question, cfg, cfg.max_new_tokens, constraint=constraint)
        if req.max_new_tokens < cfg.max_new_tokens:
            req.mode = replace(
                cfg, max_new_tokens=req.max_new_tokens, min_new_tokens=min(cfg.min_new_tokens, req.max_new_tokens)
            )
        return req

    def prepare_scoring(self, image: Any, labels: Sequence[str], batch_size: int = 8) -> tuple[Request, list[str]]:
        """Scores of `labels` as the answer to the paper's question (runtime/classify.py): the request and the labels
        in the canonical order its scores come in."""
        names = canonical_labels(labels)
        ids = tuple(tuple(label_token_ids(self.tokenizer, n)) for n in names)
        try:
            req = self._request(
                image, question_for(names), Scoring(ids, batch_size), max(len(x) for x in ids), strict_context=True
            )
        except ContextLengthError as e:
            raise ContextLengthError(f"{e} (the question lists every label; pass fewer or shorter labels)") from None
        return req, names

    def stream(
        self, image: Any, question: str, *, cancel: threading.Event | None = None, **kw: Any
    ) -> Iterator[Response]:
        """Answer `question` about `image`, streaming; keywords as `prepare` (history, max_new_tokens, sampling,
        stop, reuse). Setting `cancel` (or closing the iterator) stops the request at the engine's next step."""
        return iter(self.engine.submit(self.prepare(image, question, **kw), cancel=cancel))

    def ask(self, image: Any, question: str, **kw: Any) -> Answer:
        return collect(self.engine.submit(self.prepare(image, question, **kw)))

    def generate_beam(
        self,
        image: Any,
        question: str,
        config: BeamConfig | None = None,
        *,
        constraint: Constraint | None = None,
        **kw: Any,
    ) -> Answer:
        """Beam search answer (runtime/beam.py); `config` a BeamConfig, or its fields as keywords."""
        return collect(self.engine.submit(self.prepare_beam(image, question, config, constraint=constraint, **kw)))

    def classify(self, image: Any, labels: Sequence[str], *, normalize: bool = True, batch_size: int = 8) -> Ranking:
        """Rank `labels` by the likelihood of each as the answer to the paper's question (runtime/classify.py)."""
        req, names = self.prepare_scoring(image, labels, batch_size)
        last = _last(self.engine.submit(req))
        return rank(names, list(last.label_logprobs), question_for(names), normalize, req.notices)

    def conversation(self, image: Any) -> "Conversation":
        """A multi-turn chat about one image; each follow-up reuses the previous turns' KV cache."""
        return Conversation(self, image)


def _last(stream: Stream) -> Response:
    last = None
    for r in stream:
        last = r
    assert last is not None and last.timings is not None
    return last


def collect(stream: Stream) -> Answer:
    """Drain a request's stream into one Answer (text deltas joined; tokens and timings from the last response)."""
    return _answer(stream, stream.request)


def _answer(responses: Iterator[Response] | Stream, req: Request | None, notices: tuple[str, ...] = ()) -> Answer:
    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    last = None
    for r in responses:
        text.append(r.text)
        logprobs += r.logprobs
        last = r
    assert last is not None and last.finish_reason is not None and last.timings is not None
    asked = req is not None and isinstance(req.mode, GenerationParams) and req.mode.logprobs is not None
    answer = "".join(text)
    return Answer(
        answer,
        list(last.tokens),
        last.finish_reason,
        last.timings,
        last.timings.prompt_tokens,
        req.notices if req is not None else notices,
        tuple(logprobs) if asked else None,
        structured_value(req.matcher if req is not None else None, answer, last.finish_reason),
    )


class Conversation:
    """Multi-turn chat about one image (LLaVA's template: `[INST] <image>\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST]`).

    The prompt of every turn is the full template with the earlier answers as text, exactly what a fresh
    request with that history would prefill; the previous turn's KV (a snapshot of its slot) is kept for the
    positions the two share (the image, the earlier questions, the answer tokens as generated), so a follow-up
    prefills only its own question and the few tokens where the re-tokenized answer differs from the generated
    ids (the template's " </s>" after the answer)."""

    def __init__(self, model: SkinVL, image: Any):
        self.model = model
        self.image = image
        self.history: list[tuple[str, str]] = []
        self._last: Snapshot | None = None
        self.notices: tuple[str, ...] = ()  # the image loader's notices, as of the latest turn
        self.request: Request | None = None  # the latest turn's request
        self._lock = threading.Lock()  # one turn at a time: each extends the previous one's cache

    def prepare(self, question: str, **kw: Any) -> Request:
        """This turn's request (history and the previous turn's KV included); run it with `run`."""
        return self.model.prepare(
            self.image, question, history=tuple(self.history), reuse=self._last, keep_snapshot=True, **kw
        )

    def stream(self, question: str, **kw: Any) -> Iterator[Response]:
        with self._lock:
            req = self.prepare(question, **kw)
            self.notices, self.request = req.notices, req
            answer, last = [], None
            for r in self.model.engine.submit(req):
                answer.append(r.text)
                last = r
                yield r
            if last is not None and last.snapshot is not None:
                self._last = last.snapshot
            self.history.append((question, "".join(answer)))  # what the user saw (cut at a stop string)

    def ask(self, question: str, **kw: Any) -> Answer:
        responses = list(self.stream(question, **kw))
        return _answer(iter(responses), self.request)
