"""The request engine: every prepared request, whatever its decoding mode, advanced by one scheduler over KV rows.

    engine = Engine.for_bundle(bundle, tokenizer, vision, parallel=4)
    stream = engine.submit(request)                # EngineBusy when every slot and queue place is taken
    for r in stream: print(r.text, end="")         # or `async for r in stream` inside an event loop
    stream.cancel()                                # the request stops at the next step; its rows are reused

A request holds the KV rows its mode needs (runtime/decoding.py): one for greedy or sampled answers, `num_beams`
for beam search (runtime/beam.py), one per label of a wave for label scoring (runtime/classify.py). Each turn of the
scheduler thread's loop it admits waiting requests (oldest first, once `parallel` allows another request and enough
rows are free; a prompt-cache hit is copied into the first row), runs ONE prefill chunk of the oldest request still
prefilling (at batch 1, `chunk_tokens` positions at most), then ONE decoder run for every decoding row of every
request, each row at its own length. The rows' logits go back to their requests' modes, which choose the next
tokens; a beam reorder or a new scoring wave is a copy between the request's own rows. So a new request's prefill
never freezes running streams for longer than one chunk, requests leave the moment they finish (EOS, stop string,
max tokens, context, cancel) and a waiting one takes the freed rows at once. A second thread runs the vision stage
for queued requests, off the decode loop. Capacity has one owner: requests in flight are bounded by `parallel` plus
`max_queue` waiting places (a server reserves a place before it reads a body: `reserve()`), so memory does not
grow with the number of callers; rows are allocated once.

Every request's sampler is its own seeded Generator, so what else is in the batch never changes a seeded request's
draws.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Union

import numpy as np

from ..errors import EngineBusy, EngineClosed, UsageError
from .beam import BeamConfig, BeamSearch
from .classify import LabelScoring
from .decoding import Decoding, Sampling, Step
from .kv import Snapshot
from .prompt import EmbedFn
from .prompt_cache import PromptCache
from .request import Request, Scoring
from .response import FinishReason, Response, TokenLogprob
from .slots import SlotTable, slot_table
from .tokenizer import TextTokenizer
from .vision import VisionStage

# Positions per prefill chunk. The worst gap a running stream sees while another request is admitted is one chunk
# plus one decode step; larger chunks prefill a little faster (benchmarks/concurrency.py measures both).
DEFAULT_CHUNK_TOKENS = 128
# KV rows per parallel request: the paper's 5 beams (eval --protocol paper), so `parallel` such requests run at once
# (rows are np.empty: a row never used costs address space, not memory). A label-scoring wave takes up to its
# request's `rows` (8 by default) of them.
ROWS_PER_REQUEST = 5


@dataclass(frozen=True)
class EngineStats:
    slots: int  # requests the engine runs in parallel
    active: int  # requests holding rows (prefilling or decoding)
    queued: int  # requests admitted to the queue, not yet holding rows (incl. reserved places)


class _Failure:
    """An exception raised while running a request, re-raised in the consumer's thread."""

    def __init__(self, error: BaseException):
        self.error = error


_Item = Union[Response, _Failure]


