"""`parrot-edge serve`: check everything that can be checked before binding, then serve.

Order matters for a school machine: refuse an unsafe bind, a missing or corrupt model, a CPU the build
cannot run on, or a context that does not fit in memory — each with a message saying what to do —
before a single port is opened.
"""

from __future__ import annotations

import logging
import sys

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.settings import Settings, is_loopback, load_settings


def check_bind(settings: Settings) -> None:
    if not is_loopback(settings.host) and not settings.resolved_api_key():
        raise ParrotEdgeError(
            f"refusing to listen on {settings.host} without an API key: anyone on the network could use it. "
            "Set PARROT_EDGE_API_KEY (or api_key_file in the settings), or keep the default 127.0.0.1.")


def serve_command(args) -> int:
    settings = load_settings(model=args.model, host=args.host, port=args.port, ctx_per_slot=args.ctx_per_slot,
                             slots=args.slots, threads=args.threads, api_key_file=args.api_key_file)
    check_bind(settings)

    from parrot_edge.deploy.cpu_probe import probe_llama_cpp
    from parrot_edge.engine.memory import plan_memory, read_model_info
    from parrot_edge.store.model_store import ModelStore

    model = ModelStore(settings.models_dir).resolve(settings.model)
    probe = probe_llama_cpp()
    if not probe.ok:
        raise ParrotEdgeError(probe.message)
    shelf_bytes = settings.shelf_mb * 2**20
    plan = plan_memory(read_model_info(model.path), slots=settings.slots, ctx_per_slot=settings.ctx_per_slot,
                       shelf=shelf_bytes)

    import uvicorn

    from parrot_edge.api.app import create_app
    from parrot_edge.engine.scheduler import Engine

    def load_engine() -> Engine:
        return Engine(model.path, name=model.name, slots=plan.slots, ctx_per_slot=plan.ctx_per_slot,
                      threads=settings.threads, prefill_chunk=settings.prefill_chunk, queue_size=settings.queue_size,
                      shelf_bytes=shelf_bytes)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"parrot-edge: serving {model.name} on http://{settings.host}:{settings.port}/v1\n  memory plan: "
          f"{plan.summary()}", file=sys.stderr, flush=True)
    # The engine thread gives up the GIL inside every llama_decode and wants it back the moment the step
    # ends; by default it may wait 5 ms for the thread streaming answers to yield, a sixth of a step.
    sys.setswitchinterval(0.0005)
    uvicorn.run(create_app(settings, load_engine), host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0
