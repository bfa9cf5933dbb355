"""The scheduler: one worker thread serving every student from one llama.cpp context.

The policy, step by step. Requests wait in a bounded queue (QueueFull → HTTP 503) and take free slots as
they come free: first the requests of clients not in bad standing (api/fairness.py), then the request of
the client with the fewest requests answering, then one of a client in good standing before one on notice,
then the oldest, so a client that floods cannot keep everyone else waiting; each gets its best cache first
(reuse.py). A client in bad standing never takes the last free slot while others answer. When every slot is
busy, the first waiting request may take the slot of an answer with a weaker claim: one of a client in bad
standing, of a client with two answers more than its own would have, or of a client on notice holding as
many as its own would. That answer is paused (its cells stay behind for the shelf, its
sampler with it) and waits at the head of the queue; resumed, it goes on exactly where it stopped (a request
still reading its prompt goes back to the queue as it came). Then the worker loops:

  1. select the work: the next token of every answering student, then up to `prefill_chunk` prompt tokens
     of the students still reading their prompt, oldest first, at most SEQ_ROWS - 1 of each, so a long
     prompt delays the others' streaming by one chunk at most;
  2. shape it so every row computes what it would alone (exactness.py);
  3. fill one llama_batch with it, ordered by sequence, and call llama_decode once;
  4. sample every sequence that produced logits with its own native sampler chain, and hand the step's
     text to the asyncio side in one go (handoff.py).

Woken from idle, the worker first lets a burst of requests (a class told "go") arrive, so the burst is read
in one step. A student's request ends at a stop, its length, its deadline, a cancel, or an error; its slot
keeps the conversation's cells for the next turn.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from parrot_edge import llamacpp
from parrot_edge.engine.context import LlamaContext
from parrot_edge.engine.exactness import SEQ_ROWS, StepShaper, Work
from parrot_edge.engine.handoff import Outbox
from parrot_edge.engine.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from parrot_edge.engine.padding import PaddedSteps, Shape
from parrot_edge.engine.requests import (
    Delta,
    EngineState,
    EngineStats,
    Generation,
    PromptTooLong,
    QueueFull,
    Request,
    Standing,
)
from parrot_edge.engine.reuse import Reuse
from parrot_edge.engine.sampling import build_chain, grammar_sampler
from parrot_edge.engine.sequence import Sequence
from parrot_edge.engine.shelf import Shelf
from parrot_edge.engine.slot import Slot
from parrot_edge.errors import ParrotEdgeError

log = logging.getLogger("parrot_edge.engine")

# Woken from idle, the worker waits while requests keep arriving less than BURST_GAP apart (at most
# BURST_WINDOW) before its first step: a whole burst in one step costs less than a step alone plus the rest.
BURST_GAP = 0.002
BURST_WINDOW = 0.010


class Engine:
    def __init__(self, model_path: Path, *, name: str, slots: int, ctx_per_slot: int, threads: int | None = None,
                 prefill_chunk: int = 256, queue_size: int = 64, shelf_bytes: int = 64 * 2**20,
                 kv_type: str = DEFAULT_KV_TYPE, repack: bool = True, tiled: bool = False,
                 verify_cells: bool = False):
        self.context = LlamaContext(model_path, slots=slots, ctx_per_slot=ctx_per_slot, prefill_chunk=prefill_chunk,
                                    threads=threads, kv_type=kv_type, repack=repack, tiled=tiled)
        self.info = self.context.facts(name, model_path)
        self.control_texts = self.context.control_token_texts()  # what message text must never become
        self.slots_total = slots
        self.ctx_per_slot = self.context.ctx_per_slot
        self.prefill_chunk = prefill_chunk
        self.queue_size = queue_size
        self.verify_cells = verify_cells  # after every step, check each slot's tokens against llama.cpp's cells
        self.stats = EngineStats()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        lib = self.context.lib
        self._slots = [Slot(Sequence(lib, self.context.ctx, self.context.memory, i)) for i in range(slots)]
        self.shelf = Shelf(shelf_bytes)
        self._reuse = Reuse(self._slots, self.shelf, self.stats)
        self._shaper = StepShaper(self._slots, self.context.ubatch_rows, self.ctx_per_slot, self.stats,
                                  pair_lone_rows=KV_TYPES[kv_type].split_kernel_possible)
        self._padded = (PaddedSteps(self._slots, self.context.ubatch_rows, prefill_chunk, self.stats)
                        if self.context.repack == "padded" else None)
        self._waiting: collections.deque[Generation] = collections.deque()
        self._outbox = Outbox()
        self._wake = threading.Condition()
        self._running = True
        self._service_seconds = 5.0  # moving average of a request's time in a slot, for Retry-After
        self._heartbeat = time.monotonic()  # when the worker last made progress (liveness, see state())
        self._suspects: set[int] = set()  # sequences of a failed step, not yet tried alone
        self._thread = threading.Thread(target=self._run, name="parrot-edge-engine", daemon=True)
        self._thread.start()

    # -- the asyncio side

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        return self.context.tokenize(text, add_special=add_special, parse_special=parse_special)

    def check_grammar(self, grammar: str) -> None:
        """Raise a ParrotEdgeError if llama.cpp cannot parse this GBNF grammar (safe from any thread)."""
        self.context.lib.llama_sampler_free(grammar_sampler(self.context.lib, self.context.vocab, grammar))

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
                self._release_sampler(generation)
                generation.admitted_event.set()  # it has left the queue (this runs on the asyncio side)
                generation.events.put_nowait(generation.outcome("cancelled"))

    def state(self) -> EngineState:
        locked = self._wake.acquire(timeout=1.0)  # a worker wedged while holding the lock must not wedge /health
        try:
            busy = sum(1 for slot in self._slots if slot.generation is not None)
            since = time.monotonic() - self._heartbeat
            stalled = (since if busy or self._waiting else 0.0) if locked else max(since, 1.0)
            return EngineState(self.slots_total, busy, len(self._waiting), self.queue_size, self.ctx_per_slot,
                               self.stats, dict(self.batch_sizes), self._thread.is_alive(), stalled)
        finally:
            if locked:
                self._wake.release()

    def slot_kv_state(self) -> list[tuple[int, int]]:
        """(tokens the slot believes it holds, positions llama.cpp holds) per slot: for the tests, which check
        after every scenario that the two agree."""
        with self._wake:
            return [(len(slot.sequence.tokens), slot.sequence.cells()) for slot in self._slots]

    def close(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify()
        self._thread.join()
        for slot in self._slots:
            self._release_sampler(slot)
        self.context.close()

    # -- the worker thread

    def _run(self) -> None:
        while True:
            self._heartbeat = time.monotonic()
            with self._wake:
                if not any(slot.generation is not None for slot in self._slots):
                    while self._running and not self._waiting:
                        self._wake.wait()
                    self._heartbeat = time.monotonic()
                    self._gather_burst()
                if not self._running:
                    break
                self._admit()
            try:
                self._step()
                if self.verify_cells:
                    self._check_cells()
            except Exception as exc:  # never let one bad step take the classroom down
                log.exception("engine step failed")
                for slot in self._slots:
                    if slot.generation is not None:
                        self._end(slot, "error", error=str(exc), keep_cache=False)
            self._outbox.deliver()
        for generation in list(self._waiting):
            self._end_waiting(generation, "error", "server shutting down")
        for slot in self._slots:
            if slot.generation is not None:
                self._end(slot, "error", error="server shutting down", keep_cache=False)
        self._outbox.deliver()

    def _check_cells(self) -> None:
        """The invariant of sequence.py, asked of llama.cpp itself (tests turn this on; it costs a call a slot)."""
        wrong = [slot.seq_id for slot in self._slots if len(slot.sequence.tokens) != slot.sequence.cells()]
        if wrong:
            self.stats.cell_mismatches += 1
            raise RuntimeError(f"the tokens of slots {wrong} no longer match their KV cells")

    def _gather_burst(self) -> None:
        """Woken from idle by a request: let the rest of a burst arrive first. Started alone, the first
        prompt's step would make all the others wait for it."""
        give_up = time.monotonic() + BURST_WINDOW
        while self._running and len(self._waiting) < self.slots_total and time.monotonic() < give_up:
            arrived = len(self._waiting)
            self._wake.wait(BURST_GAP)
            if len(self._waiting) == arrived:
                return

    def _admit(self) -> None:
        """Move waiting requests into free slots, strongest claim first (called with the lock held)."""
        now = time.monotonic()
        for generation in [g for g in self._waiting if now > g.request.deadline]:
            self._end_waiting(generation, "timeout")
        pauses = 0
        while self._waiting:
            free = [slot for slot in self._slots if slot.generation is None]
            if not free:
                if pauses == self.slots_total or not self._make_room():
                    return
                pauses += 1
                continue
            generation = self._next_waiting(len(free))
            if generation is None:
                return
            slot = self._reuse.choose_slot(free, generation.context_tokens)
            try:
                self._assign(slot, generation, now)
            except Exception as exc:  # never let one request take the worker down
                log.exception("admitting a request failed")
                slot.generation = generation
                self._end(slot, "error", error=str(exc), keep_cache=False)

    def _claims(self) -> tuple[Callable[[Generation], tuple[bool, int, Standing]], Generation]:
        """How strong a request's claim to a slot is (smaller is stronger: its client not in bad standing, then
        with fewer answers in slots, then in good standing rather than on notice), and the waiting request with
        the strongest (the first of equals)."""
        holding = collections.Counter(slot.generation.request.client for slot in self._slots if slot.generation)

        def claim(generation: Generation) -> tuple[bool, int, Standing]:
            standing = generation.request.standing
            return standing is Standing.BAD, holding[generation.request.client], standing
        return claim, min(self._waiting, key=claim)

    def _next_waiting(self, free: int) -> Generation | None:
        """The waiting request with the strongest claim, out of the queue; None when it is one in bad standing
        and would take the last free slot while clients not in bad standing answer: that slot is kept for their
        next turn (a client in bad standing is served from spare room only)."""
        _, generation = self._claims()
        if generation.request.standing is Standing.BAD and free == 1 and any(
                slot.generation and slot.generation.request.standing is not Standing.BAD for slot in self._slots):
            return None
        self._waiting.remove(generation)
        return generation

    def _make_room(self) -> bool:
        """Every slot is busy: pause the answer with the weakest claim if the first waiting request's is
        stronger even once admitted (so two equals never take turns pausing each other). True: a slot is free."""
        claim, first = self._claims()
        busy = [slot for slot in self._slots
                if slot.generation and not slot.generation.cancelled and slot.seq_id not in self._suspects]
        if not busy:
            return False
        weakest = max(busy, key=lambda slot: (claim(slot.generation), slot.generation.admitted))
        bad, holding, standing = claim(first)
        if claim(weakest.generation) <= (bad, holding + 1, standing):
            return False
        generation = weakest.generation
        if generation.first_token:  # it has answered: paused where it stands, its sampler with it
            if weakest.answering:  # (else it was reading its conversation again: `paused` still holds it)
                generation.paused = weakest.sequence.tokens + weakest.pending  # the last sample not yet evaluated
            generation.sampler, weakest.sampler = weakest.sampler, None
        else:  # still reading its prompt: back in the queue as it came, the cells it read left for whoever
            self._release_sampler(weakest)
        weakest.pending, weakest.generation, weakest.lender, weakest.last_used = [], None, None, time.monotonic()
        self._waiting.appendleft(generation)
        self.stats.paused += 1
        return True

    def _assign(self, slot: Slot, generation: Generation, now: float) -> None:
        request = generation.request
        slot.generation = generation
        generation.reading = True
        self._reuse.prepare(slot)
        if generation.paused is None:
            generation.admitted = now
            self._reuse.find_lender(slot)
            slot.sampler = build_chain(self.context.lib, self.context.vocab, request.sampling, request.prompt)
        else:  # resumed: its cells came back from the shelf (or are read again), its sampler goes on
            slot.sampler, generation.sampler = generation.sampler, None
        self._outbox.post(generation, None)  # it has left the queue

    def _end_waiting(self, generation: Generation, reason: str, error: str | None = None) -> None:
        """End a request in the queue (out of time, or the server stopping); a paused answer's last text too."""
        self._waiting.remove(generation)
        self._release_sampler(generation)
        self._outbox.post(generation, None)
        if generation.paused is not None and (tail := generation.text_stream.finish()):
            self._outbox.post(generation, Delta(tail))
        self._outbox.post(generation, generation.outcome(reason, error))

    def _step(self) -> None:
        self._end_or_borrow()
        work, shape = self._next_work()
        if not work:
            return
        rows = self._fill_batch(work, shape)
        if self._decode(work, shape):
            for seq_id, rows_after in shape.throwaway.items():
                sequence = self._slots[seq_id].sequence
                sequence.keep(len(sequence.tokens) - rows_after)
            self._suspects.difference_update(work)
            self._sample(rows, shape.guesses)

    def _next_work(self) -> tuple[Work, Shape]:
        """What this step evaluates and how it is laid out: by the padded rules with repacked Q4_K weights
        (padding.py), else the default ones (exactness.py)."""
        if self._padded is not None:
            return self._padded.select({min(self._suspects)} if self._suspects else None)
        work = self._select_work()
        return work, Shape(guesses=self._shaper.shape(work) if work else {})

    def _end_or_borrow(self) -> None:
        """End what was cancelled or is out of time; let waiting borrowers copy what their lender now holds."""
        now = time.monotonic()
        for slot in self._slots:
            generation = slot.generation
            if generation is None:
                continue
            if generation.cancelled:
                self._end(slot, "cancelled", keep_cache=False)
            elif now > generation.request.deadline:
                self._end(slot, "timeout")
            elif slot.lender is not None:
                self._reuse.try_borrow(slot)

    def _select_work(self) -> Work:
        """Every answering student's next token, then prompt pieces, oldest prompt first, within the chunk."""
        work: Work = {}
        if self._suspects:  # after a failed step, its sequences go one at a time until the culprit is found
            slot = self._slots[min(self._suspects)]
            self.stats.isolated_steps += 1
            piece = slot.pending if slot.answering else slot.pending[:min(self.prefill_chunk, SEQ_ROWS - 1)]
            work[slot.seq_id] = list(piece)
            del slot.pending[:len(piece)]
            return work
        for slot in self._slots:
            if slot.answering and slot.pending:
                work[slot.seq_id] = slot.pending
                slot.pending = []
        budget = self.prefill_chunk
        prefilling = sorted((s for s in self._slots if s.prefilling and s.lender is None),
                            key=lambda s: s.generation.admitted)
        for slot in prefilling:
            if budget == 0:
                break
            piece = min(budget, SEQ_ROWS - 1)  # room for a companion row (exactness.py)
            work[slot.seq_id] = slot.pending[:piece]
            del slot.pending[:piece]
            budget -= len(work[slot.seq_id])
        return work

    def _fill_batch(self, work: Work, shape: Shape) -> list[tuple[Slot, int]]:
        """The batch, by sequence (llama.cpp micro-batches runs of consecutive sequences together); returns
        (slot, batch index of the row whose logits give its next token) for every slot to sample."""
        batch = self.context.batch
        batch.clear()
        rows = []
        for seq_id in sorted(work):
            slot, tokens = self._slots[seq_id], work[seq_id]
            first = batch.add(tokens, slot.sequence.evaluating(tokens), seq_id)
            sample = first + shape.sample_row(seq_id, len(tokens))
            if seq_id in shape.logit_rows:
                asked = shape.logit_rows[seq_id]
                batch.want_logits(first + asked.start, first + asked.stop)
            if slot.generation is not None and not slot.pending:  # a sampled token or the prompt's last
                if seq_id not in shape.logit_rows:
                    batch.want_logits(sample, batch.rows)  # its row, and a guess's after it
                rows.append((slot, sample))
        return rows

    def _decode(self, work: Work, shape: Shape) -> bool:
        """One llama_decode. A failed step is undone; its sequences are tried again one by one (see
        _select_work), and only one that fails alone is ended."""
        rows = self.context.batch.rows
        result = self.context.decode()
        self.stats.steps += 1
        self.batch_sizes[rows] += 1
        if result == 0:
            return True
        self.stats.decode_errors += 1
        message = f"llama_decode returned {result}: {llamacpp.recent_log() or 'no reason given'}"
        log.warning("engine step of %d sequences failed: %s", len(work), message)
        alone = sum(self._slots[seq_id].generation is not None for seq_id in work) == 1
        for seq_id, tokens in work.items():
            slot = self._slots[seq_id]
            if slot.generation is None:
                slot.sequence.forget()  # an idle neighbour that bridged
            elif alone:
                self._suspects.discard(seq_id)
                self._end(slot, "error", error=message, keep_cache=False)
            else:  # undo the step for it: back to the cells before it, the same tokens to evaluate again
                evaluated = tokens[:shape.sample_row(seq_id, len(tokens)) + 1]  # no guess, no throwaway rows
                slot.sequence.keep(len(slot.sequence.tokens) - len(tokens))
                slot.pending[:0] = evaluated
                self._suspects.add(seq_id)
        return False

    def _sample(self, rows: list[tuple[Slot, int]], guesses: dict[int, int]) -> None:
        for slot, index in rows:
            token = self.context.sample(slot.sampler, index)
            self._accept(slot, token)
            if slot.seq_id in guesses:
                self._settle_guess(slot, token, guesses[slot.seq_id], index + 1)

    def _settle_guess(self, slot: Slot, sampled: int, guess: int, guess_index: int) -> None:
        """After sampling a guessing sequence's first row: keep the guess and sample its row too, or take it
        back (wrong, or the answer ended at the first row)."""
        if slot.generation is not None and sampled == guess:
            slot.pending.clear()  # already evaluated: it was the guess
            self.stats.guessed_tokens += 1
            self._accept(slot, self.context.sample(slot.sampler, guess_index))
        elif slot.sequence.drop_last() is None:  # never seen; the cells would no longer match the tokens
            if slot.generation is not None:
                self._end(slot, "error", error="llama.cpp could not take back a guessed token", keep_cache=False)
            else:
                slot.sequence.forget()

    def _accept(self, slot: Slot, token: int) -> None:
        """A sampled token: the end of the answer, or text for the client and the next token to evaluate."""
        generation = slot.generation
        request = generation.request
        generation.reading, generation.paused = False, None
        if generation.first_token == 0:
            generation.first_token = time.monotonic()
        if self.context.ends_generation(token):
            self._end(slot, "stop")
            return
        generation.completion_tokens += 1
        text = generation.text_stream.push(self.context.piece(token))
        if text:
            self._outbox.post(generation, Delta(text))
        if generation.text_stream.stopped:
            self._end(slot, "stop")
        elif generation.completion_tokens >= request.max_tokens or len(slot.sequence.tokens) >= self.ctx_per_slot:
            self._end(slot, "length")
        else:
            slot.pending.append(token)

    def _end(self, slot: Slot, reason: str, *, error: str | None = None, keep_cache: bool = True) -> None:
        """End the slot's generation: its last text and its Finished event, and the slot is free again."""
        generation = slot.generation
        if reason in ("stop", "length", "timeout"):
            tail = generation.text_stream.finish()
            if tail:
                self._outbox.post(generation, Delta(tail))
        finished = generation.outcome(reason, error)
        if not keep_cache:
            # A cancelled or failed answer is not a conversation anyone continues: give its cells back.
            slot.sequence.forget()
        slot.pending.clear()
        slot.lender = None
        slot.generation = None
        self._suspects.discard(slot.seq_id)
        slot.last_used = time.monotonic()
        self._release_sampler(slot)
        in_slot = slot.last_used - generation.admitted
        self._service_seconds = 0.9 * self._service_seconds + 0.1 * in_slot
        self._outbox.post(generation, finished)  # last: whoever reads it sees the slot already free

    def _release_sampler(self, holder: Slot | Generation) -> None:
        """Free the sampler chain of a slot, or of a paused answer that ends in the queue."""
        if holder.sampler is not None:
            self.context.lib.llama_sampler_free(holder.sampler)
            holder.sampler = None
