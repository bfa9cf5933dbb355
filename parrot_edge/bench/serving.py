"""Serving benchmarks: parrot-edge against the incumbents, measured in the same run on the same GGUF.

`bench single`    one student: raw llama.cpp decode speed, parrot-edge over HTTP, llama-cpp-python's server.
`bench classroom` N students × R streamed chat requests at once: parrot-edge, llama.cpp's `llama-server -np N`
                  and llama-cpp-python's server; aggregate tok/s, time to first token p50/p95, errors, and the
                  batched ceiling (one decode call over N tokens). `--turns`: TTFT of turns 1..5.

Every server runs as its own process on a free loopback port; runs are interleaved (A B C A B C …) because
this kind of machine is noisy, and every figure printed is a median over rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from parrot_edge.bench.llama_tools import installed_tool, llama_tool
from parrot_edge.errors import ParrotEdgeError

SYSTEM = "You are a friendly teacher. Answer in the student's language, in a few sentences."
TOPICS = ["volcanoes", "the water cycle", "photosynthesis", "the moon", "fractions", "the Roman empire",
          "rainbows", "bees", "gravity", "the heart", "dinosaurs", "electricity", "clouds", "the alphabet",
          "los planetas", "las plantas", "el agua", "los números primos", "el sistema solar", "los océanos",
          "los volcanes", "la energía", "los músculos", "las estaciones del año"]
FOLLOW_UPS = ["Tell me more.", "Why is that?", "Can you give an example?", "¿Y después qué pasa?"]


def question(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (f"Explain {topic} to a ten year old. ({i})" if topic.isascii() else
            f"Explícame {topic} como si tuviera diez años. ({i})")


# -- servers ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    process: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workdir: Path, timeout: float = 180) -> None:
        self.log = workdir / f"{self.name}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ParrotEdgeError(f"{self.name} exited at start-up: {self.log.read_text()[-800:]}")
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(self.url + "/health", timeout=2)
                if health.status_code == 200 or (health.status_code == 404 and self._models_ok()):
                    return
            time.sleep(0.3)
        raise ParrotEdgeError(f"{self.name} did not become ready in {timeout:.0f} s")

    def _models_ok(self) -> bool:  # llama-cpp-python's server has no /health
        return httpx.get(self.url + "/v1/models", timeout=2).status_code == 200

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def parrot_edge_server(gguf: Path, slots: int, ctx: int, threads: int) -> Server:
    port = free_port()
    return Server("parrot-edge", [sys.executable, "-m", "parrot_edge", "serve", "--model", str(gguf), "--port",
                                  str(port), "--slots", str(slots), "--ctx", str(ctx), "--threads", str(threads)],
                  port)


def llama_cpp_python_server(gguf: Path, ctx: int, threads: int) -> Server:
    port = free_port()
    return Server("llama-cpp-python", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
                                       str(port), "--n_ctx", str(ctx), "--n_threads", str(threads),
                                       "--n_threads_batch", str(threads), "--interrupt_requests", "False",
                                       "--verbose", "False"], port)


def llama_server(gguf: Path, slots: int, ctx: int, threads: int) -> Server | None:
    binary = installed_tool("llama-server")
    if binary is None:
        return None
    port = free_port()
    return Server("llama-server", [str(binary), "-m", str(gguf), "--port", str(port), "-np", str(slots),
                                   "-c", str(slots * ctx), "-t", str(threads), "-tb", str(threads), "--no-webui"],
                  port)


# -- clients ----------------------------------------------------------------------------------------------

@dataclass
class Answer:
    ttft: float
    tokens: int
    seconds: float
    text: str
    longest_gap: float = 0.0  # the longest wait between two pieces of text, after the first
    queued: float = float("nan")  # of the time to first token, waiting for a slot (parrot-edge's timings)


def student_address(student: int) -> str:
    """The loopback address a benchmark student connects from (127.0.0.2, …): each student is its own client
    to parrot-edge's per-client limit, as each computer of a class is."""
    return f"127.0.{2 + student // 250}.{2 + student % 250}"


