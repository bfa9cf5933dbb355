"""The continuous-batching engine: one llama.cpp context serving a whole classroom at once.

The context holds `slots` sequences, each with its own `ctx_per_slot` KV cells. A single worker thread
owns it and loops over steps; each step puts into one `llama_batch`, ordered by sequence,

  * the next token of every sequence that is generating, and
  * up to `prefill_chunk` prompt tokens of sequences still reading their prompt (oldest first, at most
    62 of each),

then calls `llama_decode` once and samples every sequence that produced logits with its own native
sampler chain. A long prompt therefore delays the others' streaming by at most one chunk per step.

A slot keeps the tokens it has evaluated after its request ends. A new request goes to the free slot
sharing the longest prefix with its prompt, and only the rest of the prompt is evaluated: a student's
next turn, which re-sends the whole conversation, costs only the new message. Before a slot's
conversation is overwritten it is put aside in RAM ("the shelf", a bounded LRU of llama.cpp sequence
states); a request that continues a shelved conversation better than any slot gets it copied back, so a
class with more students than slots still pays only for new messages. And a prompt that begins like
another slot's conversation (every student's chat starts with the same system prompt) borrows those
cells: a copy of the other sequence's state, cut to the shared part, waiting a step or two if the other
slot is still evaluating it. A burst of students costs one system prompt, not one each.

Exactness. llama.cpp's CPU flash attention computes every query row on its own, so a token's logits and
K/V come out bit-identical whatever batch, chunk or company it is evaluated in, except on two faster
kernels that round differently: a tiled one for 64 or more rows of one sequence in a micro-batch, and a
split one for a micro-batch of a single row over more than 256 cells. At most 63 rows of a sequence per
step rule out the first; for the second the engine predicts llama.cpp's split of its batch into micro-batches
(`lone_long_rows`) and joins any sequence that would be such a lone row to the others through an idle
neighbour slot (whose last cached token is evaluated again), or else gives it a second row: a guess of its
next token, looked up in its own conversation (kept if the first row's logits sample it, which then yields two
tokens in one step), or its own last cached token, evaluated again. (K- and i-quant weights have two more
such kernels, kept off by parrot_edge.llamacpp.) So an answer is the same alone or in a full classroom, and
the cache a slot keeps is bit-identical to a cold evaluation of the same conversation: reusing it never
changes an answer.

Requests wait in arrival order when every slot is busy; the queue is bounded (QueueFull → HTTP 503).
Results travel to the asyncio side as events on a per-request asyncio.Queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parrot_edge import llamacpp
from parrot_edge.engine.memory import MAX_SLOTS, SEQ_ROWS, UBATCH_ROWS
from parrot_edge.engine.sampling import SamplingParams, build_chain
from parrot_edge.engine.textstream import TextStream
from parrot_edge.errors import ParrotEdgeError

log = logging.getLogger("parrot_edge.engine.scheduler")


class QueueFull(ParrotEdgeError):
    def __init__(self, retry_after: int):
        super().__init__("every slot is busy and the queue is full; retry shortly")
        self.retry_after = retry_after


class PromptTooLong(ParrotEdgeError):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens but the context holds {limit} per request; "
                         "shorten the conversation")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


@dataclass
class Request:
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    deadline: float = float("inf")  # time.monotonic() by which the request must be finished


@dataclass
class Delta:
    """Text the client may now see (may be empty when a token completed no character)."""

    text: str


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "timeout" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens not evaluated: kept in the slot, unshelved or borrowed
    queued_ms: float
    prompt_ms: float  # admission → first token
    decode_ms: float  # first token → end
    error: str | None = None

    @property
    def decode_tokens_per_second(self) -> float:
        if self.completion_tokens < 2 or not self.decode_ms:
            return 0.0
        return (self.completion_tokens - 1) / (self.decode_ms / 1000)


class Generation:
    """A request in the engine; the asyncio side reads `events` and may `cancel()` at any time."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.id = next(self._ids)
        self.request = request
        self.events: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        self._loop = loop
        self.cancelled = False
        self.submitted = time.monotonic()
        self.admitted = 0.0
        self.first_token = 0.0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.text = TextStream(request.stop)

    def _emit(self, event: Delta | Finished) -> None:
        """From the asyncio side; the worker posts through Engine._post instead."""
        self.events.put_nowait(event)


