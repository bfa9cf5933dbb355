"""The HTTP API: OpenAI-compatible routes over the engine, plus /health and /metrics.

The model loads in the background so /health can answer 503 "loading" at once; everything else waits
for it. Every error is an OpenAI-style `{"error": {...}}` body with a 4xx/5xx status that says what to do.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from parrot_edge import __version__
from parrot_edge.api.chat_template import DEFAULT_CHAT_TEMPLATE, DEFAULT_STOP, TemplateError, render_chat
from parrot_edge.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from parrot_edge.api.metrics import Metrics
from parrot_edge.api.schemas import ChatCompletionBody, CompletionBody
from parrot_edge.engine.requests import Finished, PromptTooLong, QueueFull
from parrot_edge.engine.requests import Request as EngineRequest
from parrot_edge.engine.scheduler import Engine
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.settings import Settings


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "code": code, "param": param, **extra}}


class RequireApiKey:
    """Every route but /health needs `Authorization: Bearer <key>`. Plain ASGI, so streamed answers pass
    through untouched (Starlette's `@app.middleware` would copy every chunk through an extra task)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                response = _error_response(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                                    "<key>'", type="authentication_error", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)


class Runtime:
    """What the routes share: the engine once loaded, or why it is not there."""

    def __init__(self, settings: Settings, load_engine: Callable[[], Engine]):
        self.settings = settings
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.engine.state() if self.engine else None)
        self.started = time.time()
        self._load_engine = load_engine

    def start_loading(self) -> None:
        def load():
            try:
                self.engine = self._load_engine()
            except ParrotEdgeError as exc:
                self.load_error = str(exc)
            except Exception as exc:  # surfaced through /health, never a silent hang
                self.load_error = f"{type(exc).__name__}: {exc}"
        threading.Thread(target=load, name="parrot-edge-loader", daemon=True).start()

    def ready_engine(self) -> Engine:
        if self.engine is not None:
            return self.engine
        if self.load_error:
            raise ApiError(503, f"the model failed to load: {self.load_error}", type="server_error",
                           code="model_load_failed")
        raise ApiError(503, "the model is still loading; retry shortly", type="server_error", code="loading",
                       headers={"Retry-After": "2"})

    def check_model(self, engine: Engine, requested: str) -> None:
        if requested not in (engine.info.name, engine.info.path.name):
            raise ApiError(404, f"model '{requested}' is not served here; this server serves '{engine.info.name}'",
                           code="model_not_found", param="model")


