"""The HTTP API: OpenAI-compatible routes over the engine, plus /health and /metrics.

The model loads in the background so /health can answer 503 "loading" at once; everything else waits
for it. A request passes the guards (Host, size, key: guards.py), is validated (schemas.py), becomes
prompt tokens off the event loop (prompt.py) and runs through the engine (generate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from parrot_edge import __version__
from parrot_edge.api import watchdog
from parrot_edge.api.chat_template import DEFAULT_CHAT_TEMPLATE, DEFAULT_STOP, TemplateError
from parrot_edge.api.errors import ApiError, install_handlers
from parrot_edge.api.fairness import ClientLimit, client_address
from parrot_edge.api.generate import Job, generate
from parrot_edge.api.guards import Guard, allowed_host_names
from parrot_edge.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from parrot_edge.api.metrics import Metrics
from parrot_edge.api.prompt import PromptBuilder, PromptRefused
from parrot_edge.api.schemas import ChatCompletionBody, CompletionBody
from parrot_edge.engine.scheduler import Engine
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.settings import Settings


class Runtime:
    """What the routes share: the engine once loaded (or why it is not there), metrics, the client limit."""

    def __init__(self, settings: Settings, load_engine: Callable[[], Engine]):
        self.settings = settings
        self.engine: Engine | None = None
        self.prompts: PromptBuilder | None = None
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.engine.state() if self.engine else None)
        self.clients = ClientLimit(settings.max_requests_per_client)
        self.started = time.time()
        # Prompts are rendered and tokenised in threads of low priority: on a 2-core machine a client's huge
        # conversation must take CPU from no one but the idle time left by llama.cpp's decode threads.
        self.prompt_pool = ThreadPoolExecutor(2, thread_name_prefix="parrot-edge-prompt", initializer=_lower_priority)
        self.on_loaded: Callable[[], None] = lambda: None
        self._load_engine = load_engine

    def start_loading(self) -> None:
        def load():
            try:
                engine = self._load_engine()
                self.prompts = PromptBuilder(engine)
                self.engine = engine
                self.on_loaded()
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

    def retry_after(self) -> int:
        return self.engine.retry_after() if self.engine else 2

    def health(self) -> tuple[int, dict]:
        """(status, body) of /health: 503 while loading, when loading failed, or when the worker is stuck."""
        if self.engine is None:
            return 503, {"status": "error" if self.load_error else "loading", "error": self.load_error}
        state = self.engine.state()
        stuck = not state.worker_alive or state.stalled_seconds > self.settings.stall_seconds
        body = {"status": "stuck" if stuck else "ok", "model": self.engine.info.name,
                "slots": {"total": state.slots_total, "busy": state.slots_busy, "context_per_slot": state.ctx_per_slot},
                "queue": {"depth": state.queue_depth, "size": state.queue_size},
                "worker": {"alive": state.worker_alive, "stalled_seconds": round(state.stalled_seconds, 1)}}
        return (503 if stuck else 200), body


def create_app(settings: Settings, load_engine: Callable[[], Engine]) -> FastAPI:
    runtime = Runtime(settings, load_engine)

    async def lifespan(app: FastAPI):
        runtime.on_loaded = lambda: watchdog.notify("READY=1")
        runtime.start_loading()
        interval = watchdog.ping_interval()
        pinger = asyncio.create_task(watchdog.keep_alive(runtime, interval)) if interval else None
        yield
        if pinger is not None:
            pinger.cancel()
        runtime.prompt_pool.shutdown(wait=False, cancel_futures=True)
        if runtime.engine is not None:
            runtime.engine.close()

    app = FastAPI(title="parrot-edge", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, allowed_hosts=allowed_host_names(settings.allowed_hosts, settings.host),
                       max_body=settings.max_request_bytes, api_key=settings.resolved_api_key(),
                       clients=runtime.clients, retry_after=runtime.retry_after,
                       record=runtime.metrics.record_request)
    install_handlers(app)
    _routes(app, runtime)
    return app


def _routes(app: FastAPI, runtime: Runtime) -> None:
    settings = runtime.settings

    @app.get("/health")
    async def health():
        status, body = runtime.health()
        return JSONResponse(body, status_code=status)

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
        engine = _engine_for(runtime, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if len(messages) > settings.max_messages:
            raise ApiError(400, f"{len(messages)} messages; at most {settings.max_messages}", param="messages",
                           code="too_many_messages")
        _check_length(sum(len(m["content"]) for m in messages), settings, "messages")
        template = engine.info.chat_template
        tokens, forged = await _off_loop(runtime, _chat_prompt, runtime.prompts, template, messages)
        if forged:
            runtime.clients.misbehaved(client_address(request.scope))  # a try at forging a turn: see fairness.py
        stop = body.stop_strings() + (DEFAULT_STOP if template in (None, DEFAULT_CHAT_TEMPLATE) else ())
        return await generate(runtime, engine, request, _job(engine, body, tokens, stop, settings, chat=True))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        engine = _engine_for(runtime, body.model)
        _check_length(len(body.prompt), settings, "prompt")
        tokens = await _off_loop(runtime, runtime.prompts.completion, body.prompt)
        return await generate(runtime, engine, request,
                              _job(engine, body, tokens, body.stop_strings(), settings, chat=False))


def _engine_for(runtime: Runtime, requested: str) -> Engine:
    engine = runtime.ready_engine()
    if requested not in (engine.info.name, engine.info.path.name):
        raise ApiError(404, f"model '{requested}' is not served here; this server serves '{engine.info.name}'",
                       code="model_not_found", param="model")
    return engine


def _check_length(characters: int, settings: Settings, param: str) -> None:
    if characters > settings.max_prompt_chars:
        raise ApiError(400, f"{characters:,} characters of text; this server takes at most "
                            f"{settings.max_prompt_chars:,} in one request", param=param, code="prompt_too_large")


def _lower_priority() -> None:
    with contextlib.suppress(OSError):  # a sandbox may forbid it: then the thread runs as everyone else
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _chat_prompt(prompts: PromptBuilder, template: str | None, messages: list[dict]) -> tuple[list[int], bool]:
    """A chat's prompt tokens, and whether its new message holds a control token's text (a try at forging a
    turn): both searches of the text, off the event loop."""
    return prompts.chat(template, messages), bool(messages) and prompts.holds_control_text(messages[-1]["content"])


async def _off_loop(runtime: Runtime, build, *args):
    """Render and tokenise in a worker thread: a long conversation must not pause everyone's stream."""
    try:
        return await asyncio.get_running_loop().run_in_executor(runtime.prompt_pool, build, *args)
    except (TemplateError, PromptRefused) as exc:
        raise ApiError(400, str(exc), param="messages") from None


def _job(engine: Engine, body, tokens: list[int], stop: tuple[str, ...], settings: Settings, *, chat: bool) -> Job:
    try:
        sampling = body.sampling(engine.info.n_vocab)
        if sampling.grammar is not None:
            engine.check_grammar(sampling.grammar)
    except (ValueError, ParrotEdgeError) as exc:
        raise ApiError(400, str(exc), param="logit_bias" if "logit_bias" in str(exc) else "response_format") from None
    return Job(tokens=tokens, sampling=sampling, max_tokens=body.max_tokens or settings.default_max_tokens,
               stop=stop, stream=body.stream, include_usage=body.include_usage, chat=chat)
