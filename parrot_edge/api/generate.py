"""One request through the engine, and every way that can end: answered whole or streamed, refused, timed
out in the queue (503), left by its client (queued or streaming: dropped at once), or the engine stuck.

Every wait is bounded: the engine ends a request at its deadline, and the event loop gives up on the engine
GRACE seconds later, so a wedged worker cannot hang a client (or the kiosk) forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from parrot_edge.api.errors import ApiError, busy
from parrot_edge.api.fairness import LEFT, client_address
from parrot_edge.engine.requests import Delta, Finished, Generation, PromptTooLong, QueueFull
from parrot_edge.engine.requests import Request as EngineRequest
from parrot_edge.engine.sampling import SamplingParams
from parrot_edge.engine.scheduler import Engine

GRACE = 30.0  # seconds past a request's deadline before the event loop calls the engine stuck


class EngineStuck(Exception):
    pass


@dataclass
class Job:
    """A request as the routes prepared it."""

    tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    chat: bool

    @property
    def endpoint(self) -> str:
        return "chat" if self.chat else "completions"


async def generate(runtime, engine: Engine, request: Request, job: Job):
    """The response to a prepared request (see app.py for the routes that prepare it)."""
    client = client_address(request.scope)
    generation = _submit(runtime, engine, job, client)
    if not await _left_queue(engine, generation, request):
        _client_left(runtime, job, client)
        return JSONResponse({}, status_code=499)
    if not generation.admitted:  # it ended in the queue (timed out, or the server is stopping)
        finished = generation.events.get_nowait()
        _record(runtime, job, finished)
        _raise_for_failure(finished)
    if job.stream:
        chunks = _stream(runtime, engine, generation, job)
        first = await anext(chunks)  # started: from here on its own `finally` cancels it if it is left
        return StreamingResponse(_prepend(first, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _whole(runtime, engine, generation, request, job)


def _submit(runtime, engine: Engine, job: Job, client: str) -> Generation:
    settings = runtime.settings
    try:
        return engine.submit(EngineRequest(prompt=job.tokens, sampling=job.sampling, max_tokens=job.max_tokens,
                                           stop=job.stop, deadline=time.monotonic() + settings.request_timeout,
                                           client=client, standing=runtime.clients.standing(client)))
    except PromptTooLong as exc:
        runtime.metrics.record_request(job.endpoint, "prompt_too_long")
        raise ApiError(400, str(exc), code="context_length_exceeded", param="messages" if job.chat else "prompt",
                       prompt_tokens=exc.prompt_tokens, context_limit=exc.limit) from None
    except QueueFull as exc:
        runtime.metrics.record_request(job.endpoint, "queue_full")
        raise busy(str(exc), exc.retry_after, "queue_full") from None


def _client_left(runtime, job: Job, client: str) -> None:
    """A client gone before its answer ended: counted, and a point against its standing (fairness.py)."""
    runtime.metrics.record_request(job.endpoint, "disconnected")
    runtime.clients.misbehaved(client, LEFT)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _left_queue(engine: Engine, generation: Generation, request: Request) -> bool:
    """Wait until the request leaves the queue (True) or its client leaves first (False: dropped from it)."""
    if generation.admitted_event.is_set():
        return True
    left_queue = asyncio.ensure_future(generation.admitted_event.wait())
    client_left = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({left_queue, client_left}, timeout=_bound(generation),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        left_queue.cancel()
        client_left.cancel()
    if left_queue in done:
        return True
    engine.cancel(generation)
    if client_left in done:
        return False
    raise _stuck()


def _bound(generation: Generation) -> float:
    return max(1.0, generation.request.deadline + GRACE - time.monotonic())


def _stuck() -> ApiError:
    return ApiError(503, "the model server stopped responding; it is being restarted, retry shortly",
                    type="server_error", code="engine_stuck", headers={"Retry-After": "10"})


async def _next_event(generation: Generation) -> Delta | Finished:
    try:
        return await asyncio.wait_for(generation.events.get(), timeout=_bound(generation))
    except TimeoutError:
        raise EngineStuck from None


async def _whole(runtime, engine: Engine, generation: Generation, request: Request, job: Job):
    watcher = asyncio.ensure_future(_disconnected(request))
    parts: list[str] = []
    try:
        while True:
            getter = asyncio.ensure_future(_next_event(generation))
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                engine.cancel(generation)  # the client left: free the slot within a token
                _client_left(runtime, job, generation.request.client)
                return JSONResponse({}, status_code=499)
            try:
                event = getter.result()
            except EngineStuck:
                engine.cancel(generation)
                raise _stuck() from None
            if isinstance(event, Finished):
                break
            parts.append(event.text)
    finally:
        watcher.cancel()
    _record(runtime, job, event)
    _raise_for_failure(event)
    return _answer(engine, job, event, "".join(parts))


def _answer(engine: Engine, job: Job, finished: Finished, text: str) -> dict:
    reason = _finish_reason(finished)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": reason} if job.chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    return {**_envelope(engine, job, chunk=False), "choices": [choice], "usage": _usage(finished),
            "timings": _timings(finished)}


def _envelope(engine: Engine, job: Job, *, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else "text_completion"
    return {"id": ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24], "object": kind,
            "created": int(time.time()), "model": engine.info.name}


async def _stream(runtime, engine: Engine, generation: Generation, job: Job) -> AsyncIterator[str]:
    envelope = _envelope(engine, job, chunk=True)

    def chunk(text: str | None, finish_reason: str | None = None, **extra) -> str:
        if job.chat:
            choice = {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _sse({**envelope, "choices": [choice], **extra})

    finished, left_by = None, "disconnected"
    try:
        yield _sse({**envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}) if job.chat else ""
        while not isinstance(event := await _next_event(generation), Finished):
            if event.text:
                yield chunk(event.text)
        finished = event
        _record(runtime, job, finished)
        if finished.reason == "error":
            yield _sse({"error": {"message": f"generation failed: {finished.error}", "type": "server_error"}})
        else:
            yield chunk(None, _finish_reason(finished), timings=_timings(finished))
            if job.include_usage:
                yield _sse({**envelope, "choices": [], "usage": _usage(finished)})
        yield _sse("[DONE]")
    except EngineStuck:
        left_by = "engine_stuck"
        yield _sse({"error": {"message": _stuck().body["error"]["message"], "type": "server_error",
                              "code": "engine_stuck"}})
    finally:
        if finished is None:  # the client went away mid-stream, or the engine is stuck: stop generating for it
            engine.cancel(generation)
            if left_by == "disconnected":
                _client_left(runtime, job, generation.request.client)
            else:
                runtime.metrics.record_request(job.endpoint, left_by)


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    if first:
        yield first
    try:
        async for item in rest:
            yield item
    finally:
        with contextlib.suppress(RuntimeError):  # already closed
            await rest.aclose()


def _record(runtime, job: Job, finished: Finished) -> None:
    outcome = {"stop": "ok", "length": "ok"}.get(finished.reason, finished.reason)
    runtime.metrics.record_request(job.endpoint, outcome)
    runtime.metrics.record_generation(finished)


def _raise_for_failure(finished: Finished) -> None:
    if finished.reason == "error":
        raise ApiError(500, f"generation failed: {finished.error}", type="server_error", code="generation_failed")
    if finished.reason == "timeout" and finished.completion_tokens == 0:
        raise busy("timed out before the first token (waiting for a free slot, or reading a long prompt on a busy "
                   "server); retry shortly", 5, "timeout")


def _timings(finished: Finished) -> dict:
    evaluated = finished.prompt_tokens - finished.cached_tokens
    return {"prompt_n": evaluated, "cache_n": finished.cached_tokens, "prompt_ms": round(finished.prompt_ms, 2),
            "queued_ms": round(finished.queued_ms, 2),
            "predicted_n": finished.completion_tokens, "predicted_ms": round(finished.decode_ms, 2),
            "predicted_per_second": round(finished.decode_tokens_per_second, 2)}


def _usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_tokens}}


def _finish_reason(finished: Finished) -> str:
    return "length" if finished.reason in ("length", "timeout") else "stop"


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
