"""`parrot-edge serve`: the checks before binding (parrot_edge.deploy.preflight), then the HTTP server."""

from __future__ import annotations

import logging
import sys

from parrot_edge.settings import load_settings


def serve_command(args) -> int:
    from parrot_edge.deploy.preflight import preflight

    settings = load_settings(model=args.model, host=args.host, port=args.port, ctx_per_slot=args.ctx_per_slot,
                             slots=args.slots, threads=args.threads, api_key_file=args.api_key_file)
    ready = preflight(settings)
    model, plan = ready.model, ready.plan

    import uvicorn

    from parrot_edge.api.app import create_app
    from parrot_edge.engine.scheduler import Engine

    def load_engine() -> Engine:
        return Engine(model.path, name=model.name, slots=plan.slots, ctx_per_slot=plan.ctx_per_slot,
                      threads=settings.threads, prefill_chunk=settings.prefill_chunk, queue_size=settings.queue_size,
                      shelf_bytes=ready.shelf_bytes, kv_type=settings.kv_cache_type,
                      repack=settings.repacked_weights == "auto", tiled=settings.tiled_matmul == "auto")

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"parrot-edge: serving {model.name} on http://{settings.host}:{settings.port}/v1\n  memory plan: "
          f"{plan.summary()}", file=sys.stderr, flush=True)
    # The engine thread gives up the GIL inside every llama_decode and wants it back the moment the step
    # ends; by default it may wait 5 ms for the thread streaming answers to yield, a sixth of a step.
    sys.setswitchinterval(0.0005)
    uvicorn.run(create_app(settings, load_engine), host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0
