"""The request engine: continuous batching of prepared requests over `parallel` KV-cache slots.

    engine = Engine(model, parallel=4, max_queue=16)
    stream = engine.submit(model.prepare(image, question, max_new_tokens=128))   # EngineBusy when full
    for r in stream: print(r.text, end="")        # or `async for r in stream` inside an event loop
    stream.cancel()                                # the row stops at the next step; its slot is reused

One scheduler thread owns the slots (runtime/slots.py). Each turn of its loop it admits ready requests into free
slots (copying the longest cached prefix of their prompt into the slot), runs ONE prefill chunk of the oldest
request still prefilling (at batch 1, `chunk_tokens` positions at most), then ONE decode step for every row that
is decoding, in one decoder run (each row at its own length). So a new request's prefill never freezes the
running streams for longer than one chunk, rows leave the moment they finish (EOS, stop string, max tokens,
context, cancel) and a waiting request takes the freed slot at once. A second thread runs the vision encoder
for queued requests, off the decode loop. Admission is bounded (a slot or a queue place), so memory does not grow
with the number of callers; slots are allocated once.

The single-request path (`SkinVL.stream`) is this engine; every request's sampler is its own seeded Generator,
so what else is in the batch never changes a seeded request's draws.
"""

from __future__ import annotations

import atexit
import collections
import threading
import weakref
import time
from dataclasses import dataclass, field

import numpy as np

from .. import names
from ..errors import BundleError, EngineBusy, EngineClosed, UsageError
from ..manifest import Attention
from .generate import FinishReason, GenerationState, Response, TokenStream
from .kernels.sampling import Sampler, make_sampler
from .kv import Snapshot
from .prompt import IMAGE_PLACEHOLDER
from .prompt_cache import PromptCache
from .request import Request
from .slots import SlotTable, slot_table

# Positions per prefill chunk. The worst gap a running stream sees while another request is admitted is one chunk
# plus one decode step; larger chunks prefill a little faster (benchmarks/concurrency.py measures both).
DEFAULT_CHUNK_TOKENS = 128


@dataclass(frozen=True)
class EngineStats:
    slots: int  # parallel requests the engine runs
    active: int  # requests holding a slot (prefilling or decoding)
    queued: int  # prepared requests waiting for a slot


class _Failure:
    """An exception raised while running a request, re-raised in the consumer's thread."""

    def __init__(self, error: BaseException):
        self.error = error


class Stream:
    """One submitted request: iterate it (sync or async) for its responses; `cancel()` to stop it early."""

    def __init__(self, request: Request, cancel: threading.Event | None = None, state: GenerationState | None = None,
                 wake=None):
        self.request = request
        self.state = state if state is not None else GenerationState()  # tokens, finish reason, snapshot
        self.cancelled = cancel if cancel is not None else threading.Event()
        self._wake_engine = wake
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._loop = None  # asyncio consumer: woken with call_soon_threadsafe
        self._wake = None
        self.done = False  # the last response (or a failure) has been queued for the consumer

    def cancel(self) -> None:
        self.cancelled.set()
        if self._wake_engine is not None:
            self._wake_engine()

    # --- producer side (engine threads) ---
    def _push(self, item) -> None:
        with self._cond:
            self._events.append(item)
            if isinstance(item, _Failure) or item.finish_reason is not None:
                self.done = True
            self._cond.notify_all()
            loop, wake = self._loop, self._wake
        if loop is not None:
            loop.call_soon_threadsafe(wake.set)

    # --- consumer side ---
    @staticmethod
    def _deliver(item) -> Response:
        if isinstance(item, _Failure):
            raise item.error
        return item

    def __iter__(self):
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

    async def _aiter(self):
        import asyncio

        with self._cond:
            self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        try:
            while True:
                with self._cond:
                    item = self._events.popleft() if self._events else None
                    if item is None:
                        self._wake.clear()
                if item is None:
                    await self._wake.wait()
                    continue
                r = self._deliver(item)
                yield r
                if r.finish_reason is not None:
                    return
        finally:
            if not self.done:
                self.cancel()

    def __aiter__(self):
        return self._aiter()