# Exactness limits of llama.cpp's CPU flash attention (ggml-cpu ops.cpp, see the top of this file); the
# other, SEQ_ROWS (the tiled kernel starts at 64 rows of one sequence), lives in parrot_edge.engine.memory.
SPLIT_KV_CELLS = 256  # a lone row over more cells than this takes the split kernel (llama.cpp pads n_kv to 256)
# After handing a step's events for several streams over, wait (at most this long) for the asyncio side to
# send them before the next llama_decode: on a small machine, streaming concurrently with decoding steals a
# core from llama.cpp's threads, which then wait for each other at every operation.
HANDOFF_WAIT = 0.005
# Woken from idle, the worker waits while requests keep arriving less than BURST_GAP apart (at most
# BURST_WINDOW) before its first step: a whole burst in one step costs less than a step alone plus the rest.
BURST_GAP = 0.002
BURST_WINDOW = 0.010
MAX_GAP_FILL = 2  # idle slots worth evaluating again to join two runs of answering students (see _join_runs)
SHELVE_MIN_TOKENS = 32  # shorter conversations cost less to evaluate again than to keep
BORROW_MIN_TOKENS = 16  # fewer shared tokens than this are cheaper to evaluate than to wait for and copy


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cells hold, in order
    generation: Generation | None = None
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next (prompt rest, or the last sample)
    sampler: object = None
    last_used: float = 0.0
    lender: tuple[int, int] | None = None  # (slot, tokens) this prompt will borrow once that slot has them


@dataclass
class Shelved:
    """A conversation put aside: its tokens and its llama.cpp sequence state (the KV cells, bit for bit)."""

    tokens: list[int]
    state: ctypes.Array


@dataclass
class ModelInfo:
    name: str
    path: Path
    n_ctx_train: int
    n_vocab: int
    chat_template: str | None
    bos_text: str
    eos_text: str
    add_bos: bool
    bos_id: int


def context_params(llama, *, slots: int, ctx_per_slot: int, prefill_chunk: int, threads: int | None = None):
    """The llama_context_params the engine runs with (the memory plan's test measures exactly these)."""
    if slots > MAX_SLOTS:
        raise ParrotEdgeError(f"at most {MAX_SLOTS} slots")
    params = llama.llama_context_default_params()
    params.n_seq_max = slots
    params.n_ctx = slots * ctx_per_slot
    params.n_batch = prefill_chunk + 2 * slots  # a step's most: two rows per slot plus a prompt chunk
    params.n_ubatch = min(UBATCH_ROWS, params.n_batch)
    params.kv_unified = False  # each slot owns its cells: attention never scans other students' tokens
    params.flash_attn_type = 1  # on: per-row attention makes batching exact (see top), and it is faster
    params.no_perf = True
    # Default: one thread per CPU this process may use (llama.cpp's own default of 4 oversubscribes 2 cores).
    params.n_threads = params.n_threads_batch = threads or len(os.sched_getaffinity(0))
    return params