def create_app(settings: Settings, load_engine: Callable[[], Engine]) -> FastAPI:
    runtime = Runtime(settings, load_engine)
    api_key = settings.resolved_api_key()

    async def lifespan(app: FastAPI):
        runtime.start_loading()
        yield
        if runtime.engine is not None:
            runtime.engine.close()

    app = FastAPI(title="parrot-edge", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(error["type"] == "json_invalid" for error in errors):
            detail = next(error for error in errors if error["type"] == "json_invalid").get("ctx", {}).get("error", "")
            return _error_response(ApiError(400, f"the request body is not valid JSON ({detail})", code="invalid_json"))
        problems = []
        for error in errors:
            where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
            problems.append(f"{where}: {error['msg']}")
        param = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else None
        return _error_response(ApiError(400, "invalid request: " + "; ".join(problems), param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException):
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=None))

    @app.get("/health")
    async def health():
        if runtime.engine is None:
            status = "error" if runtime.load_error else "loading"
            return JSONResponse({"status": status, "error": runtime.load_error}, status_code=503)
        state = runtime.engine.state()
        return {"status": "ok", "model": runtime.engine.info.name,
                "slots": {"total": state.slots_total, "busy": state.slots_busy, "context_per_slot": state.ctx_per_slot},
                "queue": {"depth": state.queue_depth, "size": state.queue_size}}

    @app.get("/metrics")
    async def metrics():
        return Response(runtime.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        engine = runtime.ready_engine()
        info = engine.info
        return {"object": "list", "data": [{
            "id": info.name, "object": "model", "created": int(runtime.started), "owned_by": "parrot-edge",
            "meta": {"file": info.path.name, "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab,
                     "context_per_slot": engine.ctx_per_slot, "slots": engine.slots_total},
        }]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request):
        engine = runtime.ready_engine()
        runtime.check_model(engine, body.model)
        info = engine.info
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt_text = render_chat(info.chat_template, messages, bos_token=info.bos_text, eos_token=info.eos_text)
        except TemplateError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        tokens = engine.tokenize(prompt_text, add_special=False, parse_special=True)
        if info.add_bos and info.bos_id >= 0 and (not tokens or tokens[0] != info.bos_id):
            tokens.insert(0, info.bos_id)
        stop = body.stop_strings()
        if info.chat_template in (None, DEFAULT_CHAT_TEMPLATE):
            stop += DEFAULT_STOP
        return await _generate(runtime, engine, request, body, tokens, stop, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        engine = runtime.ready_engine()
        runtime.check_model(engine, body.model)
        tokens = engine.tokenize(body.prompt, add_special=True, parse_special=True)
        return await _generate(runtime, engine, request, body, tokens, body.stop_strings(), chat=False)

    return app


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


async def _watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _generate(runtime: Runtime, engine: Engine, request: Request, body, tokens: list[int],
                    stop: tuple[str, ...], *, chat: bool):
    endpoint = "chat" if chat else "completions"
    settings = runtime.settings
    max_tokens = body.max_tokens or settings.default_max_tokens
    engine_request = EngineRequest(prompt=tokens, sampling=body.sampling(), max_tokens=max_tokens, stop=stop,
                                   deadline=time.monotonic() + settings.request_timeout)
    try:
        generation = engine.submit(engine_request)
    except PromptTooLong as exc:
        runtime.metrics.record_request(endpoint, "prompt_too_long")
        raise ApiError(400, str(exc), code="context_length_exceeded", param="messages" if chat else "prompt",
                       prompt_tokens=exc.prompt_tokens, context_limit=exc.limit) from None
    except QueueFull as exc:
        runtime.metrics.record_request(endpoint, "queue_full")
        raise ApiError(503, str(exc), type="server_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None

    completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = engine.info.name

    def record(finished: Finished) -> None:
        outcome = {"stop": "ok", "length": "ok"}.get(finished.reason, finished.reason)
        runtime.metrics.record_request(endpoint, outcome)
        runtime.metrics.record_generation(finished)

    if body.stream:
        stream = _stream(engine, generation, body, completion_id, created, model, chat, record,
                         on_disconnect=lambda: runtime.metrics.record_request(endpoint, "disconnected"))
        return StreamingResponse(stream,
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    watcher = asyncio.ensure_future(_watch_disconnect(request))
    parts: list[str] = []
    try:
        while True:
            getter = asyncio.ensure_future(generation.events.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                engine.cancel(generation)  # the client left: free the slot within a token
                runtime.metrics.record_request(endpoint, "disconnected")
                return JSONResponse({}, status_code=499)
            event = getter.result()
            if isinstance(event, Finished):
                break
            parts.append(event.text)
    finally:
        watcher.cancel()
    finished = event
    record(finished)
    _raise_for_failure(finished)
    text = "".join(parts)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": _finish_reason(finished)} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(finished)})
    return {"id": completion_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": _usage(finished), "timings": _timings(finished)}


def _raise_for_failure(finished: Finished) -> None:
    if finished.reason == "error":
        raise ApiError(500, f"generation failed: {finished.error}", type="server_error", code="generation_failed")
    if finished.reason == "timeout" and finished.completion_tokens == 0:
        raise ApiError(503, "timed out waiting for a free slot; retry shortly", type="server_error",
                       code="timeout", headers={"Retry-After": "5"})


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, generation, body, completion_id: str, created: int, model: str, chat: bool,
                  record, on_disconnect) -> AsyncIterator[str]:
    envelope = {"id": completion_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model}

    def chunk(text: str | None, finish_reason: str | None = None, **extra) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _sse({**envelope, "choices": [choice], **extra})

    finished = None
    try:
        if chat:
            yield _sse({**envelope, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        while not isinstance(event := await generation.events.get(), Finished):
            if event.text:
                yield chunk(event.text)
        finished = event
        record(finished)
        if finished.reason == "error":
            yield _sse({"error": {"message": f"generation failed: {finished.error}", "type": "server_error"}})
        else:
            yield chunk(None, _finish_reason(finished), timings=_timings(finished))
            if body.include_usage:
                yield _sse({**envelope, "choices": [], "usage": _usage(finished)})
        yield _sse("[DONE]")
    finally:
        if finished is None:  # the client went away mid-stream: stop generating for it now
            engine.cancel(generation)
            on_disconnect()