@dataclass(eq=False)
class _Row:
    """A request inside the engine."""

    stream: Stream
    sampler: Sampler
    out: TokenStream
    image_at: int  # index of the image placeholder in the prompt ids
    image_end: int  # positions up to and including the image rows
    feats: np.ndarray | None = None  # [N,H], once the vision stage ran (None when a cached prefix covers the image)
    slot: int = -1
    done: int = 0  # prompt positions in the slot
    last: int = -1  # the token to feed next
    t_prefill: float | None = None
    t_first: float | None = None
    snapshot: Snapshot | None = field(default=None, repr=False)  # what admission copied into the slot

    @property
    def req(self) -> Request:
        return self.stream.request

    @property
    def prompt_len(self) -> int:
        return self.req.prompt_tokens


class Engine:
    def __init__(self, model, parallel: int = 1, max_queue: int | None = None,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, prompt_cache: PromptCache | None = None):
        if parallel < 1:
            raise UsageError(f"parallel must be >= 1, got {parallel}")
        if chunk_tokens < 1:
            raise UsageError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.model = model
        self.parallel = parallel
        self.max_queue = 4 * parallel if max_queue is None else max_queue
        self.chunk_tokens = chunk_tokens
        picked = getattr(model.bundle, "picked", None) or {}
        dec = picked.get(names.ROLE_DECODER)
        if parallel > 1 and dec is not None and dec.attention == Attention.GQA_UNIFORM:
            raise BundleError(f"bundle {model.bundle.folder} was exported before batched decoding (its decoder takes one "
                              f"length for every row); re-export it with `skin-offline export` to serve requests in "
                              f"parallel, or run with parallel 1")
        self.slots: SlotTable = slot_table(model.bundle.decoder, parallel)
        self.prompt_cache = prompt_cache if prompt_cache is not None else PromptCache()
        self._n_img = model.manifest.model.image_tokens
        self._eos = model.manifest.tokens.eos_id
        self._cond = threading.Condition()
        self._incoming: collections.deque[_Row] = collections.deque()  # waiting for the vision stage
        self._ready: collections.deque[_Row] = collections.deque()  # waiting for a slot
        self._waiting = 0  # rows not yet in a slot (incoming, in the vision stage, ready)
        self._free = list(range(parallel))
        self._prefilling: list[_Row] = []  # in a slot, prompt not done (oldest first)
        self._decoding: dict[int, _Row] = {}  # slot -> row
        self._closed = False
        self._threads = [threading.Thread(target=self._vision_loop, name="skin-offline-vision", daemon=True),
                         threading.Thread(target=self._loop, name="skin-offline-engine", daemon=True)]
        for t in self._threads:
            t.start()
        # at interpreter exit (Ctrl-C in the CLI, a server shutting down) stop the threads before onnxruntime's own
        # teardown: a daemon thread still inside a session run then aborts the process ("terminate called ...")
        ref = weakref.ref(self)
        atexit.register(lambda: (e := ref()) is not None and e.close(cancel=True, timeout=10))

    # --- API ---
    def submit(self, request: Request, *, cancel: threading.Event | None = None,
               state: GenerationState | None = None) -> Stream:
        """Queue a prepared request; raises EngineBusy when every slot and queue place is taken."""
        stream = Stream(request, cancel, state, wake=self._notify)
        ids = request.ids
        at = ids.index(IMAGE_PLACEHOLDER)
        row = _Row(stream, make_sampler(request.sampling), TokenStream(self.model.tokenizer, self._eos, request.params.stop),
                   image_at=at, image_end=at + self._n_img)
        stream.state.positions = request.positions
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down; not accepting new requests")
            busy = len(self._prefilling) + len(self._decoding)
            if self._waiting >= self.max_queue and busy + self._waiting >= self.parallel:
                raise EngineBusy(f"all {self.parallel} slots are busy and {self._waiting} requests are waiting; "
                                 f"retry later")
            self._waiting += 1
            self._incoming.append(row)
            self._cond.notify_all()
        return stream

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(self.parallel, len(self._prefilling) + len(self._decoding), self._waiting)

    def close(self, *, cancel: bool = False, timeout: float | None = None) -> bool:
        """Stop accepting requests; with `cancel`, stop the running and waiting ones at their next step.
        Returns True when the engine's threads finished within `timeout` seconds."""
        with self._cond:
            self._closed = True
            if cancel:
                for row in (*self._incoming, *self._ready, *self._prefilling, *self._decoding.values()):
                    row.stream.cancelled.set()
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- vision stage (its own thread) ---
    def _vision_loop(self) -> None:
        while True:
            with self._cond:
                while not self._incoming and not (self._closed and self._waiting == 0):
                    self._cond.wait()
                if not self._incoming:
                    return
                row = self._incoming.popleft()
            if not row.stream.cancelled.is_set():
                try:
                    self._prepare_features(row)
                except Exception as e:  # delivered to the consumer (e.g. an onnxruntime failure)
                    with self._cond:
                        self._waiting -= 1
                    row.stream._push(_Failure(e))
                    continue
            with self._cond:
                self._ready.append(row)
                self._cond.notify_all()

    def _prepare_features(self, row: _Row) -> None:
        """Image features, unless a cached prefix already covers the image."""
        req = row.req
        extra = (req.reuse,) if req.reuse is not None else ()
        _, keep = self.prompt_cache.best(req.positions, row.image_end, extra)
        if keep == 0:
            t = time.perf_counter()
            row.feats = self.model.image_features(req.pixels, req.image_key)
            req.timings.vision_s = time.perf_counter() - t

    # --- the scheduler (its own thread) ---
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._prefilling or self._decoding or (self._ready and self._free) or self._cancels()):
                    if self._closed and self._waiting == 0:
                        return
                    self._cond.wait()
            self._reap()
            self._admit()
            if self._prefilling:
                self._prefill_chunk(self._prefilling[0])
            if self._decoding:
                self._decode_step()

    def _cancels(self) -> bool:
        return any(r.stream.cancelled.is_set() for r in self._ready)

    def _reap(self) -> None:
        """Finish cancelled rows: waiting ones at once, running ones here, between two steps."""
        with self._cond:
            waiting = [r for r in self._ready if r.stream.cancelled.is_set()]
            for r in waiting:
                self._ready.remove(r)
                self._waiting -= 1
        for r in waiting:
            self._end(r, FinishReason.CANCELLED)
        for r in [*self._prefilling, *self._decoding.values()]:
            if r.stream.cancelled.is_set():
                self._end(r, FinishReason.CANCELLED)

    def _admit(self) -> None:
        while True:
            with self._cond:
                if not (self._ready and self._free):
                    return
                row = self._ready.popleft()
                self._waiting -= 1
                slot = min(self._free)
                self._free.remove(slot)
            req = row.req
            try:
                extra = (req.reuse,) if req.reuse is not None else ()
                snap, keep = self.prompt_cache.best(req.positions, row.image_end, extra)
                row.slot = slot
                if keep:
                    self.slots.load(slot, snap, keep)
                elif row.feats is None:  # the cached prefix it was ready for was evicted meanwhile
                    row.feats = self.model.image_features(req.pixels, req.image_key)
                row.done = keep
                req.timings.prefix_cached = keep > 0
                req.timings.prefilled_tokens = req.prompt_tokens - keep
                self._prefilling.append(row)
            except Exception as e:
                self._fail([row], e)

    def _embeds(self, row: _Row, start: int, end: int) -> np.ndarray:
        """Prompt positions [start, end) -> [end-start, H]: text ids before the image, its feature rows, text after."""
        ids, at, n, embed = row.req.ids, row.image_at, self._n_img, self.model.bundle.embed
        parts = []
        if start < at:
            parts.append(embed(ids[start:min(end, at)]))
        if start < at + n and end > at:
            parts.append(row.feats[max(start, at) - at:min(end, at + n) - at])
        if end > at + n:
            parts.append(embed(ids[max(start, at + n) - n + 1:end - n + 1]))  # ids after the placeholder
        return np.concatenate(parts)

    def _prefill_chunk(self, row: _Row) -> None:
        start, total = row.done, row.prompt_len
        end = min(total, start + self.chunk_tokens)
        positions = row.req.positions
        store_image = self.prompt_cache.max_entries > 0 and start < row.image_end < total \
            and not self.prompt_cache.covers(positions[:row.image_end])
        if store_image and end > row.image_end:
            end = row.image_end  # a chunk boundary where the image ends, to keep "[INST] " + image for later questions
        if row.t_prefill is None:
            row.t_prefill = time.perf_counter()
        try:
            logits = self.slots.prefill(row.slot, self._embeds(row, start, end)[None])  # [V]
            row.done = end
            if store_image and end == row.image_end:
                self.prompt_cache.put(self.slots.snapshot(row.slot, positions[:end]))
        except Exception as e:
            self._fail([row], e)
            return
        if end == total:
            self._prefilling.remove(row)
            row.req.timings.prefill_s = time.perf_counter() - row.t_prefill
            if self._emit(row, logits):
                self._decoding[row.slot] = row

    def _decode_step(self) -> None:
        rows = sorted(self._decoding.values(), key=lambda r: r.slot)
        try:
            embeds = self.model.bundle.embed([r.last for r in rows])[:, None]  # [B,1,H]
            logits = self.slots.decode([r.slot for r in rows], embeds)  # [B,V]
        except Exception as e:
            self._fail(rows, e)
            return
        for r, lg in zip(rows, logits):
            if not self._emit(r, lg):
                self._decoding.pop(r.slot, None)

    def _emit(self, row: _Row, logits: np.ndarray) -> bool:
        """Sample the next token from [V] logits and stream it; False when the row has finished."""
        token = row.sampler(logits)
        state, timings = row.stream.state, row.req.timings
        state.tokens.append(token)
        now = time.perf_counter()
        if row.t_first is None:
            row.t_first = now
            timings.ttft_s = now - row.req.t_start
        timings.new_tokens += 1
        timings.decode_s = now - row.t_first
        row.last = token
        delta = row.out.add(token)
        finish = row.out.finish
        if finish is None and len(state.tokens) >= row.req.max_new_tokens:
            finish, delta = FinishReason.LENGTH, delta + row.out.flush()
        if finish is not None:
            self._end(row, finish, delta)
            return False
        if delta:
            row.stream._push(Response(delta, token))
        return True

    def _release(self, row: _Row) -> None:
        """Keep what the row's slot holds (prompt + the answer tokens fed back) for later requests, free the slot."""
        if row.slot < 0:
            return
        n = self.slots.length(row.slot)
        positions = (list(row.req.positions) + row.stream.state.tokens)[:n]
        if n and (self.prompt_cache.max_entries > 0 or row.req.keep_snapshot):
            snap = self.slots.snapshot(row.slot, positions)
            self.prompt_cache.put(snap)
            row.stream.state.snapshot = snap
        self.slots.release(row.slot)
        if row in self._prefilling:
            self._prefilling.remove(row)
        self._decoding.pop(row.slot, None)
        with self._cond:
            self._free.append(row.slot)
            self._cond.notify_all()
        row.slot = -1

    def _end(self, row: _Row, reason: FinishReason, delta: str = "") -> None:
        row.stream.state.finish_reason = reason
        try:
            self._release(row)
        finally:
            row.stream._push(Response(delta, None, reason, row.req.timings))

    def _fail(self, rows: list[_Row], error: BaseException) -> None:
        for row in rows:
            try:
                self.slots.release(row.slot) if row.slot >= 0 else None
            finally:
                if row in self._prefilling:
                    self._prefilling.remove(row)
                if row.slot >= 0:
                    self._decoding.pop(row.slot, None)
                    with self._cond:
                        self._free.append(row.slot)
                row.slot = -1
                row.stream._push(_Failure(error))
