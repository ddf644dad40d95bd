"""One chat completion through the engine: engine responses -> a JSON body or Server-Sent Events.

The response side reads the engine's stream directly (responses that queued up while the loop was busy go out in
one SSE write). The log line and metrics come from the stream's end (`Stream.on_done`, whether or not the client is
still there): when the client leaves, the response side only calls `abandon()` (which cancels the row), and the end
still says how many tokens the row made after the disconnect and how long it took to stop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Literal, Sequence

from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive

from ..errors import SkinOfflineError
from ..runtime.engine import Stream
from ..runtime.response import FinishReason, Timings, TokenLogprob
from ..runtime.response import Response as EngineResponse
from . import schemas as S
from .errors import SERVER, APIError, from_exception

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def generation_kwargs(req: S.ChatCompletionRequest, default_max_tokens: int) -> dict[str, Any]:
    """Request fields -> SkinVL.prepare keywords. Greedy unless `temperature` > 0 (as `ask`, unlike OpenAI's
    default of 1). Without max_tokens the answer may use all the context left (OpenAI's and llama.cpp's
    behaviour); an explicit max_tokens that does not fit is a 400 with both numbers."""
    limit = req.token_limit
    constraint = req.constraint()
    return dict(
        max_new_tokens=default_max_tokens if limit is None else limit,
        strict_context=limit is not None,
        temperature=0.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=req.stop_list,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        constraint=constraint[0] if constraint else None,
        constraint_field=constraint[1] if constraint else "constraint",
    )


def _timings(t: Timings) -> S.Timings:
    return S.Timings(
        ttft_s=round(t.ttft_s, 6),
        prefill_s=round(t.prefill_s, 6),
        decode_tokens_per_s=round(t.decode_tokens_per_s, 3),
        prompt_tokens=t.prompt_tokens,
        prefilled_tokens=t.prefilled_tokens,
        new_tokens=t.new_tokens,
    )


def _usage(t: Timings) -> S.Usage:
    return S.Usage(
        prompt_tokens=t.prompt_tokens, completion_tokens=t.new_tokens, total_tokens=t.prompt_tokens + t.new_tokens
    )


def _finish(r: EngineResponse) -> Literal["stop", "length"]:
    """OpenAI's finish_reason of a last response that was not cancelled."""
    return "length" if r.finish_reason is FinishReason.LENGTH else "stop"


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _shutdown_error() -> APIError:
    return APIError(
        503,
        "the server shut down before the answer was complete; retry",
        SERVER,
        None,
        "server_shutting_down",
        {"retry-after": "1"},
    )


