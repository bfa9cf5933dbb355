"""`parrot-edge bench memory`: what serving really takes, against the memory plan, and what a small machine holds.

1. The plan for a machine of `--machine-gb` (4 by default: what is left after the OS, `--os-mb`, is what
   `serve` may plan with): how many students it serves at each context, with each KV cache type.
2. A real `parrot-edge serve` of the model with `--slots` × `--ctx`, every slot's context filled by a
   prompt just short of it: its resident memory, less what the server holds without a model, against the
   plan; and all of it against model + KV cache + 150 MB.
3. What each KV cache type costs in answers: the engine's context with each, against an exact evaluation
   (F32 keys and values, no flash attention, as `verify` runs), on the default model's real weights (a
   random model's logits mean nothing), over the verification texts: max |Δlogit|, top-1 agreement, mean KL.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from parrot_edge.bench.serving import Server, _model_path, bench_model, free_port, student_address
from parrot_edge.engine.kv_cache import KV_TYPES
from parrot_edge.engine.memory import plan_memory, read_model_shape
from parrot_edge.errors import ParrotEdgeError

CONTEXTS = (1024, 2048, 4096)


def bench_memory_command(args) -> int:
    gguf = bench_model(args)
    shape = read_model_shape(gguf)
    _small_machine(shape, args)
    measured, planned = _measure_serving(gguf, shape, args)
    base = shape.file_size + round(args.slots * args.ctx * shape.kv_bytes_per_token * KV_TYPES[args.kv].scale)
    server = _server_without_model()
    print(f"\nserve {gguf.name}, {args.slots} slots × {args.ctx} tokens, {args.kv} KV cache, every context filled:")
    print(f"  resident {measured / 1e6:,.0f} MB: the server without a model {server / 1e6:,.0f} MB + "
          f"{(measured - server) / 1e6:,.0f} MB for the model and its contexts, planned {planned / 1e6:,.0f} MB "
          f"({'within' if measured - server <= planned else 'OVER'} the plan)")
    print(f"  model + KV cache {base / 1e6:,.0f} MB, so {(measured - base) / 1e6:,.0f} MB more in all "
          f"({'within' if measured - base <= 150e6 else 'over'} 150 MB)")
    if not args.no_tolerance:
        print(kv_tolerance(_model_path(None)))
    return 0


def _small_machine(shape, args) -> None:
    available = args.machine_gb * 1e9 - args.os_mb * 1e6
    print(f"A {args.machine_gb:g} GB machine ({available / 1e6:,.0f} MB left after {args.os_mb} MB for the OS), "
          f"{shape.path.name}: students served at once (the plan's most, up to 64)")
    for kv in KV_TYPES:
        row = []
        for ctx in (c for c in CONTEXTS if c <= shape.n_ctx_train):
            most = max((n for n in range(1, 65) if _fits(shape, n, ctx, available, kv)), default=0)
            row.append(f"{ctx} tokens: {most}")
        print(f"  {kv:>8} KV cache   " + ", ".join(row))


def _fits(shape, slots: int, ctx: int, available: float, kv: str) -> bool:
    try:
        plan_memory(shape, slots=slots, ctx_per_slot=ctx, available=int(available), shelf=64 * 2**20, kv_type=kv)
    except ParrotEdgeError:
        return False
    return True


def _measure_serving(gguf: Path, shape, args) -> tuple[int, int]:
    """(resident bytes with every context filled, the plan's bytes) of a real server; the KV cache type goes
    through the environment, as a deployment would set it."""
    import os
    import subprocess

    port = free_port()
    # filling 8 contexts of a 1.1B model on 2 cores takes longer than a classroom request may (request_timeout)
    env = {**os.environ, "PARROT_EDGE_KV_CACHE_TYPE": args.kv, "PARROT_EDGE_REQUEST_TIMEOUT": "3600"}
    server = Server("parrot-edge", [sys.executable, "-m", "parrot_edge", "serve", "--model", str(gguf), "--port",
                                    str(port), "--slots", str(args.slots), "--ctx", str(args.ctx)], port)
    with tempfile.TemporaryDirectory(prefix="parrot-edge-memory-") as workdir:
        server.log = Path(workdir) / "server.log"
        with open(server.log, "wb") as log:
            server.process = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(server)
            planned = _planned(server.log)
            print(f"filling {args.slots} contexts of {args.ctx} tokens (a few minutes at 1.1B)…", file=sys.stderr)
            asyncio.run(_fill(server.url, args.slots, args.ctx))
            return psutil.Process(server.process.pid).memory_info().rss, planned
        finally:
            server.stop()


def _server_without_model() -> int:
    """Resident bytes of a process holding what `serve` holds besides the model: Python, the HTTP server and
    llama.cpp's library. The plan leaves it out: `serve` plans against the memory still available once it
    runs (engine/memory.py), and a deployment leaves it in the share kept for the OS and the server."""
    import subprocess

    child = subprocess.run([sys.executable, "-c", "import uvicorn, parrot_edge.api.app, parrot_edge.llamacpp as l; "
                            "l.lib(); import psutil; print(psutil.Process().memory_info().rss)"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout.split()[-1])


def _wait_healthy(server: Server, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ParrotEdgeError(f"the server exited: {server.log.read_text()[-600:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ParrotEdgeError("the server did not become ready")


def _planned(log: Path) -> int:
    """The plan `serve` printed ("… = N MB, of …")."""
    line = next(line for line in log.read_text().splitlines() if "memory plan:" in line)
    return int(line.split(" = ")[1].split(" MB")[0].replace(",", "")) * 1_000_000


FILLER = ("and", "the", "of", "to", "in")


async def _fill(url: str, slots: int, ctx: int) -> None:
    async with httpx.AsyncClient(timeout=3600) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]

        async def one(s: int) -> None:
            # words that are one token each in SentencePiece and byte-level BPE vocabularies alike, in an order
            # of the slot's own (no two slots share more than a token, so none borrows another's cells); the
            # answer's 8 tokens end short of the context
            prompt = f"{s}: " + " ".join(FILLER[(s + i * (s + 1)) % len(FILLER)] for i in range(ctx - 128))
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=student_address(s)),
                                         timeout=3600) as own:
                response = await own.post(url + "/v1/completions", json={"model": model, "prompt": prompt,
                                                                          "max_tokens": 8, "temperature": 0})
                if response.status_code != 200:
                    raise ParrotEdgeError(f"filling slot {s} failed: {response.status_code} {response.text[:300]}")
                usage = response.json()["usage"]
                print(f"  slot {s}: {usage.get('prompt_tokens')} prompt tokens", file=sys.stderr)
        await asyncio.gather(*(one(s) for s in range(slots)))


def kv_tolerance(gguf: Path) -> str:
    """How far each KV cache type moves the model's logits from an exact evaluation, on the verification texts."""
    from parrot_edge.converters.gguf_eval import gguf_logits
    from parrot_edge.converters.verify import TEXTS, compare
    from parrot_edge.engine.context import LlamaContext

    figures, tokens = {}, None
    for kv in KV_TYPES:
        context = LlamaContext(gguf, slots=1, ctx_per_slot=512, prefill_chunk=256, kv_type=kv)
        try:
            tokens = tokens or [context.tokenize(text, add_special=True)[:256] for text in TEXTS]
            figures[kv] = [_all_logits(context, t) for t in tokens]
        finally:
            context.close()
    exact = gguf_logits(gguf, tokens)
    lines = [f"\neach KV cache type against an exact evaluation (F32 keys and values, no flash attention), "
             f"{gguf.name}, {sum(map(len, tokens))} tokens of the verification texts:"]
    for kv, logits in figures.items():
        result = compare(exact, logits, tokens)
        lines.append(f"  {kv:>8}: max |Δlogit| {result['max_abs_dlogit']:.3f}, top-1 agreement "
                     f"{result['top1_agreement']:.1%}, mean KL {result['mean_kl']:.2e}")
    return "\n".join(lines)


def _all_logits(context, tokens: list[int]):
    import numpy as np

    lib = context.lib
    lib.llama_memory_clear(context.memory, True)
    n_vocab = lib.llama_vocab_n_tokens(context.vocab)
    rows = []
    # in pieces of the rows a step may ask logits for (the context's logits buffers are sized for that)
    for start in range(0, len(tokens), context.outputs_max):
        piece = tokens[start:start + context.outputs_max]
        context.batch.clear()
        context.batch.add(piece, start, 0, logits=True)
        if context.decode() != 0:
            raise ParrotEdgeError("llama_decode failed while measuring the KV cache's tolerance")
        rows.append(np.ctypeslib.as_array(lib.llama_get_logits(context.ctx), shape=(len(piece), n_vocab)).copy())
    return np.concatenate(rows)