class Stream:
    """One submitted request: iterate it (sync or async) for its responses; `cancel()` to stop it early."""

    def __init__(self, request: Request, cancel: threading.Event | None = None, wake: Callable[[], None] | None = None):
        self.request = request
        self.cancelled = cancel if cancel is not None else threading.Event()
        self._wake_engine = wake
        self._events: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._loop: Any = None  # asyncio consumer: woken with call_soon_threadsafe
        self._wake: Any = None
        self._on_done: list[Callable[[Response | None, BaseException | None], None]] = []
        self.done = False  # the last response (or a failure) has been queued for the consumer
        self._final: _Item | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        if self._wake_engine is not None:
            self._wake_engine()

    def on_done(self, callback: Callable[[Response | None, BaseException | None], None]) -> None:
        """Call `callback(last response, None)` or `(None, error)` once the request ends, in the engine's thread
        (at once if it already has) -- whether or not anyone still reads the stream."""
        with self._cond:
            if not self.done:
                self._on_done.append(callback)
                return
            last = self._final
        callback(*((None, last.error) if isinstance(last, _Failure) else (last, None)))

    # --- producer side (engine threads) ---
    def _push(self, item: _Item) -> None:
        with self._cond:
            self._events.append(item)
            final = isinstance(item, _Failure) or item.finish_reason is not None
            if final:
                self.done, self._final = True, item
            callbacks, self._on_done = (self._on_done, []) if final else ([], self._on_done)
            self._cond.notify_all()
            loop, wake = self._loop, self._wake
        for cb in callbacks:
            cb(*((None, item.error) if isinstance(item, _Failure) else (item, None)))
        if loop is not None:
            loop.call_soon_threadsafe(wake.set)

    # --- consumer side ---
    @staticmethod
    def _deliver(item: _Item) -> Response:
        if isinstance(item, _Failure):
            raise item.error
        return item

    def __iter__(self) -> Iterator[Response]:
        try:
            while True:
                with self._cond:
                    while not self._events:
                        self._cond.wait()
                    item = self._events.popleft()
                r = self._deliver(item)
                yield r
                if r.finish_reason is not None:
                    return
        finally:  # a consumer that stops early (closed generator) cancels the request
            if not self.done:
                self.cancel()

    async def batch(self, timeout: float | None = None) -> list[Response] | None:
        """Every response available now (waiting for the first), or None after `timeout` seconds without one.
        A failure is raised once the responses before it were returned."""
        import asyncio

        with self._cond:
            if self._loop is None:
                self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._cond:
                out: list[Response] = []
                while self._events and isinstance(head := self._events[0], Response):
                    self._events.popleft()
                    out.append(head)
                if out:
                    return out
                if self._events:
                    raise self._events.popleft().error  # type: ignore[union-attr]
                self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                return None

    async def _aiter(self) -> AsyncIterator[Response]:
        try:
            while True:
                for r in await self.batch() or ():
                    yield r
                    if r.finish_reason is not None:
                        return
        finally:
            if not self.done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[Response]:
        return self._aiter()