async def _sse_lines(url: str, path: str, body: dict, source: str | None = None) -> AsyncIterator[bytes]:
    """The lines of a streamed answer to a JSON POST, over a fresh HTTP/1.1 connection closed after it (for
    every server alike: llama-server closes kept-alive connections under load, and a client racing that close
    would count as that server's error).

    Hand-rolled on asyncio streams because the client shares the 2 cores with the server it measures:
    it costs about 40% of the CPU of httpx's `aiter_lines` (0.044-0.051 vs 0.114-0.124 s for a 256-chunk
    stream, measured), CPU that would otherwise be taken from llama.cpp's threads, whichever server runs."""
    host, _, port = url.removeprefix("http://").partition(":")
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(source, 0) if source else None)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/") else 0
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {(await reader.read(200))!r}")
        if headers.get("transfer-encoding") == "chunked":
            pending = b""
            while size := int((await reader.readline()).split(b";")[0], 16):
                *lines, pending = (pending + await reader.readexactly(size)).split(b"\n")
                await reader.readexactly(2)  # the CRLF after every chunk
                for line in lines:
                    yield line
            if pending:
                yield pending
        else:  # Content-Length or read-until-close: the same thing with Connection: close
            while line := await reader.readline():
                yield line.rstrip(b"\n")
    finally:
        writer.close()


async def stream_chat(url: str, model: str, messages: list[dict], max_tokens: int,
                      completions_prompt: str | None = None, source: str | None = None,
                      extra: dict | None = None) -> Answer:
    """One streamed request (from the loopback address `source`, if given); tokens from the usage chunk when
    the server sends one, else content chunks."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    if completions_prompt is None:
        path, body["messages"] = "/v1/chat/completions", messages
    else:
        path, body["prompt"] = "/v1/completions", completions_prompt
    start = time.perf_counter()
    first = last = None
    chunks, usage_tokens, parts, gap, queued = 0, None, [], 0.0, float("nan")
    async for line in _sse_lines(url, path, body, source):
        if not line.startswith(b"data: ") or line.rstrip() == b"data: [DONE]":
            continue
        payload = json.loads(line[6:])
        if payload.get("usage"):
            usage_tokens = payload["usage"].get("completion_tokens")
        if "queued_ms" in (payload.get("timings") or {}):
            queued = payload["timings"]["queued_ms"] / 1000
        for choice in payload.get("choices") or []:
            piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if piece:
                now = time.perf_counter()
                first = first or now
                gap = max(gap, now - (last or now))
                last = now
                chunks += 1
                parts.append(piece)
    end = time.perf_counter()
    return Answer(ttft=(first or end) - start, tokens=usage_tokens or chunks, seconds=end - start,
                  text="".join(parts), longest_gap=gap, queued=queued)


async def model_id(url: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(url + "/v1/models", timeout=10)).json()["data"][0]["id"]


@dataclass
class ClassroomRun:
    tokens: int = 0
    seconds: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    turn_ttfts: dict[int, list[float]] = field(default_factory=dict)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def classroom(server: Server, students: int, requests: int, max_tokens: int, round_: int,
                    turns: bool, extra: dict | None = None) -> ClassroomRun:
    run = ClassroomRun()
    model = await model_id(server.url)

    async def student(s: int) -> None:
        messages = [{"role": "system", "content": SYSTEM}]
        for r in range(requests):
            if turns and r:
                messages.append({"role": "user", "content": FOLLOW_UPS[(s + r) % len(FOLLOW_UPS)]})
            else:
                messages = [{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": question(round_ * 1000 + s * requests + r)}]
            try:
                answer = await stream_chat(server.url, model, messages, max_tokens, source=student_address(s),
                                           extra=extra)
            except (OSError, EOFError, ValueError, RuntimeError) as exc:
                run.errors += 1
                run.first_error = run.first_error or f"{type(exc).__name__}: {exc}"
                continue
            run.tokens += answer.tokens
            run.ttfts.append(answer.ttft)
            run.turn_ttfts.setdefault(r + 1, []).append(answer.ttft)
            messages.append({"role": "assistant", "content": answer.text})

    start = time.perf_counter()
    await asyncio.gather(*(student(s) for s in range(students)))
    run.seconds = time.perf_counter() - start
    return run


# -- raw llama.cpp ----------------------------------------------------------------------------------------

_RAW = r"""
import ctypes, json, sys, time
from pathlib import Path
from parrot_edge import llamacpp
from parrot_edge.engine.context import context_params, forces_tiled
path, n, steps, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
from parrot_edge.settings import load_settings
settings = load_settings()  # the tiled matmul as a server of n slots has it, under the same settings
allow = settings.repacked_weights == "auto"
if settings.tiled_matmul == "auto" and forces_tiled(llamacpp.repack_policy(path, allow=allow), n):
    llamacpp.force_tiled_matmul()
llama = llamacpp.lib()
model = llamacpp.load_model(path)
ctx = llama.llama_init_from_model(model, context_params(llama, slots=n, ctx_per_slot=1024, prefill_chunk=256,
                                                         threads=threads))
