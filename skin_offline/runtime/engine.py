"""The request engine: a bounded queue of prepared requests and `parallel` slots that run them.

    engine = Engine(model, parallel=4, max_queue=16)
    stream = engine.submit(model.prepare(image, question, max_new_tokens=128))   # EngineBusy when full
    for r in stream: print(r.text, end="")        # or `async for r in stream` inside an event loop
    stream.cancel()                                # the row stops at the next step; its slot is reused

Admission is bounded (a slot or a queue place), so memory does not grow with the number of callers.
A `Stream` delivers the same `Response` objects as `SkinVL.stream`, from the engine's thread to any consumer
thread or asyncio loop.

This version runs each slot's request on the single-request path in its own worker thread (the API that the
server is built on); continuous batching (one decoder run per step for every active slot) replaces the
workers behind the same API.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass

from ..errors import EngineBusy, EngineClosed
from .generate import FinishReason, GenerationState, Response
from .request import Request


@dataclass(frozen=True)
class EngineStats:
    slots: int  # parallel requests the engine runs
    active: int  # requests running now
    queued: int  # prepared requests waiting for a slot


class _Failure:
    """An exception raised while running a request, re-raised in the consumer's thread."""

    def __init__(self, error: BaseException):
        self.error = error


class Stream:
    """One submitted request: iterate it (sync or async) for its responses; `cancel()` to stop it early."""

    def __init__(self, request: Request):
        self.request = request
        self.state = GenerationState()  # tokens and finish reason once it ends
        self.cancelled = threading.Event()
        self._events: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._loop = None  # asyncio consumer: woken with call_soon_threadsafe
        self._wake = None
        self.done = False  # the last response (or a failure) has been delivered to the queue

    def cancel(self) -> None:
        self.cancelled.set()

    # --- producer side (engine thread) ---
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


class Engine:
    def __init__(self, model, parallel: int = 1, max_queue: int | None = None):
        if parallel < 1:
            from ..errors import UsageError

            raise UsageError(f"parallel must be >= 1, got {parallel}")
        self.model = model
        self.parallel = parallel
        self.max_queue = 4 * parallel if max_queue is None else max_queue
        self._waiting: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0
        self._active = 0
        self._running: set[Stream] = set()
        self._closed = False
        self._workers = [threading.Thread(target=self._work, name=f"skin-offline-slot-{i}", daemon=True)
                         for i in range(parallel)]
        for w in self._workers:
            w.start()

    def submit(self, request: Request) -> Stream:
        """Queue a prepared request; raises EngineBusy when every slot and queue place is taken."""
        stream = Stream(request)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is shutting down; not accepting new requests")
            if self._queued >= self.max_queue and self._active + self._queued >= self.parallel:
                raise EngineBusy(f"all {self.parallel} slots are busy and {self._queued} requests are waiting; retry later")
            self._queued += 1
        self._waiting.put(stream)
        return stream

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(self.parallel, self._active, self._queued)

    def close(self, *, cancel: bool = False, timeout: float | None = None) -> bool:
        """Stop accepting requests; with `cancel`, stop the running and waiting ones at their next step.
        Returns True when every worker finished within `timeout` seconds."""
        with self._lock:
            self._closed = True
        if cancel:
            with self._lock:
                doomed = [*self._running, *(s for s in list(self._waiting.queue) if s is not None)]
            for s in doomed:
                s.cancel()
        for _ in self._workers:
            self._waiting.put(None)  # after the queued requests: they still run (or end cancelled)
        ok = True
        for w in self._workers:
            w.join(timeout)
            ok &= not w.is_alive()
        return ok

    def _work(self) -> None:
        while True:
            stream = self._waiting.get()
            if stream is None:
                return
            with self._lock:
                self._queued -= 1
                self._active += 1
                self._running.add(stream)
            try:
                if stream.cancelled.is_set():
                    stream._push(Response("", None, FinishReason.CANCELLED, stream.request.timings))
                    continue
                for r in self.model.run(stream.request, cancel=stream.cancelled, state=stream.state):
                    stream._push(r)
            except BaseException as e:  # delivered to the consumer, never lost in this thread
                stream._push(_Failure(e))
            finally:
                with self._lock:
                    self._active -= 1
                    self._running.discard(stream)