class Engine:
    def __init__(self, model_path: Path, *, name: str, slots: int, ctx_per_slot: int, threads: int | None = None,
                 prefill_chunk: int = 256, queue_size: int = 64, shelf_bytes: int = 64 * 2**20):
        self._llama = llama = llamacpp.lib()
        self._model = llamacpp.load_model(model_path, repack=llamacpp.repacking_is_exact(model_path))
        self._vocab = llama.llama_model_get_vocab(self._model)
        params = context_params(llama, slots=slots, ctx_per_slot=ctx_per_slot, prefill_chunk=prefill_chunk,
                                threads=threads)
        self.batch_capacity = params.n_batch
        self.ubatch_rows = params.n_ubatch
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise ParrotEdgeError(f"llama.cpp could not create a context of {slots}×{ctx_per_slot} tokens: "
                                  f"{llamacpp.recent_log() or 'no reason given'}")
        self._memory = llama.llama_get_memory(self._ctx)
        self.slots_total = slots
        self.ctx_per_slot = llama.llama_n_ctx_seq(self._ctx)
        self.prefill_chunk = prefill_chunk
        self.queue_size = queue_size
        self.info = self._read_model_info(name, model_path)

        self._batch = llama.llama_batch_init(self.batch_capacity, 0, 1)
        self._batch_tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.batch_capacity,))
        self._batch_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.batch_capacity,))
        self._batch_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.batch_capacity,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.batch_capacity,))[:] = 1
        self._piece = ctypes.create_string_buffer(256)

        self._slots = [Slot(seq_id=i) for i in range(slots)]
        self._waiting: collections.deque[Generation] = collections.deque()
        self._outbox: list[tuple[Generation, Delta | Finished]] = []  # the worker's events, delivered per step
        self._shelf: collections.OrderedDict[int, Shelved] = collections.OrderedDict()  # oldest first
        self._shelf_ids = itertools.count()
        self.shelf_bytes = shelf_bytes
        self._wake = threading.Condition()
        self._running = True
        self._service_seconds = 5.0  # moving average of a request's time in a slot, for Retry-After
        self.stats = {"steps": 0, "batch_tokens": 0, "reevaluated_tokens": 0, "decode_errors": 0,
                      "shelved": 0, "unshelved": 0, "borrowed_tokens": 0, "bridges": 0, "guessed_rows": 0,
                      "guessed_tokens": 0}
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="parrot-edge-engine", daemon=True)
        self._thread.start()

    # -- model facts and tokenisation (thread-safe: the vocabulary is read-only)

    def _read_model_info(self, name: str, path: Path) -> ModelInfo:
        llama = self._llama
        template = llama.llama_model_chat_template(self._model, None)
        bos = llama.llama_vocab_bos(self._vocab)
        eos = llama.llama_vocab_eos(self._vocab)
        return ModelInfo(
            name=name, path=path, n_ctx_train=llama.llama_model_n_ctx_train(self._model),
            n_vocab=llama.llama_vocab_n_tokens(self._vocab),
            chat_template=template.decode("utf-8") if template else None,
            bos_text=self.token_text(bos) if bos >= 0 else "", eos_text=self.token_text(eos) if eos >= 0 else "",
            add_bos=bool(llama.llama_vocab_get_add_bos(self._vocab)), bos_id=bos,
        )

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buf = (ctypes.c_int32 * capacity)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return buf[:n]
            capacity = -n

    def token_text(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self._llama.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")

    # -- the asyncio side

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Queue a request; raises PromptTooLong or QueueFull instead of accepting what cannot be served."""
        if not request.prompt:
            raise ParrotEdgeError("empty prompt")
        if len(request.prompt) >= self.ctx_per_slot:
            raise PromptTooLong(len(request.prompt), self.ctx_per_slot)
        generation = Generation(request, loop or asyncio.get_running_loop())
        with self._wake:
            if not self._running:
                raise ParrotEdgeError("the engine is shutting down")
            free = sum(1 for slot in self._slots if slot.generation is None)
            if len(self._waiting) >= free + self.queue_size:
                raise QueueFull(self.retry_after())
            self._waiting.append(generation)
            self._wake.notify()
        return generation

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's expected drain time, at least 1."""
        queued = len(self._waiting) + 1
        return max(1, round(self._service_seconds * queued / self.slots_total))

    def cancel(self, generation: Generation) -> None:
        """Stop a request: dropped from the queue at once, or stopped by the worker at its next step."""
        with self._wake:
            generation.cancelled = True
            if generation in self._waiting:
                self._waiting.remove(generation)
                generation._emit(self._finished(generation, "cancelled"))

    def snapshot(self) -> dict:
        with self._wake:
            busy = sum(1 for slot in self._slots if slot.generation is not None)
            return {"slots_total": self.slots_total, "slots_busy": busy, "queue_depth": len(self._waiting),
                    "queue_size": self.queue_size, "ctx_per_slot": self.ctx_per_slot, **self.stats}

    def slot_kv_state(self) -> list[tuple[int, int]]:
        """(tokens the slot believes it holds, highest position llama.cpp holds + 1) per slot; for tests."""
        with self._wake:
            return [(len(s.tokens), self._llama.llama_memory_seq_pos_max(self._memory, s.seq_id) + 1)
                    for s in self._slots]

    def close(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join()
        llama = self._llama
        for slot in self._slots:
            self._release_sampler(slot)
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        llama.llama_model_free(self._model)

    # -- the worker thread

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._any_generation():
                    while self._running and not self._waiting:
                        self._wake.wait()
                    self._gather_burst()
                if not self._running:
                    break
                self._admit()
            try:
                self._step()
            except Exception as exc:  # never let one bad step take the classroom down
                log.exception("engine step failed")
                for slot in self._slots:
                    if slot.generation is not None:
                        self._finish(slot, "error", error=str(exc), keep_cache=False)
            self._deliver()
        for generation in self._waiting:
            self._post(generation, self._finished(generation, "error", error="server shutting down"))
        self._waiting.clear()
        for slot in self._slots:
            if slot.generation is not None:
                self._finish(slot, "error", error="server shutting down", keep_cache=False)
        self._deliver()

    def _gather_burst(self) -> None:
        """Woken from idle by a request: let the rest of a burst (a class told "go") arrive first. Started
        alone, the first prompt's step would make all the others wait for it."""
        give_up = time.monotonic() + BURST_WINDOW
        while self._running and len(self._waiting) < self.slots_total and time.monotonic() < give_up:
            arrived = len(self._waiting)
            self._wake.wait(BURST_GAP)
            if len(self._waiting) == arrived:
                return

    def _post(self, generation: Generation, event: Delta | Finished) -> None:
        self._outbox.append((generation, event))

    def _deliver(self) -> None:
        """Hand the step's events to the asyncio side: one wake-up per event loop per step, not per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Delta | Finished]]] = {}
        for generation, event in self._outbox:
            by_loop.setdefault(generation._loop, []).append((generation, event))
        streams = len({generation for generation, _ in self._outbox})
        self._outbox = []
        if not by_loop:
            return
        handled = threading.Event()
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, events, handled)
        if streams > 1:  # one stream's chunk costs the asyncio side less than waiting for it would
            handled.wait(HANDOFF_WAIT)

    def _any_generation(self) -> bool:
        return any(slot.generation is not None for slot in self._slots)

    def _admit(self) -> None:
        """Move waiting requests into free slots, in arrival order (called with the lock held)."""
        now = time.monotonic()
        for generation in [g for g in self._waiting if now > g.request.deadline]:
            self._waiting.remove(generation)
            self._post(generation, self._finished(generation, "timeout"))
        while self._waiting:
            free = [slot for slot in self._slots if slot.generation is None]
            if not free:
                return
            generation = self._waiting.popleft()
            slot = self._choose_slot(free, generation.request.prompt)
            try:
                self._assign(slot, generation, now)
            except Exception as exc:  # never let one request take the worker down
                log.exception("admitting a request failed")
                slot.generation = generation
                self._finish(slot, "error", error=str(exc), keep_cache=False)

    @staticmethod
    def _common_prefix(a: list[int], b: list[int]) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def _choose_slot(self, free: list[Slot], prompt: list[int]) -> Slot:
        # Longest shared prefix first; among equals, the least recently used, to keep other caches warm.
        return max(free, key=lambda slot: (self._common_prefix(slot.tokens, prompt), -slot.last_used))

    def _assign(self, slot: Slot, generation: Generation, now: float) -> None:
        prompt = generation.request.prompt
        shared = self._common_prefix(slot.tokens, prompt)
        if len(slot.tokens) > max(shared, SHELVE_MIN_TOKENS):
            self._shelve(slot)  # what this request would overwrite stays available to whoever continues it
        shelved_id, shelved_shared = self._best_on_shelf(prompt)
        if shelved_shared > shared and self._unshelve(shelved_id, slot):
            shared = shelved_shared
        # Keep the shared prefix, but evaluate at least the last token: its logits start the answer.
        keep = min(shared, len(prompt) - 1)
        if keep < len(slot.tokens) and not self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._forget(slot)
            keep = 0
        del slot.tokens[keep:]
        slot.pending = prompt[keep:]
        slot.generation = generation
        generation.cached_tokens = keep
        generation.admitted = now
        self._find_lender(slot)
        slot.sampler = build_chain(self._llama, self._vocab, generation.request.sampling)
        if generation.request.sampling.has_penalties:
            for token in prompt:  # penalties look at the conversation so far, as llama.cpp's server does
                self._llama.llama_sampler_accept(slot.sampler, token)

    def _step(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            generation = slot.generation
            if generation is None:
                continue
            if generation.cancelled:
                self._finish(slot, "cancelled", keep_cache=False)
            elif now > generation.request.deadline:
                self._finish(slot, "timeout")
            elif slot.lender is not None:
                self._try_borrow(slot)

        # What each sequence evaluates this step: its next token, or the next piece of its prompt.
        work: dict[int, list[int]] = {}
        for slot in self._slots:
            if slot.generation is not None and slot.generation.first_token and slot.pending:
                work[slot.seq_id] = slot.pending
                slot.pending = []
        budget = self.prefill_chunk
        prefilling = sorted((s for s in self._slots if self._prefilling(s) and s.lender is None),
                            key=lambda s: s.generation.admitted)
        for slot in prefilling:
            if budget == 0:
                break
            piece = min(budget, SEQ_ROWS - 1)  # room for a companion row (below)
            work[slot.seq_id] = slot.pending[:piece]
            del slot.pending[:piece]
            budget -= len(work[slot.seq_id])
        if not work:
            return
        self._join_runs(work)
        guesses: dict[int, int] = {}  # sequence → the token guessed to follow its sampled one (see _guess_ahead)
        self._keep_attention_exact(work, guesses)

        rows: list[tuple[Slot, int]] = []  # (slot, batch index of its first row that wants logits)
        n = 0
        for seq_id in sorted(work):  # llama.cpp micro-batches runs of consecutive sequences together
            slot, tokens = self._slots[seq_id], work[seq_id]
            start = len(slot.tokens)
            self._batch_tokens[n:n + len(tokens)] = tokens
            self._batch_pos[n:n + len(tokens)] = np.arange(start, start + len(tokens))
            self._batch_logits[n:n + len(tokens)] = 0
            for i in range(n, n + len(tokens)):
                self._batch.seq_id[i][0] = seq_id
            slot.tokens.extend(tokens)
            n += len(tokens)
            if slot.generation is not None and not slot.pending:  # a sampled token or the prompt's last
                first = n - 2 if seq_id in guesses else n - 1
                self._batch_logits[first:n] = 1
                rows.append((slot, first))
        self._batch.n_tokens = n
        result = self._llama.llama_decode(self._ctx, self._batch)
        self.stats["steps"] += 1
        self.stats["batch_tokens"] += n
        self.batch_sizes[n] += 1
        if result != 0:
            self.stats["decode_errors"] += 1
            message = f"llama_decode returned {result}: {llamacpp.recent_log() or 'no reason given'}"
            for seq_id in work:
                slot = self._slots[seq_id]
                if slot.generation is None:
                    self._forget(slot)  # an idle neighbour that bridged: its cells are in doubt now
                else:
                    self._finish(slot, "error", error=message, keep_cache=False)
            return
        for slot, index in rows:
            token = self._llama.llama_sampler_sample(slot.sampler, self._ctx, index)
            self._accept_token(slot, token)
            if slot.seq_id in guesses:
                self._settle_guess(slot, token, guesses[slot.seq_id], index + 1)

    def _join_runs(self, work: dict[int, list[int]]) -> None:
        """In a step of next tokens only, fill short gaps of idle slots between answering students with those
        slots' last cached tokens, evaluated again (to the same values): llama.cpp then runs one micro-batch
        instead of one per run of consecutive sequences, each of which costs about as much as three rows."""
        if len(work) < 2 or any(len(tokens) != 1 for tokens in work.values()):
            return
        ids = sorted(work)
        for before, after in itertools.pairwise(ids):
            gap = [self._slots[seq_id] for seq_id in range(before + 1, after)]
            if 0 < len(gap) <= MAX_GAP_FILL and all(slot.generation is None and slot.tokens for slot in gap):
                for slot in gap:
                    if self._evaluate_again(slot, work):
                        self.stats["bridges"] += 1

    def _keep_attention_exact(self, work: dict[int, list[int]], guesses: dict[int, int]) -> None:
        """Keep any sequence from being a lone row over many cells in llama.cpp's micro-batches. Best, when an
        idle slot sits between it and other working sequences: that slot's last cached token is removed and
        evaluated again (to the same values), which joins them into one micro-batch. Else the sequence gets a
        second row: a guess of its next token when it has one, or its own last cached token again. A prompt
        piece with no room for one more row gives its last row back to the next step instead."""
        for _ in range(2 * len(self._slots)):
            lone = lone_long_rows({seq_id: (len(self._slots[seq_id].tokens), len(tokens))
                                   for seq_id, tokens in work.items()}, self.ubatch_rows)
            if not lone:
                return
            slot = self._slots[lone[0]]
            if len(work[slot.seq_id]) >= SEQ_ROWS:
                slot.pending.insert(0, work[slot.seq_id].pop())
            elif bridge := self._bridge(slot.seq_id, work):
                if not self._evaluate_again(bridge, work):
                    return
                self.stats["bridges"] += 1
            elif not (self._guess_ahead(slot, work, guesses) or self._evaluate_again(slot, work)):
                return

    def _guess_ahead(self, slot: Slot, work: dict[int, list[int]], guesses: dict[int, int]) -> bool:
        """Make a generating sequence's companion row useful: its likely next token, looked up in its own
        conversation (what followed the last time these two tokens appeared). Sampled from the first row's
        logits, the guess is either right, and the second row's logits give the token after it (two tokens
        for one step, sampled in the same order from the same values as one by one), or wrong, and its cell
        is taken back. Either way the step costs what the companion would have."""
        tokens = work[slot.seq_id]
        if (slot.generation is None or not slot.generation.first_token or len(tokens) != 1
                or len(slot.tokens) + 2 >= self.ctx_per_slot):  # at the context's end, one by one ends sooner
            return False
        guess = guess_next(slot.tokens, tokens[0])
        if guess is None:
            return False
        tokens.append(guess)
        guesses[slot.seq_id] = guess
        self.stats["guessed_rows"] += 1
        return True

    def _settle_guess(self, slot: Slot, sampled: int, guess: int, guess_index: int) -> None:
        """After sampling a guessing sequence's first row: keep the guess and sample its row too, or take it
        back (wrong, or the answer ended at the first row)."""
        if slot.generation is not None and sampled == guess:
            slot.pending.clear()  # already evaluated: it was the guess
            self.stats["guessed_tokens"] += 1
            self._accept_token(slot, self._llama.llama_sampler_sample(slot.sampler, self._ctx, guess_index))
        elif self._drop_last_cell(slot) is None:  # never seen; the slot's cells would no longer match its tokens
            if slot.generation is not None:
                self._finish(slot, "error", error="llama.cpp could not take back a guessed token", keep_cache=False)
            else:
                self._forget(slot)

    def _bridge(self, seq_id: int, work: dict[int, list[int]]) -> Slot | None:
        """An idle neighbour holding tokens, with a working sequence beyond it."""
        for side in (1, -1):
            neighbour, beyond = seq_id + side, seq_id + 2 * side
            if (0 <= neighbour < len(self._slots) and neighbour not in work and beyond in work
                    and self._slots[neighbour].generation is None and self._slots[neighbour].tokens):
                return self._slots[neighbour]
        return None

    def _evaluate_again(self, slot: Slot, work: dict[int, list[int]]) -> bool:
        token = self._drop_last_cell(slot)
        if token is None:
            return False
        work[slot.seq_id] = [token, *work.get(slot.seq_id, [])]
        self.stats["reevaluated_tokens"] += 1
        return True

    def _drop_last_cell(self, slot: Slot) -> int | None:
        """Remove a slot's last cached token from llama.cpp's cells and its list; the token, or None if it can't."""
        if not self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.tokens) - 1, -1):
            return None
        return slot.tokens.pop()

    def _accept_token(self, slot: Slot, token: int) -> None:
        generation = slot.generation
        request = generation.request
        if generation.first_token == 0:
            generation.first_token = time.monotonic()
        if self._llama.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        generation.completion_tokens += 1
        n = self._llama.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        text = generation.text.push(self._piece.raw[:max(n, 0)])
        if text:
            self._post(generation, Delta(text))
        if generation.text.stopped:
            self._finish(slot, "stop")
        elif generation.completion_tokens >= request.max_tokens or len(slot.tokens) >= self.ctx_per_slot:
            self._finish(slot, "length")
        else:
            slot.pending.append(token)

    def _finished(self, generation: Generation, reason: str, error: str | None = None) -> Finished:
        now = time.monotonic()
        first = generation.first_token or now
        admitted = generation.admitted or now
        return Finished(reason=reason, prompt_tokens=len(generation.request.prompt),
                        completion_tokens=generation.completion_tokens, cached_tokens=generation.cached_tokens,
                        queued_ms=(admitted - generation.submitted) * 1000, prompt_ms=(first - admitted) * 1000,
                        decode_ms=(now - first) * 1000 if generation.first_token else 0.0, error=error)

    def _finish(self, slot: Slot, reason: str, *, error: str | None = None, keep_cache: bool = True) -> None:
        generation = slot.generation
        if reason in ("stop", "length", "timeout"):
            tail = generation.text.finish()
            if tail:
                self._post(generation, Delta(tail))
        finished = self._finished(generation, reason, error)
        if not keep_cache:
            # A cancelled or failed answer is not a conversation anyone continues: give its cells back.
            self._forget(slot)
        slot.pending.clear()
        slot.lender = None
        slot.generation = None
        slot.last_used = time.monotonic()
        self._release_sampler(slot)
        in_slot = slot.last_used - generation.admitted
        self._service_seconds = 0.9 * self._service_seconds + 0.1 * in_slot
        self._post(generation, finished)  # last: whoever reads it sees the slot already free

    # -- the shelf: conversations put aside in RAM

    def _best_on_shelf(self, prompt: list[int]) -> tuple[int | None, int]:
        best_id, best = None, 0
        for shelved_id, shelved in self._shelf.items():
            shared = self._common_prefix(shelved.tokens, prompt)
            if shared > best:
                best_id, best = shelved_id, shared
        return best_id, best

    def _read_state(self, seq_id: int, max_bytes: int | None = None) -> ctypes.Array | None:
        """A copy of a sequence's llama.cpp state (its KV cells, bit for bit); None if empty or over max_bytes."""
        size = self._llama.llama_state_seq_get_size(self._ctx, seq_id)
        if not size or (max_bytes is not None and size > max_bytes):
            return None
        state = (ctypes.c_uint8 * size)()
        return state if self._llama.llama_state_seq_get_data(self._ctx, state, size, seq_id) == size else None

    def _write_state(self, slot: Slot, state: ctypes.Array) -> bool:
        """Replace a slot's cells with a copied state; False leaves the slot empty."""
        self._forget(slot)
        if self._llama.llama_state_seq_set_data(self._ctx, state, len(state), slot.seq_id) == 0:
            self._forget(slot)
            return False
        return True

    def _shelve(self, slot: Slot) -> None:
        state = self._read_state(slot.seq_id, self.shelf_bytes)
        if state is None:
            return
        tokens = list(slot.tokens)
        for shelved_id in [i for i, s in self._shelf.items() if tokens[:len(s.tokens)] == s.tokens]:
            del self._shelf[shelved_id]  # an earlier turn of this conversation: the new state holds it all
        self._shelf[next(self._shelf_ids)] = Shelved(tokens, state)
        used = sum(len(s.state) for s in self._shelf.values())
        while used > self.shelf_bytes:
            _, oldest = self._shelf.popitem(last=False)
            used -= len(oldest.state)
        self.stats["shelved"] += 1

    def _unshelve(self, shelved_id: int, slot: Slot) -> bool:
        """Copy a shelved conversation into `slot` (which must be free); False leaves the slot empty."""
        shelved = self._shelf.pop(shelved_id)
        if not self._write_state(slot, shelved.state):
            return False
        slot.tokens = list(shelved.tokens)
        self.stats["unshelved"] += 1
        return True

    # -- borrowing: a prompt's opening copied from another slot

    @staticmethod
    def _prefilling(slot: Slot) -> bool:
        return slot.generation is not None and not slot.generation.first_token

    def _planned(self, slot: Slot) -> list[int]:
        """What a slot's cells hold, or will hold once it has read its prompt."""
        return slot.tokens + slot.pending if self._prefilling(slot) and slot.lender is None else slot.tokens

    def _find_lender(self, slot: Slot) -> None:
        prompt = slot.generation.request.prompt
        best, lender = len(slot.tokens) + BORROW_MIN_TOKENS - 1, None
        for other in self._slots:
            if other is not slot and other.lender is None:  # a borrower never lends: no one waits in a circle
                shared = min(self._common_prefix(self._planned(other), prompt), len(prompt) - 1)
                if shared > best:
                    best, lender = shared, other
        if lender is not None:
            slot.lender = (lender.seq_id, best)
            self._try_borrow(slot)

    def _try_borrow(self, slot: Slot) -> None:
        """Copy the promised prefix from the lender once it holds it; give up if it never will."""
        seq_id, promised = slot.lender
        lender = self._slots[seq_id]
        prompt = slot.generation.request.prompt
        if (len(lender.tokens) < promised and lender.lender is None and self._prefilling(lender)
                and self._common_prefix(self._planned(lender), prompt) >= promised):
            return  # still evaluating it: wait
        slot.lender = None
        held = self._common_prefix(lender.tokens, prompt[:promised])
        if held < len(slot.tokens) + BORROW_MIN_TOKENS:
            return
        state = self._read_state(seq_id)
        if state is None:
            return
        if not (self._write_state(slot, state)
                and self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, held, -1)):
            self._forget(slot)
            slot.pending = list(prompt)
            slot.generation.cached_tokens = 0
            return
        slot.tokens = prompt[:held]
        slot.pending = prompt[held:]
        slot.generation.cached_tokens = held
        self.stats["borrowed_tokens"] += held

    def _forget(self, slot: Slot) -> None:
        self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens.clear()

    def _release_sampler(self, slot: Slot) -> None:
        if slot.sampler is not None:
            self._llama.llama_sampler_free(slot.sampler)
            slot.sampler = None