class Reservation:
    """A queue place held before its request is prepared (a server reserves one before reading the body)."""

    def __init__(self, engine: "Engine"):
        self._engine: Engine | None = engine

    def release(self) -> None:
        """Give the place back (no request will use it); a no-op once used or released."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine._unreserve()

    def _use(self) -> None:
        if self._engine is None:
            raise UsageError("this reservation was already used or released; reserve another")
        self._engine = None


@dataclass(eq=False)
class _Job:
    """A request inside the engine."""

    stream: Stream
    decoding: Decoding
    snap: Snapshot | None = None  # the prompt-cache entry (or earlier turn) its prompt starts from
    keep: int = 0  # positions of `snap` it reuses (0: prefill from scratch)
    feats: np.ndarray | None = field(
        default=None, repr=False
    )  # [N,H] once the vision stage ran (None when keep covers it)
    slots: list[int] = field(default_factory=list)  # its KV rows; the prompt is prefilled into the first
    done: int = 0  # prompt positions in the first row
    forked: int = 1  # its first rows that hold the prompt (copied from the first once its prefill is done)
    feed: tuple[int, ...] = ()  # tokens its rows feed at the next decoder run
    t_prefill: float | None = None
    t_first: float | None = None

    @property
    def req(self) -> Request:
        return self.stream.request


def spare_core(session: Any) -> bool:
    """Whether this process has a core beyond the decoder session's intra-op threads. Why it matters: onnxruntime's
    intra-op threads spin while they wait for work, so a mask computed in a worker thread on a machine without a
    spare core preempts one of them and the whole decoder run waits. Measured (2 cores, 2 threads, bench preset int4,
    clinic-form schema, 1 stream): constrained decode 0.86x unconstrained with worker masks, 1.00x with each mask
    computed just before sampling (~0.2 ms a token)."""
    try:
        threads = session.get_session_options().intra_op_num_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    except (AttributeError, RuntimeError):  # a stand-in session (tests) or a provider without options
        return True
    return 0 < threads < cores  # 0: onnxruntime starts one per core, none spare


class Engine:
    def __init__(
        self,
        slots: SlotTable,
        vision: VisionStage,
        embed: EmbedFn,
        tokenizer: TextTokenizer,
        eos_id: int,
        *,
        parallel: int = 1,
        max_queue: int | None = None,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        prompt_cache: PromptCache | None = None,
        masks_in_worker: bool = True,
    ):
        """`slots` (slots.slot_table) holds every KV row; `parallel` requests hold rows at once. `masks_in_worker`:
        constraint masks are computed in a worker thread while the decoder runs (else just before sampling)."""
        if parallel < 1:
            raise UsageError(f"parallel must be >= 1, got {parallel}")
        if chunk_tokens < 1:
            raise UsageError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.slots, self.vision, self.embed, self.tokenizer, self.eos_id = slots, vision, embed, tokenizer, eos_id
        self.parallel = parallel
        self.max_queue = 4 * parallel if max_queue is None else max_queue
        self.chunk_tokens = chunk_tokens
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self.masks_in_worker = masks_in_worker
        self._cond = threading.Condition()
        self._incoming: collections.deque[_Job] = collections.deque()  # waiting for the vision stage
        self._ready: collections.deque[_Job] = collections.deque()  # waiting for rows
        self._in_vision = 0  # taken from _incoming, not yet in _ready
        self._waiting = 0  # queue places taken: reserved, incoming, in the vision stage, ready
        self._free = list(range(slots.n))
        self._prefilling: list[_Job] = []  # holding rows, prompt not done (oldest first)
        self._decoding: list[_Job] = []  # holding rows, decoding (admission order)
        self._closed = False
        self._threads = [
            threading.Thread(target=self._vision_loop, name="skin-offline-vision", daemon=True),
            threading.Thread(target=self._loop, name="skin-offline-engine", daemon=True),
        ]
        for t in self._threads:
            t.start()
        # at interpreter exit (Ctrl-C in the CLI, a server shutting down) stop the threads before onnxruntime's own
        # teardown: a daemon thread still inside a session run then aborts the process ("terminate called ...")
        ref = weakref.ref(self)
        atexit.register(lambda: (e := ref()) is not None and e.close(cancel=True, timeout=10))

    @classmethod
    def for_bundle(
        cls,
        bundle: Any,
        tokenizer: TextTokenizer,
        vision: VisionStage,
        *,
        parallel: int = 1,
        rows_per_request: int = ROWS_PER_REQUEST,
        **kw: Any,
    ) -> "Engine":
        """An engine over a loaded bundle's decoder (runtime/bundle.py), with `parallel x rows_per_request` rows."""
        bundle.check_parallel(parallel)
        kw.setdefault("masks_in_worker", spare_core(bundle.decoder.session))
        return cls(
            slot_table(bundle.decoder, parallel * rows_per_request),
            vision,
            bundle.embed,
            tokenizer,
            bundle.manifest.tokens.eos_id,
            parallel=parallel,
            **kw,
        )

    # --- API ---
    def reserve(self) -> Reservation:
        """A queue place for a request still to be prepared; raises EngineBusy when every place is taken."""
        with self._cond:
            self._take_place()
        return Reservation(self)

    def submit(
        self, request: Request, *, cancel: threading.Event | None = None, reservation: Reservation | None = None
    ) -> Stream:
        """Queue a prepared request; raises EngineBusy when every slot and queue place is taken (unless it holds a
        `reservation`)."""
        decoding = self._decoding_for(request)
        if decoding.rows > self.slots.n:
            if reservation is not None:
                reservation.release()
            raise UsageError(
                f"this request needs {decoding.rows} KV rows (one per beam or label); the engine has "
                f"{self.slots.n}: use fewer beams or load the model with a larger `parallel`"
            )
        stream = Stream(request, cancel, wake=self._notify)
        job = _Job(stream, decoding)
        with self._cond:
            if self._closed:
                if reservation is not None:
                    reservation._use()
                    self._waiting -= 1
                raise EngineClosed("the engine is shutting down; not accepting new requests")
            if reservation is not None:
                reservation._use()  # its place becomes this request's
            else:
                self._take_place()
            self._incoming.append(job)
            self._cond.notify_all()
        return stream

    @property
    def capacity(self) -> int:
        """Requests in flight at most (running + waiting); past it submit and reserve raise EngineBusy."""
        return self.parallel + self.max_queue

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(self.parallel, len(self._prefilling) + len(self._decoding), self._waiting)

    def close(self, *, cancel: bool = False, timeout: float | None = None) -> bool:
        """Stop accepting requests; with `cancel`, stop the running and waiting ones at their next step.
        Returns True when the engine's threads finished within `timeout` seconds."""
        with self._cond:
            self._closed = True
            if cancel:
                for job in (*self._incoming, *self._ready, *self._prefilling, *self._decoding):
                    job.stream.cancelled.set()
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _take_place(self) -> None:
        """Count one more waiting request, or raise EngineBusy (with the condition held)."""
        if self._closed:
            raise EngineClosed("the engine is shutting down; not accepting new requests")
        busy = len(self._prefilling) + len(self._decoding)
        if self._waiting >= self.max_queue and busy + self._waiting >= self.parallel:
            raise EngineBusy(
                f"all {self.parallel} slots are busy and {self._waiting} requests are waiting; retry later"
            )
        self._waiting += 1

    def _unreserve(self) -> None:
        with self._cond:
            self._waiting -= 1
            self._cond.notify_all()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _decoding_for(self, req: Request) -> Decoding:
        mode = req.mode
        if isinstance(mode, BeamConfig):
            return BeamSearch(mode, self.eos_id, self.tokenizer, req.matcher)
        if isinstance(mode, Scoring):
            return LabelScoring([list(x) for x in mode.labels_ids], min(mode.rows, self.slots.n))
        return Sampling(
            mode.sampling, req.max_new_tokens, self.tokenizer, self.eos_id, mode.stop, req.matcher, mode.logprobs
        )

    # --- vision stage (its own thread) ---
    def _vision_loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not self._closed:
                    self._cond.wait()
                if not self._incoming:
                    return
                job = self._incoming.popleft()
                self._in_vision += 1
            if not job.stream.cancelled.is_set():
                try:
                    self._prepare_prompt(job)
                except Exception as e:  # delivered to the consumer (e.g. an onnxruntime failure)
                    with self._cond:
                        self._waiting -= 1
                        self._in_vision -= 1
                        self._cond.notify_all()
                    job.stream._push(_Failure(e))
                    continue
            with self._cond:
                self._ready.append(job)
                self._in_vision -= 1
                self._cond.notify_all()

    def _prepare_prompt(self, job: _Job) -> None:
        """The longest cached prefix of the prompt (looked up once), and the image features unless it covers them."""
        req = job.req
        extra = (req.reuse,) if req.reuse is not None else ()
        job.snap, job.keep = self.prompt_cache.best(req.positions, req.prompt.image_end, extra)
        if job.keep == 0:
            t = time.perf_counter()
            job.feats = self.vision.features(req.pixels, req.image_key)
            req.timings.vision_s = time.perf_counter() - t

    # --- the scheduler (its own thread) ---
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._prefilling or self._decoding or self._admissible() or self._cancels()):
                    if self._closed and not (self._incoming or self._in_vision or self._ready):
                        return
                    self._cond.wait()
            self._reap()
            self._admit()
            if self._prefilling:
                self._prefill_chunk(self._prefilling[0])
            if self._decoding:
                self._decode_step()

    def _admissible(self) -> bool:
        """The oldest ready request can take rows now (oldest first: a big request is not starved by small ones)."""
        if not self._ready or len(self._prefilling) + len(self._decoding) >= self.parallel:
            return False
        return len(self._free) >= self._ready[0].decoding.rows

    def _cancels(self) -> bool:
        return any(j.stream.cancelled.is_set() for j in self._ready)

    def _reap(self) -> None:
        """Finish cancelled requests: waiting ones at once, running ones here, between two steps."""
        with self._cond:
            waiting = [j for j in self._ready if j.stream.cancelled.is_set()]
            for j in waiting:
                self._ready.remove(j)
                self._waiting -= 1
        for j in waiting:
            self._end(j, FinishReason.CANCELLED)
        for j in [*self._prefilling, *self._decoding]:
            if j.stream.cancelled.is_set():
                self._end(j, FinishReason.CANCELLED)

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not self._admissible():
                    return
                job = self._ready.popleft()
                self._waiting -= 1
                self._free.sort()
                job.slots, self._free = self._free[: job.decoding.rows], self._free[job.decoding.rows :]
            req = job.req
            try:
                if job.keep:
                    assert job.snap is not None
                    self.slots.load(job.slots[0], job.snap, job.keep)
                job.done = job.keep
                req.timings.prefix_cached = job.keep > 0
                req.timings.prefilled_tokens = req.prompt_tokens - job.keep
                job.snap = None  # the slot holds its part now
                self._prefilling.append(job)
            except Exception as e:
                self._fail([job], e)

    def _prefill_chunk(self, job: _Job) -> None:
        req = job.req
        start, total, image_end = job.done, req.prompt_tokens, req.prompt.image_end
        end = min(total, start + self.chunk_tokens)
        store_image = (
            self.prompt_cache.max_entries > 0
            and start < image_end < total
            and not self.prompt_cache.covers(req.positions[:image_end])
        )
        if store_image and end > image_end:
            end = image_end  # a chunk boundary where the image ends, to keep "[INST] " + image for later questions
        if job.t_prefill is None:
            job.t_prefill = time.perf_counter()
        try:
            logits = self.slots.prefill(job.slots[0], req.prompt.embeds(self.embed, job.feats, start, end)[None])  # [V]
            job.done = end
            if store_image and end == image_end:
                self.prompt_cache.put(self.slots.snapshot(job.slots[0], req.positions[:end]))
        except Exception as e:
            self._fail([job], e)
            return
        if end == total:
            self._prefilling.remove(job)
            req.timings.prefill_s = time.perf_counter() - job.t_prefill
            job.feats = None
            self._advance(job, job.decoding.start, logits)

    def _decode_step(self) -> None:
        jobs = list(self._decoding)
        rows = [s for j in jobs for s in j.slots[: len(j.feed)]]
        try:
            embeds = self.embed([t for j in jobs for t in j.feed])[:, None]  # [B,1,H]
            logits = self.slots.decode(rows, embeds)  # [B,V]
        except Exception as e:
            self._fail(jobs, e)
            return
        at = 0
        for j in jobs:
            n = len(j.feed)
            self._advance(j, j.decoding.step, logits[at : at + n])
            at += n

    def _advance(self, job: _Job, decide: Callable[[np.ndarray], Step], logits: np.ndarray) -> None:
        """Let the request's mode choose from its rows' logits, then stream, end, or arrange its rows for the next run."""
        try:
            step = decide(logits)
            timings = job.req.timings
            now = time.perf_counter()
            if job.t_first is None:
                job.t_first = now
                timings.ttft_s = now - job.req.t_start
            timings.decode_s = now - job.t_first
            if step.token is not None:
                timings.new_tokens += 1
            if step.finish is not None:
                if job in self._decoding:
                    self._decoding.remove(job)
                self._end(job, step.finish, step.delta, step.logprobs)
                return
            self._arrange(job, step)
            job.feed = step.feed
            if self.masks_in_worker:
                job.decoding.prefetch()  # e.g. constraint masks, computed while the decoder runs
        except Exception as e:
            self._fail([job], e)
            return
        if job not in self._decoding:
            self._decoding.append(job)
        if step.delta or step.logprobs:
            job.stream._push(Response(step.delta, step.token, logprobs=step.logprobs))

    def _arrange(self, job: _Job, step: Step) -> None:
        """Rows for the next run: every row at the prompt (beams forked, a new scoring wave), or a gather (a beam
        reorder), before feeding. Rows that hold the prompt already are only rewound, and a gather copies the answer
        positions only: every row of a request holds the same prompt."""
        rows, n, p = job.slots, len(step.feed), job.req.prompt_tokens
        if step.restart:
            held = min(n, job.forked)
            for r in rows[:held]:
                self.slots.truncate(r, p)
            if n > held:
                self.slots.copy(rows[held:n], [rows[0]] * (n - held), p)
            job.forked = max(job.forked, n)
        elif step.parents is not None:
            moved = [(rows[j], rows[q]) for j, q in enumerate(step.parents) if q != j]
            if moved:
                self.slots.copy([d for d, _ in moved], [s for _, s in moved], self.slots.length(moved[0][1]), start=p)

    def _release(self, job: _Job) -> Snapshot | None:
        """Keep what the first row holds (prompt + the answer tokens fed back) for later requests, free the rows;
        the snapshot when the request asked for it."""
        if not job.slots:
            return None
        snap = None
        first, fed = job.slots[0], job.decoding.outcome().first_row
        n = min(self.slots.length(first), job.req.prompt_tokens + len(fed))
        if n and (self.prompt_cache.max_entries > 0 or job.req.keep_snapshot):
            snap = self.slots.snapshot(first, (list(job.req.positions) + list(fed))[:n])
            self.prompt_cache.put(snap)
        self._free_rows(job)
        return snap if job.req.keep_snapshot else None

    def _free_rows(self, job: _Job) -> None:
        for s in job.slots:
            self.slots.release(s)
        if job in self._prefilling:
            self._prefilling.remove(job)
        if job in self._decoding:
            self._decoding.remove(job)
        with self._cond:
            self._free.extend(job.slots)
            self._cond.notify_all()
        job.slots = []

    def _end(self, job: _Job, reason: FinishReason, delta: str = "", logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        snap = None
        try:
            snap = self._release(job)
        finally:
            out = job.decoding.outcome()
            if out.tokens:
                job.req.timings.new_tokens = len(out.tokens)
            job.stream._push(
                Response(delta, None, reason, job.req.timings, out.tokens, snap, out.label_logprobs, logprobs)
            )

    def _fail(self, jobs: list[_Job], error: BaseException) -> None:
        for job in jobs:
            try:
                self._free_rows(job)
            finally:
                job.stream._push(_Failure(error))