class Completion:
    def __init__(self, state: Any, stream: Stream, record: Any, req: S.ChatCompletionRequest, report: Any = None):
        self.state, self.stream, self.record, self.req = state, stream, record, req
        self.report = report  # sr.server.ReportRequest when the request asked for `dicom_sr`
        notices = stream.request.notices
        self.notices = list(notices) or None  # e.g. "text burned into the pixels": for the client, not the log
        self.id = "chatcmpl-" + record.id.removeprefix("req-")
        self.created = int(time.time())
        self.model_id = state.model_id
        self.final: EngineResponse | None = None  # the engine's last Response
        self.cancelled_at: tuple[float, int] | None = None  # (time, tokens generated) when the client left
        record.pending += 1  # the log line waits for the row too
        record.fields.update(stream=int(req.stream))
        if stream.request.matcher is not None:  # its kind only: a schema can carry patient-identifying values
            record.fields["constraint"] = stream.request.matcher.kind
        if notices:
            record.fields["notices"] = len(notices)
        state.live.add(self)  # shutdown cancels what is still here
        loop = asyncio.get_running_loop()

        def ended(last: EngineResponse | None, error: BaseException | None) -> None:  # in the engine's thread
            try:
                loop.call_soon_threadsafe(self._finish, last)
            except RuntimeError:  # the event loop is gone (the server stopped): nothing left to log to
                pass

        stream.on_done(ended)

    # --- engine side ---
    def abandon(self) -> None:
        """The client left: cancel the row (it stops within one engine step) and note when."""
        if self.final is None and self.cancelled_at is None:
            # Request.timings.new_tokens counts the row's tokens as they are generated
            self.cancelled_at = (time.perf_counter(), self.stream.request.timings.new_tokens)
            self.stream.cancel()

    def _finish(self, r: EngineResponse | None) -> None:
        rec, m = self.record, self.state.metrics
        self.final = r
        try:
            if r is not None and r.timings is not None and r.finish_reason is not None:
                t = r.timings
                rec.fields.update(
                    prompt_tokens=t.prompt_tokens,
                    completion_tokens=t.new_tokens,
                    ttft=f"{t.ttft_s:.3f}s",
                    tok_s=f"{t.decode_tokens_per_s:.1f}",
                )
                m.prompt_tokens.inc(t.prompt_tokens)
                m.completion_tokens.inc(t.new_tokens)
                if t.new_tokens:
                    m.ttft.observe(t.ttft_s)
                if t.new_tokens > 1:
                    m.decode_rate.observe(t.decode_tokens_per_s)
                reason = "client_left" if self.cancelled_at is not None else r.finish_reason.value
                rec.fields["finish"] = reason
                m.finished.labels(reason).inc()
                if self.cancelled_at is not None:
                    t0, n0 = self.cancelled_at
                    after = max(0, t.new_tokens - n0)
                    rec.fields.update(tokens_after_cancel=after, stop_ms=f"{(time.perf_counter() - t0) * 1e3:.1f}")
                    m.cancel_tokens.observe(after)
            else:
                rec.fields["finish"] = "error"
        finally:
            self.state.live.discard(self)
            rec.done()

    # --- response side ---
    def _error(self, e: Exception) -> APIError:
        if isinstance(e, SkinOfflineError):
            return from_exception(e)
        return APIError(500, f"internal error ({self.record.id}): {type(e).__name__}", SERVER, None, "internal_error")

    async def _batch(self, timeout: float | None = None) -> list[EngineResponse] | None:
        try:
            return await self.stream.batch(timeout)
        except Exception as e:  # the row failed in the engine: one error shape
            raise self._error(e) from None

    async def _collect(self) -> tuple[str, list[TokenLogprob], EngineResponse]:
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        while True:
            for r in await self._batch() or ():
                parts.append(r.text)
                logprobs += r.logprobs
                if r.finish_reason is not None:
                    return "".join(parts), logprobs, r

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> S.ChoiceLogprobs | None:
        if not self.req.logprobs:
            return None
        from ..runtime.response import logprob_content

        content = [S.TokenLogprob.model_validate(e) for e in logprob_content(self.state.model.tokenizer, entries)]
        return S.ChoiceLogprobs(content=content)

    async def json_response(self, receive: Receive) -> Response:
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        getter = asyncio.ensure_future(self._collect())
        try:
            done, _ = await asyncio.wait({watcher, getter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if getter not in done:  # the client left before the answer was ready
            self.abandon()
            getter.cancel()
            return Response(status_code=499)
        text, logprobs, r = getter.result()  # raises APIError on a failed row
        if r.finish_reason == FinishReason.CANCELLED:
            raise _shutdown_error()
        assert r.timings is not None  # the last response carries them
        body = S.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model_id,
            usage=_usage(r.timings),
            timings=_timings(r.timings),
            choices=[
                S.Choice(
                    message=S.AssistantOut(content=text), finish_reason=_finish(r), logprobs=self._logprobs(logprobs)
                )
            ],
            warnings=self.notices,
            dicom_sr=await self._report(text, r) if self.report else None,
        )
        absent = {k for k in ("warnings", "dicom_sr") if getattr(body, k) is None}
        return JSONResponse(body.model_dump(mode="json", exclude=absent or None))

    async def _report(self, text: str, r: EngineResponse) -> str:
        """`dicom_sr`: this conversation as a DICOM SR (skin_offline/sr/server.py), base64."""
        from ..runtime.constraints import structured_value
        from ..sr import server as sr

        structured = structured_value(self.stream.request.matcher, text, r.finish_reason)
        return await asyncio.to_thread(
            sr.report_base64, self.report, self.state.model, text, r.finish_reason, structured
        )

    def sse_response(self) -> StreamingResponse:
        return StreamingResponse(self._events(), media_type="text/event-stream", headers=SSE_HEADERS)

    def _chunk(
        self,
        delta: S.Delta | None,
        finish: Literal["stop", "length"] | None = None,
        usage: S.Usage | None = None,
        timings: S.Timings | None = None,
        warnings: list[str] | None = None,
        logprobs: S.ChoiceLogprobs | None = None,
    ) -> bytes:
        chunk = S.ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model_id,
            choices=[] if delta is None else [S.ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)],
            usage=usage,
            timings=timings,
            warnings=warnings,
        )
        exclude = set() if self.req.include_usage else {"usage"}
        if timings is None:
            exclude.add("timings")
        if warnings is None:
            exclude.add("warnings")
        return _sse(chunk.model_dump(mode="json", exclude=exclude))

    def _render(self, item: EngineResponse) -> tuple[bytes, bool]:
        """One engine response -> its SSE bytes, and whether the stream is over."""
        lp = self._logprobs(item.logprobs) if item.logprobs else None
        out = [self._chunk(S.Delta(content=item.text), logprobs=lp)] if item.text or lp else []
        if item.finish_reason is None:
            return b"".join(out), False
        if item.finish_reason == FinishReason.CANCELLED:  # the server is shutting down
            return b"".join([*out, _sse(_shutdown_error().body())]), True
        assert item.timings is not None  # the last response carries them
        out.append(self._chunk(S.Delta(), finish=_finish(item), timings=_timings(item.timings)))
        if self.req.include_usage:
            out.append(self._chunk(None, usage=_usage(item.timings)))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out), True

    async def _events(self) -> AsyncIterator[bytes]:
        delivered = False
        try:
            yield self._chunk(S.Delta(role="assistant", content=""), warnings=self.notices)
            while not delivered:
                try:
                    items = await self._batch(self.state.config.keepalive_s)
                except APIError as e:
                    yield _sse(e.body())
                    delivered = True
                    break
                if items is None:  # SSE comment: clients ignore it; it keeps proxies and idle timers from closing us
                    yield b": keep-alive\n\n"
                    continue
                out = []
                for item in items:
                    piece, delivered = self._render(item)
                    out.append(piece)
                    if delivered:
                        break
                if any(out):
                    yield b"".join(out)
        finally:  # a disconnect cancels this generator (Starlette listens for http.disconnect)
            if not delivered:
                self.abandon()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