def _put_all(events: list[tuple[Generation, Delta | Finished]], handled: threading.Event) -> None:
    for generation, event in events:
        generation.events.put_nowait(event)
    # Queued after the readers these events wake: runs once they have sent their chunks.
    asyncio.get_running_loop().call_soon(handled.set)


def guess_next(tokens: list[int], last: int) -> int | None:
    """The token that followed the latest earlier occurrence of the pair (tokens[-1], last), if any."""
    if not tokens:
        return None
    before = tokens[-1]
    for i in range(len(tokens) - 1, 0, -1):
        if tokens[i] == last and tokens[i - 1] == before:
            return tokens[i + 1] if i + 1 < len(tokens) else last
    return None


def lone_long_rows(plan: dict[int, tuple[int, int]], ubatch_rows: int) -> list[int]:
    """The sequences llama.cpp would evaluate as a micro-batch of one row over more than SPLIT_KV_CELLS cells.

    `plan` maps each sequence in the batch to (cells it holds before the step, rows it adds). This follows
    llama.cpp's split of a batch for a cache with a stream per sequence (`split_equal`, sequential): each
    micro-batch takes the run of consecutive sequence ids starting at the lowest with rows left, and the
    same number of rows from each, as many as the shortest has left and the micro-batch holds."""
    cells = {seq_id: held for seq_id, (held, _) in plan.items()}
    left = {seq_id: rows for seq_id, (_, rows) in plan.items() if rows}
    lone = []
    while left:
        run: list[int] = []
        for seq_id in sorted(left):
            if run and seq_id != run[-1] + 1:
                break
            run.append(seq_id)
        take = min(min(left[seq_id] for seq_id in run), max(1, ubatch_rows // len(run)))
        for seq_id in run:
            cells[seq_id] += take
            left[seq_id] -= take
            if not left[seq_id]:
                del left[seq_id]
        if len(run) == 1 and take == 1 and cells[run[0]] > SPLIT_KV_CELLS:
            lone.append(run[0])
    return lone