batch = llamacpp.Batch(max(n, 32))
def decode(runs, logits=True):  # prompt rows ask for none: the context's logits are sized for a step's 4 per slot
    batch.clear()
    for tokens, first, seq in runs:
        batch.add(tokens, first, seq, logits=logits)
    assert llama.llama_decode(ctx, batch.raw) == 0
for seq in range(n):  # a short prompt in every sequence, as students' conversations have
    for start in range(0, 32, 16):
        decode([(list(range(100 + start, 116 + start)), start, seq)], logits=False)
timings = []
for step in range(steps):
    t = time.perf_counter()
    decode([([200 + step], 32 + step, seq) for seq in range(n)])
    timings.append(time.perf_counter() - t)
print(json.dumps({"tok_per_s": n * steps / sum(timings)}))  # over the whole run, as the servers are measured
"""


def raw_decode_speed(gguf: Path, n: int, threads: int, steps: int = 64) -> float:
    """Tokens/s of llama_decode over a batch of one next token for each of n sequences (whole run)."""
    done = subprocess.run([sys.executable, "-c", _RAW, str(gguf), str(n), str(steps), str(threads)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise ParrotEdgeError(f"raw llama.cpp measurement failed: {done.stderr[-500:]}")
    return json.loads(done.stdout)["tok_per_s"]


# -- commands ---------------------------------------------------------------------------------------------

def answers_run_full_length(args, gguf: Path) -> dict:
    """Request fields that keep a random-weights model from ending its answers by chance (its end-of-text
    token banned): every server is then timed over the same number of tokens. None for a trained model."""
    if not getattr(args, "model_shape", None):
        return {}
    from parrot_edge.store.gguf_check import read_header

    eos = read_header(gguf).metadata.get("tokenizer.ggml.eos_token_id")
    return {"logit_bias": {str(eos): -100}} if eos is not None else {}


def bench_model(args) -> Path:
    """The GGUF a serving benchmark runs: --model-shape (a random checkpoint of a real size, converted to
    Q4_K_M by parrot-edge: see shapes.py), else --model (store name or path), else the default model."""
    if getattr(args, "model_shape", None):
        from parrot_edge.bench.shapes import shape_gguf

        return shape_gguf(args.model_shape)
    return _model_path(args.model)


def _model_path(name: str | None) -> Path:
    from parrot_edge.settings import load_settings
    from parrot_edge.store.model_store import ModelStore

    settings = load_settings(model=name)
    return ModelStore(settings.models_dir).resolve(settings.model).path


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _running(servers: list[Server]):
    workdir = Path(tempfile.mkdtemp(prefix="parrot-edge-bench-"))
    try:
        for server in servers:
            print(f"starting {server.name} on port {server.port}…", file=sys.stderr)
            server.start(workdir)
        yield
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def bench_single_command(args) -> int:
    gguf = bench_model(args)
    threads = _threads()
    servers = [parrot_edge_server(gguf, 1, 2048, threads), llama_cpp_python_server(gguf, 2048, threads)]
    prompt = "Once upon a time, in a small village in the mountains, there lived a curious girl who"
    extra = answers_run_full_length(args, gguf)
    results: dict[str, list[float]] = {"raw llama.cpp": []} | {server.name: [] for server in servers}
    with _running(servers):
        for round_ in range(args.rounds):
            results["raw llama.cpp"].append(raw_decode_speed(gguf, 1, threads, steps=args.tokens))
            for server in servers:
                async def one(server=server):
                    return await stream_chat(server.url, await model_id(server.url), [], args.tokens,
                                             completions_prompt=prompt, extra=extra)
                answer = asyncio.run(one())
                decode_seconds = answer.seconds - answer.ttft
                results[server.name].append((answer.tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0)
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in results.items()),
                  file=sys.stderr)
    raw = statistics.median(results["raw llama.cpp"])
    print(f"\nOne student, decode tok/s (median of {args.rounds} interleaved rounds, {args.tokens} tokens, "
          f"{gguf.name}, {threads} threads):")
    for name, values in results.items():
        speed = statistics.median(values)
        print(f"  {name:<18} {speed:7.1f} tok/s   {speed / raw:5.2f}× raw")
    return 0


def bench_classroom_command(args) -> int:
    gguf = bench_model(args)
    threads, ctx, slots = _threads(), 2048, args.slots or args.students
    if args.build_llama_server:
        llama_tool("llama-server")
    servers = [parrot_edge_server(gguf, slots, ctx, threads)]
    incumbent = llama_server(gguf, slots, ctx, threads)
    if incumbent is None:
        print("llama-server not found (PATH or the cache): skipped. Build it with --build-llama-server.",
              file=sys.stderr)
    else:
        servers.append(incumbent)
    if not args.no_llama_cpp_python:
        servers.append(llama_cpp_python_server(gguf, ctx, threads))
    extra = answers_run_full_length(args, gguf)
    runs = _classroom_rounds(servers, args, extra)
    ceilings = {"one llama_decode over a token of each student (parrot-edge's context)":
                raw_decode_speed(gguf, args.students, threads)}
    if args.build_llama_server or installed_tool("llama-batched-bench"):
        ceilings[f"llama-batched-bench -npp 64 -ntg 64 -npl {args.students}, S_TG"] = batched_bench_speed(
            gguf, args.students, threads)
    _print_classroom(runs, args, gguf, threads, ceilings)
    return 0


def _classroom_rounds(servers: list[Server], args, extra: dict) -> dict[str, list[ClassroomRun]]:
    runs: dict[str, list[ClassroomRun]] = {server.name: [] for server in servers}
    requests = 5 if args.turns else args.requests
    with _running(servers):
        for server in servers:  # warm-up: load pages, fill allocators
            asyncio.run(classroom(server, 2, 1, 8, 999, False, extra))
        for round_ in range(args.rounds):
            for server in servers:
                run = asyncio.run(classroom(server, args.students, requests, args.tokens, round_, args.turns, extra))
                runs[server.name].append(run)
                print(f"round {round_ + 1}/{args.rounds} {server.name}: {run.tok_per_s:.1f} tok/s, TTFT p95 "
                      f"{percentile(run.ttfts, 95):.2f} s, errors {run.errors}", file=sys.stderr)
    return runs


def _print_classroom(runs: dict[str, list[ClassroomRun]], args, gguf: Path, threads: int,
                     ceilings: dict[str, float]) -> None:
    def med(name: str, value) -> float:
        return statistics.median(value(run) for run in runs[name])

    speed = ClassroomRun.tok_per_s.fget
    p50, p95 = (lambda run: percentile(run.ttfts, 50)), (lambda run: percentile(run.ttfts, 95))
    mode = "5-turn conversations" if args.turns else f"{args.requests} requests each"
    print(f"\n{args.students} students × {mode}, answers ≤ {args.tokens} tokens, {gguf.name}, {threads} threads, "
          f"{args.slots or args.students} slots (median of {args.rounds} interleaved rounds)")
    print(f"  {'server':<18} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'errors':>7}")
    for name in runs:
        errors = sum(run.errors for run in runs[name])
        print(f"  {name:<18} {med(name, speed):8.1f} {med(name, p50):8.2f}s {med(name, p95):8.2f}s {errors:7d}")
        if errors:
            print(f"    first error: {next(run.first_error for run in runs[name] if run.first_error)}")
    for what, ceiling in ceilings.items():
        print(f"  ceiling, {what}: {ceiling:.1f} tok/s (parrot-edge {med('parrot-edge', speed) / ceiling:.2f}×)")
    for name in [n for n in runs if n != "parrot-edge"]:
        print(f"  parrot-edge vs {name}: {med('parrot-edge', speed) / med(name, speed):.2f}× tok/s, "
              f"TTFT p95 {med('parrot-edge', p95) / med(name, p95):.2f}×")
    if args.turns:
        print("  time to first token by turn (median over students and rounds):")
        for name in runs:
            by_turn = [statistics.median([t for run in runs[name] for t in run.turn_ttfts.get(turn, [])] or [0])
                       for turn in range(1, 6)]
            print(f"    {name:<18} " + "  ".join(f"t{i + 1} {t:.2f}s" for i, t in enumerate(by_turn))
                  + f"   turn5/turn1 {by_turn[4] / by_turn[0]:.2f}×")


def batched_bench_speed(gguf: Path, students: int, threads: int) -> float:
    """llama.cpp's own batched decode (llama-batched-bench, built once from the vendored source): S_TG, the
    tokens per second of generation with `students` sequences of 64 prompt and 64 generated tokens."""
    tool = llama_tool("llama-batched-bench")
    done = subprocess.run([str(tool), "-m", str(gguf), "-c", str(students * 256), "-b", "2048", "-ub", "512",
                           "-npp", "64", "-ntg", "64", "-npl", str(students), "-t", str(threads), "-fa", "on"],
                          capture_output=True, text=True, timeout=1800)
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") >= 9]
    values = [row for row in rows if row[1].strip().isdigit()]
    if done.returncode != 0 or not values:
        raise ParrotEdgeError(f"llama-batched-bench failed: {(done.stderr or done.stdout)[-400:]}")
    header = [cell.strip() for cell in rows[0]]
    return float(values[-1][header.index("S_TG t/s")])
