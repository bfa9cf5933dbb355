"""The continuous-batching engine, in process, on a real llama.cpp with the default model."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from parrot_edge import llamacpp
from parrot_edge.api.chat_template import render_chat
from parrot_edge.engine.context import GEMV_UBATCH_ROWS, context_params
from parrot_edge.engine.exactness import guess_next
from parrot_edge.engine.kv_cache import DEFAULT_KV_TYPE
from parrot_edge.engine.padding import ROW_GROUP
from parrot_edge.engine.requests import Finished, PromptTooLong, QueueFull, Request, Standing
from parrot_edge.engine.sampling import SamplingParams
from parrot_edge.engine.scheduler import BURST_GAP, Engine
from parrot_edge.engine.shelf import common_prefix

GREEDY = SamplingParams(temperature=0)
SHELF_BYTES = 24 * 2**20
QUESTIONS = [
    "What is the capital of France?",
    "¿Cuál es la capital de España?",
    "Write a haiku about rain.",
    "Name three colors.",
    "¿Por qué el cielo es azul?",
    "What is 12 times 12?",
]
# A conversation past 256 tokens, where a lone student's rows need the engine's pairing to stay exact over an f16
# KV cache (the default cache never takes that kernel).
LONG_QUESTION = ("Here are my notes from class. " + "The moon orbits the Earth and reflects the light of the sun. " * 30
                 + "Tell me about the moon.")


@pytest.fixture(scope="module")
def engine(default_gguf):
    engine = Engine(default_gguf, name="smollm2", slots=4, ctx_per_slot=1024, prefill_chunk=64, queue_size=8,
                    shelf_bytes=SHELF_BYTES)
    yield engine
    engine.close()


def chat_tokens(engine: Engine, messages: list[dict]) -> list[int]:
    info = engine.info
    text = render_chat(info.chat_template, messages, bos_token=info.bos_text, eos_token=info.eos_text)
    return engine.tokenize(text, add_special=False)


async def until_finished(generation) -> Finished:
    while not isinstance(event := await generation.events.get(), Finished):
        pass
    return event


async def run(engine: Engine, request: Request, cancel_after: int | None = None) -> tuple[str, Finished]:
    generation = engine.submit(request)
    parts = []
    while not isinstance(event := await generation.events.get(), Finished):
        parts.append(event.text)
        if cancel_after is not None and len(parts) >= cancel_after:
            engine.cancel(generation)
    return "".join(parts), event


def ask(engine: Engine, question: str, max_tokens: int = 40, **kwargs) -> Request:
    return Request(prompt=chat_tokens(engine, [{"role": "user", "content": question}]), sampling=GREEDY,
                   max_tokens=max_tokens, **kwargs)


def test_concurrent_answers_equal_answers_alone(engine):
    async def scenario():
        alone = [await run(engine, ask(engine, q)) for q in QUESTIONS]
        together = await asyncio.gather(*(run(engine, ask(engine, q)) for q in QUESTIONS))
        return alone, together

    alone, together = asyncio.run(scenario())
    for (text_alone, _), (text_together, finished) in zip(alone, together, strict=True):
        assert text_alone.strip(), "the model answered nothing"
        assert text_together == text_alone
        assert finished.reason in ("stop", "length")
    assert max(engine.batch_sizes) > 1, "requests were never batched together"


def test_a_long_conversation_alone_equals_it_among_others(engine):
    """Past 256 cells a lone row over the default cache (f16 keys, bf16 values) takes the row-by-row kernel, as in
    company: the engine gives it no companion, and nothing changes."""
    def paired() -> int:  # second rows given: cached tokens again, or guesses
        return engine.stats.reevaluated_tokens + engine.stats.guessed_rows

    paired_before = paired()

    async def scenario():
        alone = await run(engine, ask(engine, LONG_QUESTION))
        together = await asyncio.gather(run(engine, ask(engine, LONG_QUESTION)),
                                        *(run(engine, ask(engine, q)) for q in QUESTIONS[:3]))
        return alone, together[0]

    (text_alone, _), (text_together, _) = asyncio.run(scenario())
    assert len(chat_tokens(engine, [{"role": "user", "content": LONG_QUESTION}])) > 300
    assert paired() == paired_before, "a lone long row was paired, which the default cache never needs"
    assert text_alone.strip() and text_together == text_alone


@pytest.mark.parametrize("idle_between", [1, 2])
def test_idle_slots_bridge_a_lone_long_conversation_to_the_others(default_gguf, idle_between):
    """Over an f16 KV cache: slot 0 answers past 256 cells, the next slots are idle, the one after answers:
    llama.cpp would give slot 0 a micro-batch of its own; evaluating the idle slots' last tokens again joins
    them. Nothing changes: both answers equal cold evaluations, and an idle slot's kept conversation still
    continues exactly."""
    def raw(text: str, max_tokens: int = 24) -> Request:
        return Request(prompt=bridged.tokenize(text, add_special=True), sampling=GREEDY, max_tokens=max_tokens)

    long_text, other_text = LONG_QUESTION, "Volcanoes erupt because"
    idle_texts = ["Bees make honey from", "Rain falls when"][:idle_between]
    bridged = Engine(default_gguf, name="bridged", slots=2 + idle_between, ctx_per_slot=1024, kv_type="f16")
    try:
        async def scenario():
            await run(bridged, raw(long_text, 1))  # slot 0
            for text in idle_texts:  # the next slots, then idle
                await run(bridged, raw(text, 8))
            together = await asyncio.gather(run(bridged, raw(long_text + " The end.")), run(bridged, raw(other_text)))
            later = await run(bridged, raw(idle_texts[0] + " flowers."))  # slot 1's conversation, continued
            return [text for text, _ in together] + [later[0]], later[1].cached_tokens

        warm, cached = asyncio.run(scenario())
        assert bridged.stats.bridges >= idle_between, "the idle slots never bridged"
        assert cached > 0, "the idle slot's conversation was not reused"
        for believed, held in bridged.slot_kv_state():
            assert believed == held
    finally:
        bridged.close()
    cold = []
    for text in (long_text + " The end.", other_text, idle_texts[0] + " flowers."):
        fresh = Engine(default_gguf, name="cold", slots=1, ctx_per_slot=1024, kv_type="f16")
        try:
            cold.append(asyncio.run(run(fresh, Request(prompt=fresh.tokenize(text, add_special=True),
                                                       sampling=GREEDY, max_tokens=24)))[0])
        finally:
            fresh.close()
    assert warm == cold


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, seed=7)], ids=["greedy", "sampled"])
def test_a_lone_long_answer_guesses_ahead_exactly(default_gguf, monkeypatch, sampling):
    """Over an f16 KV cache, alone past 256 cells, a student's companion row is a guess of its next token; a
    right guess gives two tokens in one step. Both turns' answers (the second reusing the first's cells) and
    the KV bookkeeping are exactly those with guessing switched off (the plain companion: the last cached
    token again)."""
    def conversation(target: Engine) -> list[str]:
        async def turns():
            messages = [{"role": "user", "content": LONG_QUESTION}]
            first, _ = await run(target, Request(prompt=chat_tokens(target, messages), sampling=sampling,
                                                 max_tokens=64))
            messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Tell me more."}]
            second, finished = await run(target, Request(prompt=chat_tokens(target, messages), sampling=sampling,
                                                         max_tokens=32))
            assert finished.cached_tokens > 300
            return [first, second]

        answers = asyncio.run(turns())
        for believed, held in target.slot_kv_state():
            assert believed == held
        return answers

    guessing = Engine(default_gguf, name="guessing", slots=1, ctx_per_slot=1024, kv_type="f16")
    try:
        guessed = conversation(guessing)
        stats = dataclasses.asdict(guessing.stats)
    finally:
        guessing.close()
    assert stats["guessed_tokens"] > 0, "no guess was ever right"
    assert stats["guessed_rows"] > stats["guessed_tokens"], "no wrong guess was ever taken back"

    monkeypatch.setattr("parrot_edge.engine.exactness.guess_next", lambda tokens, last: None)
    plain = Engine(default_gguf, name="plain", slots=1, ctx_per_slot=1024, kv_type="f16")
    try:
        assert conversation(plain) == guessed
        assert plain.stats.guessed_rows == 0 and plain.stats.reevaluated_tokens > 0
    finally:
        plain.close()


@pytest.mark.parametrize("kv_type", ["f16-bf16", "q8_0"])
def test_a_lone_long_answer_needs_no_companion_and_stays_exact(default_gguf, kv_type):
    """The default KV cache (f16 keys, bf16 values) and a q8_0 one never take llama.cpp's split kernel, so a
    student alone past 256 cells is evaluated one row a step: no companion, no guess. A second turn reusing
    the first's cells answers what a fresh engine answers reading the whole conversation cold."""
    def lone_engine() -> Engine:
        return Engine(default_gguf, name=kv_type, slots=1, ctx_per_slot=1024, kv_type=kv_type)

    def second_turn(target: Engine, first: str | None) -> tuple[str, str, int]:
        """(first answer, second answer, cells the second reused); the first turn is asked unless given."""
        async def turns():
            messages = [{"role": "user", "content": LONG_QUESTION}]
            answer = first
            if answer is None:
                answer, _ = await run(target, Request(prompt=chat_tokens(target, messages), sampling=GREEDY,
                                                      max_tokens=48))
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]
            second, finished = await run(target, Request(prompt=chat_tokens(target, messages), sampling=GREEDY,
                                                         max_tokens=32))
            return answer, second, finished.cached_tokens

        return asyncio.run(turns())

    warm_engine = lone_engine()
    try:
        first, warm, reused = second_turn(warm_engine, None)
        assert reused > 300
        assert warm_engine.stats.guessed_rows == warm_engine.stats.reevaluated_tokens == 0
        assert warm_engine.stats.steps > 48 + 32, "the answers were not evaluated a row a step"
    finally:
        warm_engine.close()
    cold_engine = lone_engine()
    try:
        assert second_turn(cold_engine, first)[1] == warm  # read cold: the whole conversation as its prompt
    finally:
        cold_engine.close()


def test_guess_next_looks_up_what_followed_the_last_two_tokens():
    assert guess_next([5, 6, 7, 8, 5], 6) == 7  # ... 5 6 [7] ... 5 6 → 7
    assert guess_next([5, 6, 7, 5, 6, 9, 5], 6) == 9  # the latest occurrence wins
    assert guess_next([4, 4], 4) == 4  # the pair (4, 4) ended at the last token: what followed is `last` itself
    assert guess_next([5, 6, 7], 8) is None and guess_next([], 1) is None


def test_cancel_mid_stream_leaves_others_intact(engine):
    async def scenario():
        reference = [await run(engine, ask(engine, q, max_tokens=60)) for q in QUESTIONS[:3]]
        results = await asyncio.gather(run(engine, ask(engine, QUESTIONS[0], max_tokens=60), cancel_after=3),
                                       *(run(engine, ask(engine, q, max_tokens=60)) for q in QUESTIONS[1:3]))
        return reference, results

    reference, results = asyncio.run(scenario())
    _, cancelled = results[0]
    assert cancelled.reason == "cancelled"
    assert cancelled.completion_tokens <= 5  # stopped within a token or two of the cancel
    for (want, _), (got, finished) in zip(reference[1:], results[1:], strict=True):
        assert got == want and finished.reason in ("stop", "length")
    assert engine.state().slots_busy == 0


@pytest.mark.parametrize("first_question", ["Tell me about the moon.", LONG_QUESTION], ids=["short", "long"])
def test_prefix_reuse_matches_cold_evaluation(default_gguf, engine, first_question):
    conversation = [{"role": "user", "content": first_question}]

    async def turns(target: Engine):
        answers, cached = [], []
        for question in [first_question, "How far away is it?", "¿Y el sol?"]:
            if answers:
                conversation_so_far = [*conversation, {"role": "user", "content": question}]
            else:
                conversation_so_far = list(conversation)
            text, finished = await run(target, Request(prompt=chat_tokens(target, conversation_so_far),
                                                       sampling=GREEDY, max_tokens=24))
            answers.append(text)
            cached.append(finished.cached_tokens)
            conversation.clear()
            conversation.extend([*conversation_so_far, {"role": "assistant", "content": text}])
        return answers, cached, list(conversation)

    warm_answers, cached, full_conversation = asyncio.run(turns(engine))
    assert cached[1] > 20 and cached[2] > cached[1], f"turns did not reuse the slot's cache: {cached}"

    # Cold: a fresh engine per turn evaluates the whole conversation from nothing.
    for turn, want in enumerate(warm_answers):
        cold = Engine(default_gguf, name="cold", slots=1, ctx_per_slot=1024)
        try:
            tokens = chat_tokens(cold, full_conversation[: 2 * turn + 1])
            text, finished = asyncio.run(run(cold, Request(prompt=tokens, sampling=GREEDY, max_tokens=24)))
        finally:
            cold.close()
        assert finished.cached_tokens == 0
        assert text == want, f"turn {turn + 1}: warm {want!r} != cold {text!r}"


def test_a_conversation_whose_slot_was_taken_comes_back_from_the_shelf(default_gguf, engine):
    """More students than slots: the first student's slot is reused by others meanwhile; the next turn is
    copied back from RAM, evaluates only the new message, and answers exactly as a cold evaluation."""
    first = [{"role": "user", "content": LONG_QUESTION}]

    async def scenario():
        answer, _ = await run(engine, Request(prompt=chat_tokens(engine, first), sampling=GREEDY, max_tokens=16))
        others = [ask(engine, f"{q} Answer briefly, please, in one sentence. ({i})", max_tokens=16)
                  for i, q in enumerate(QUESTIONS * 2)]
        await asyncio.gather(*(run(engine, request) for request in others))  # every slot now holds another student
        conversation = [*first, {"role": "assistant", "content": answer},
                        {"role": "user", "content": "How far away is it?"}]
        unshelved_before = engine.stats.unshelved
        text, finished = await run(engine, Request(prompt=chat_tokens(engine, conversation), sampling=GREEDY,
                                                   max_tokens=24))
        return conversation, text, finished, engine.stats.unshelved - unshelved_before

    conversation, warm, finished, unshelved = asyncio.run(scenario())
    assert unshelved == 1 and finished.cached_tokens > 300, (unshelved, finished.cached_tokens)
    cold = Engine(default_gguf, name="cold", slots=1, ctx_per_slot=1024)
    try:
        text, cold_finished = asyncio.run(run(cold, Request(prompt=chat_tokens(cold, conversation), sampling=GREEDY,
                                                             max_tokens=24)))
    finally:
        cold.close()
    assert cold_finished.cached_tokens == 0 and text == warm


NO_END = ((0, float("-inf")), (2, float("-inf")))  # SmolLM2's end tokens banned: an answer as long as asked


@pytest.mark.parametrize("shelf_bytes", [SHELF_BYTES, 0], ids=["shelved", "read-again"])
def test_an_answer_paused_for_a_fairer_claim_goes_on_exactly(default_gguf, shelf_bytes):
    """Client a holds both slots when client b asks: a's newer answer is paused, b is answered at once, and a's
    answer, resumed (its cells from the shelf, or read again when there is no room on it), is what it is alone.
    Sampled with a seed, so the sampler's random state must go on where it stopped too."""
    sampling = SamplingParams(temperature=0.9, seed=7, logit_bias=NO_END)
    paused = Engine(default_gguf, name="pause", slots=2, ctx_per_slot=1024, prefill_chunk=64,
                    shelf_bytes=shelf_bytes, verify_cells=True)

    def request(client: str, question: str, max_tokens: int) -> Request:
        return Request(prompt=chat_tokens(paused, [{"role": "user", "content": question}]), sampling=sampling,
                       max_tokens=max_tokens, client=client)

    async def scenario():
        alone, _ = await run(paused, request("a", LONG_QUESTION, 96))
        story = paused.submit(request("a", "Tell me a long story about a cat.", 1000))
        second = paused.submit(request("a", LONG_QUESTION, 96))
        first_piece = await second.events.get()  # both of a's answers are under way
        unshelved = paused.stats.unshelved
        _, finished = await run(paused, request("b", "What is 12 times 12?", 8))
        assert story.first_token and not story.cancelled and finished.reason == "length"
        parts = [first_piece.text]
        while not isinstance(event := await second.events.get(), Finished):
            parts.append(event.text)
        paused.cancel(story)
        await until_finished(story)
        return alone, "".join(parts), event, paused.stats.unshelved - unshelved

    try:
        alone, resumed, finished, unshelved = asyncio.run(scenario())
        assert paused.stats.paused >= 1, "b waited for one of a's answers to end"
        assert finished.reason == "length" and resumed == alone
        assert (unshelved >= 1) == bool(shelf_bytes), unshelved
        assert paused.stats.cell_mismatches == 0
        assert paused.state().slots_busy == 0 and paused.state().queue_depth == 0
    finally:
        paused.close()


@pytest.mark.parametrize(("holder", "asker", "pauses"), [(Standing.NOTICED, Standing.GOOD, True),
                                                        (Standing.GOOD, Standing.NOTICED, False),
                                                        (Standing.NOTICED, Standing.NOTICED, False)])
def test_a_client_on_notice_yields_its_slot_to_an_equal_in_good_standing(default_gguf, holder, asker, pauses):
    """One slot, client a answering, client b asking, each holding one answer once b is admitted: only a client
    on notice gives its slot up to one in good standing; two equals never pause each other."""
    engine = Engine(default_gguf, name="notice", slots=1, ctx_per_slot=1024, prefill_chunk=64)

    def request(client: str, standing: Standing, max_tokens: int) -> Request:
        return Request(prompt=chat_tokens(engine, [{"role": "user", "content": "Tell me a long story."}]),
                       sampling=SamplingParams(temperature=0, logit_bias=NO_END), max_tokens=max_tokens,
                       client=client, standing=standing)

    async def scenario():
        story = engine.submit(request("a", holder, 1000))
        await story.events.get()  # a is answering
        asked = engine.submit(request("b", asker, 4))
        if pauses:
            await until_finished(asked)
            pieces = [story.events.get_nowait() for _ in range(story.events.qsize())]
            if any(isinstance(piece, Finished) for piece in pieces):
                return False  # a's story ended first
            engine.cancel(story)
            await until_finished(story)
            answered_first = True
        else:
            for _ in range(40):  # forty more of a's steps, each a chance to admit b
                await story.events.get()
            answered_first = asked.admitted_event.is_set()
            engine.cancel(story)
            await until_finished(story)
            await until_finished(asked)
        return answered_first

    try:
        assert asyncio.run(scenario()) == pauses
        assert engine.stats.paused == (1 if pauses else 0)
        assert engine.state().slots_busy == 0 and engine.state().queue_depth == 0
    finally:
        engine.close()


TEACHER = ("You are a patient teacher in a rural school. Answer simply, kindly and briefly, "
           "in the language of the question. ") * 4


def teacher_request(engine: Engine, question: str) -> Request:
    messages = [{"role": "system", "content": TEACHER}, {"role": "user", "content": question}]
    return Request(prompt=chat_tokens(engine, messages), sampling=GREEDY, max_tokens=24)


def cold_answers(default_gguf, questions: list[str]) -> list[str]:
    """Each request on a fresh engine: everything evaluated from nothing."""
    answers = []
    for question in questions:
        cold = Engine(default_gguf, name="cold", slots=1, ctx_per_slot=1024)
        try:
            text, finished = asyncio.run(run(cold, teacher_request(cold, question)))
        finally:
            cold.close()
        assert finished.cached_tokens == 0
        answers.append(text)
    return answers


def test_a_burst_sharing_a_system_prompt_evaluates_it_once(default_gguf):
    """A class starts at once with the same system prompt: one slot evaluates it (in several chunks, while the
    others wait), the others borrow its cells; every answer is what a cold evaluation gives."""
    burst = Engine(default_gguf, name="burst", slots=4, ctx_per_slot=1024, prefill_chunk=32)
    try:
        requests = [teacher_request(burst, q) for q in QUESTIONS[:4]]
        shared = min(common_prefix(requests[0].prompt, r.prompt) for r in requests[1:])
        assert shared > 100

        async def scenario():
            return await asyncio.gather(*(run(burst, r) for r in requests))

        together = asyncio.run(scenario())
        borrowed = burst.stats.borrowed_tokens
        assert borrowed >= 3 * shared, f"borrowed {borrowed} tokens, expected the {shared}-token prefix 3 times"
        assert sum(finished.cached_tokens >= shared for _, finished in together) == 3
        for believed, held in burst.slot_kv_state():
            assert believed == held
    finally:
        burst.close()
    assert [text for text, _ in together] == cold_answers(default_gguf, QUESTIONS[:4])


def test_a_burst_arriving_at_an_idle_engine_is_read_in_one_step(default_gguf):
    """Started on the first prompt alone, a step would make the rest of the class wait for it."""
    texts = ("Once upon a time", "The capital of France is", "Water boils at", "Bees make")

    async def scenario(burst: Engine, prompts: list[list[int]]) -> float:
        generations, arrivals = [], []
        for prompt in prompts:  # half a millisecond apart, as requests come off the network
            generations.append(burst.submit(Request(prompt=prompt, sampling=GREEDY, max_tokens=4)))
            arrivals.append(time.monotonic())
            time.sleep(0.0005)
        for generation in generations:
            await until_finished(generation)
        return max(b - a for a, b in itertools.pairwise(arrivals))

    # A loaded machine may deschedule this thread for longer than a burst's gap (BURST_GAP): such a run is no
    # burst, and is tried again (on a fresh engine: nothing cached) rather than judged.
    for _ in range(10):
        burst = Engine(default_gguf, name="burst", slots=4, ctx_per_slot=512)
        try:
            prompts = [burst.tokenize(text, add_special=True) for text in texts]
            widest_gap = asyncio.run(scenario(burst, prompts))
            first_step_rows = next(iter(burst.batch_sizes))
        finally:
            burst.close()
        if widest_gap < BURST_GAP * 0.75:
            break
    else:
        pytest.skip("the machine never let four requests arrive within a burst's gap")
    assert first_step_rows == sum(len(p) for p in prompts), burst.batch_sizes


def test_a_lender_cancelled_midway_leaves_its_borrowers_exact(default_gguf):
    """The slot others wait on is cancelled before it has evaluated the shared prompt: they read it themselves."""
    # 2 prompt tokens a step: the lender reads the shared system prompt for about 60 steps, time enough for
    # the borrowers to be admitted and the cancel to land before it is done, even on a loaded machine
    burst = Engine(default_gguf, name="burst", slots=3, ctx_per_slot=1024, prefill_chunk=2)
    try:
        async def collect(generation) -> str:
            parts = []
            while not isinstance(event := await generation.events.get(), Finished):
                parts.append(event.text)
            return "".join(parts)

        async def scenario():
            lender = burst.submit(teacher_request(burst, QUESTIONS[0]))
            while burst.state().slots_busy == 0:  # the lender is reading its prompt, 2 tokens a step
                await asyncio.sleep(0.001)
            borrowers = [burst.submit(teacher_request(burst, q)) for q in QUESTIONS[1:3]]
            while burst.state().slots_busy < 3:  # both borrowers admitted, waiting for the lender's cells
                await asyncio.sleep(0.001)
            burst.cancel(lender)
            return await asyncio.gather(collect(lender), *(collect(b) for b in borrowers))

        _, *texts = asyncio.run(scenario())
        assert burst.stats.borrowed_tokens == 0, "the lender was cancelled too late to test this"
        assert burst.state().slots_busy == 0
    finally:
        burst.close()
    assert texts == cold_answers(default_gguf, QUESTIONS[1:3])


def test_prompt_too_long_and_empty(engine):
    with pytest.raises(PromptTooLong) as exc:
        asyncio.run(run(engine, Request(prompt=[100] * 1024)))
    assert exc.value.prompt_tokens == 1024 and exc.value.limit == 1024


def test_queue_full_and_deadline(default_gguf):
    small = Engine(default_gguf, name="small", slots=1, ctx_per_slot=512, queue_size=1)
    try:
        async def scenario():
            long_request = Request(prompt=chat_tokens(small, [{"role": "user", "content": "Tell a long story."}]),
                                   sampling=GREEDY, max_tokens=200)
            first = small.submit(long_request)
            queued = small.submit(long_request)
            with pytest.raises(QueueFull) as refused:
                small.submit(long_request)
            assert refused.value.retry_after >= 1
            small.cancel(first)
            small.cancel(queued)
            for generation in (first, queued):
                await until_finished(generation)
            expired = small.submit(Request(prompt=long_request.prompt, max_tokens=200, deadline=0))
            while not isinstance(event := await expired.events.get(), Finished):
                pass
            return event

        assert asyncio.run(scenario()).reason == "timeout"
    finally:
        small.close()


def test_many_requests_leave_memory_and_kv_flat(engine):
    process = psutil.Process()

    async def wave(n: int, concurrent: int):
        semaphore = asyncio.Semaphore(concurrent)

        async def one(i: int):
            async with semaphore:
                question = f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"
                return await run(engine, ask(engine, question, max_tokens=4))
        return await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(wave(50, 4))  # warm up allocator and caches, and fill the shelf
    gc.collect()
    before = process.memory_info().rss
    asyncio.run(wave(250, 1))
    asyncio.run(wave(250, 8))
    gc.collect()
    grown = process.memory_info().rss - before
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB over 500 requests"
    assert 0 < engine.shelf.bytes_used <= SHELF_BYTES
    for believed, held in engine.slot_kv_state():
        assert believed == held, "a slot's KV cells disagree with what the engine thinks it holds"
    assert engine.state().slots_busy == 0 and engine.state().queue_depth == 0


@pytest.mark.parametrize("model", ["tiny", "q4_k_m", "default, q8_0 KV cache"])
def test_other_models_are_exact_under_batching_and_reuse(request, model):
    """The converter's own tiny model (F32, default chat template), the default model's weights as Q4_K_M
    (K-quant kernels; on x86 repacked, with padded steps: without them 4 of 6 answers here changed in company,
    measured), and the default model with a q8_0 KV cache: concurrency and prefix reuse change nothing."""
    if model == "tiny":
        path = request.getfixturevalue("tiny_gguf")
    else:
        path = request.getfixturevalue("default_gguf") if model.startswith("default") else request.getfixturevalue(
            "requantized_gguf")(model)
    other = Engine(path, name=model, slots=3, ctx_per_slot=256, prefill_chunk=16,
                   kv_type="q8_0" if "q8_0 KV" in model else DEFAULT_KV_TYPE)
    try:
        async def scenario():
            requests = [Request(prompt=chat_tokens(other, [{"role": "user", "content": q}]), sampling=GREEDY,
                                max_tokens=24) for q in QUESTIONS]
            alone = [await run(other, r) for r in requests]
            together = await asyncio.gather(*(run(other, r) for r in requests))
            return alone, together

        alone, together = asyncio.run(scenario())
        assert [text for text, _ in together] == [text for text, _ in alone]
        assert all(finished.completion_tokens > 0 for _, finished in alone)
        assert any(finished.cached_tokens > 0 for _, finished in together)  # the chat template's shared opening
        # no step asked for more logits than llama.cpp's buffers hold (OUTPUTS_PER_SLOT per slot; the context
        # refuses such a batch as a failed step, where llama.cpp would abort)
        assert other.stats.decode_errors == 0
        if model == "q4_k_m" and other.context.repack == "padded":  # x86: repacked Q4_K, steps padded to 4 rows
            assert other.stats.throwaway_rows > 0
    finally:
        other.close()


def test_a_short_prompt_read_beside_a_long_one_starts_its_answer_from_its_own_last_row(requantized_gguf):
    """Padded steps (repacked Q4_K on x86) give every prompt of a step a piece as long as the first one's; a
    short prompt's piece is mostly throwaway rows, and the rows that ask for logits must still hold its last
    real one (else llama.cpp has no logits to sample from and aborts the process)."""
    padded = Engine(requantized_gguf("q4_k_m"), name="q4_k_m", slots=2, ctx_per_slot=256, prefill_chunk=128)
    try:
        long = padded.tokenize("Rivers carry water from the mountains down to the sea, and along the way they "
                               "shape valleys, feed farms and give towns their", add_special=True)
        short = padded.tokenize("The capital of France is", add_special=True)
        requests = [Request(prompt=p, sampling=GREEDY, max_tokens=8) for p in (long, short)]

        async def scenario():  # together first, while nothing is cached: both prompts are read in one step
            together = await asyncio.gather(*(run(padded, r) for r in requests))
            alone = [await run(padded, r) for r in requests]
            return alone, together

        alone, together = asyncio.run(scenario())
        assert len(long) - len(short) >= ROW_GROUP  # the short prompt's piece has 4 throwaway rows or more
        assert [text for text, _ in together] == [text for text, _ in alone]
        assert padded.stats.decode_errors == 0
    finally:
        padded.close()


def test_one_slot_sends_every_row_of_repacked_k_quants_through_one_kernel(requantized_gguf):
    """A single-slot server (one student's machine) never pads, which would throw three of every four rows
    away: it reads in micro-batches of 3 rows, which every one takes the repacked gemv kernel. A question asked
    again from the cache, and a second turn over an answer's cells (evaluated one by one as it was sampled),
    answer what a fresh server answers cold, which reads both conversations as prompts."""
    def conversation(engine, turns):
        return Request(prompt=chat_tokens(engine, turns), sampling=GREEDY, max_tokens=24)

    first = [{"role": "user", "content": QUESTIONS[0]}]
    warm = Engine(requantized_gguf("q4_k_m"), name="q4_k_m", slots=1, ctx_per_slot=512, prefill_chunk=16)
    try:
        if warm.context.repack != "gemv":
            pytest.skip("Q4_K weights are repacked into gemm and gemv kernels only on x86")
        assert warm.context.ubatch_rows == GEMV_UBATCH_ROWS
        (answer, _), (again, finished) = (asyncio.run(run(warm, conversation(warm, first))),
                                          asyncio.run(run(warm, conversation(warm, first))))
        assert again == answer and finished.cached_tokens > 0
        second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]
        follow_up, finished = asyncio.run(run(warm, conversation(warm, second)))
        assert finished.cached_tokens > len(conversation(warm, first).prompt)  # the answer's cells were reused
        assert warm.stats.throwaway_rows == 0 and warm.stats.decode_errors == 0
    finally:
        warm.close()
    cold = Engine(requantized_gguf("q4_k_m"), name="q4_k_m", slots=1, ctx_per_slot=512, prefill_chunk=64)
    try:
        assert asyncio.run(run(cold, conversation(cold, second)))[0] == follow_up
    finally:
        cold.close()


# A class of TILED_MIN_SLOTS in a process of its own (ggml reads its tiled-matmul switches once per process):
# each question alone, then all together; and, on a context of as many slots, hashes of one row's logits in
# steps of 4, 8 and 16 rows, whose Q6_K multiplications the tiled kernel takes at every row count when forced,
# at 8 rows or more when on (ggml's default), and never when off.
_CLASS = r"""
import asyncio, ctypes, hashlib, json, sys
from pathlib import Path
from parrot_edge import llamacpp
from parrot_edge.api.chat_template import render_chat
from parrot_edge.engine.context import TILED_MIN_SLOTS, context_params
from parrot_edge.engine.requests import Finished, Request
from parrot_edge.engine.sampling import SamplingParams
from parrot_edge.engine.scheduler import Engine
path, tiled, questions = Path(sys.argv[1]), sys.argv[2] == "forced", json.loads(sys.argv[3])
engine = Engine(path, name="q4_k_m", slots=TILED_MIN_SLOTS, ctx_per_slot=256, prefill_chunk=64, tiled=tiled)
async def answer(question):
    info = engine.info
    text = render_chat(info.chat_template, [{"role": "user", "content": question}], bos_token=info.bos_text,
                       eos_token=info.eos_text)
    prompt = engine.tokenize(text, add_special=False)
    generation = engine.submit(Request(prompt=prompt, sampling=SamplingParams(temperature=0), max_tokens=24))
    parts = []
    while not isinstance(event := await generation.events.get(), Finished):
        parts.append(event.text)
    return "".join(parts)
async def together():
    return await asyncio.gather(*(answer(q) for q in questions))
alone = [asyncio.run(answer(q)) for q in questions]
result = {"tiled": engine.context.tiled, "repack": engine.context.repack, "alone": alone,
          "together": asyncio.run(together()), "errors": engine.stats.decode_errors}
engine.close()
llama = llamacpp.lib()
model = llamacpp.load_model(path)
ctx = llama.llama_init_from_model(model, context_params(llama, slots=TILED_MIN_SLOTS, ctx_per_slot=64,
                                                         prefill_chunk=64))
n_vocab, memory = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model)), llama.llama_get_memory(ctx)
batch = llamacpp.Batch(2 * TILED_MIN_SLOTS)
def decode(runs, logits):
    batch.clear()
    for tokens, first, seq in runs:
        batch.add(tokens, first, seq, logits=logits)
    assert llama.llama_decode(ctx, batch.raw) == 0
for seq in range(TILED_MIN_SLOTS):
    decode([(list(range(300 + 8 * seq, 308 + 8 * seq)), 0, seq)], logits=False)
result["logits"] = {}
for rows in (4, 8, TILED_MIN_SLOTS):  # a padded step of `rows` students: sequence 0's next token, with company
    decode([([500 + seq], 8, seq) for seq in range(rows)], logits=True)
    logits = ctypes.string_at(llama.llama_get_logits_ith(ctx, 0), 4 * n_vocab)
    result["logits"][rows] = hashlib.sha1(logits).hexdigest()
    for seq in range(rows):
        llama.llama_memory_seq_rm(memory, seq, 8, -1)
print(json.dumps(result))
"""


def test_a_large_class_forces_the_tiled_matmul_and_stays_exact(requantized_gguf):
    """A server of TILED_MIN_SLOTS slots over padded repacked Q4_K weights forces ggml's tiled matmul for the
    Q6_K weights (llamacpp.force_tiled_matmul): answers in company equal answers alone, and the forced kernel is
    really the one multiplying (its logits differ from vec_dot's, which a process without it runs)."""
    path = requantized_gguf("q4_k_m")
    if llamacpp.repack_policy(path) != "padded":
        pytest.skip("Q4_K weights are repacked (and steps padded) only on x86")

    def run_class(tiled: str) -> dict:
        done = subprocess.run([sys.executable, "-c", _CLASS, str(path), tiled, json.dumps(QUESTIONS)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    forced, off = run_class("forced"), run_class("off")
    assert forced["tiled"] and not off["tiled"] and forced["repack"] == "padded"
    assert forced["together"] == forced["alone"] and forced["errors"] == 0
    assert all(forced["alone"])
    assert len(set(forced["logits"].values())) == 1, forced["logits"]  # a row's logits do not depend on its company
    assert forced["logits"] != off["logits"], "forcing the tiled matmul changed no multiplication"


def test_llama_threads_default_to_the_cpus_this_process_may_use():
    params = context_params(llamacpp.lib(), slots=2, ctx_per_slot=256, prefill_chunk=64)
    assert params.n_threads == params.n_threads_batch == len(os.sched_getaffinity(0))
    assert context_params(llamacpp.lib(), slots=2, ctx_per_slot=256, prefill_chunk=64, threads=1).n_threads == 1


def test_a_request_that_times_out_in_the_queue_leaves_it_with_nothing_generated(default_gguf):
    """What the API answers 503 for: the engine says the request left the queue and was never admitted."""
    small = Engine(default_gguf, name="small", slots=1, ctx_per_slot=512)
    try:
        async def scenario():
            holder = small.submit(Request(prompt=chat_tokens(small, [{"role": "user", "content": "Tell a story."}]),
                                          sampling=SamplingParams(temperature=0, logit_bias=NO_END), max_tokens=400))
            await holder.admitted_event.wait()
            queued = small.submit(Request(prompt=holder.request.prompt, max_tokens=4,
                                          deadline=time.monotonic() + 0.2))
            await asyncio.wait_for(queued.admitted_event.wait(), 60)  # it leaves the queue by timing out
            finished = queued.events.get_nowait()
            small.cancel(holder)
            await until_finished(holder)
            return queued, finished

        queued, finished = asyncio.run(scenario())
        assert queued.admitted == 0 and finished.reason == "timeout" and finished.completion_tokens == 0
    finally:
        small.close()


def test_a_failed_step_fails_only_the_request_that_caused_it(engine):
    """llama_decode refuses a batch holding a token id the model does not have: only that request ends in an
    error; the others, in the same step, are tried again one by one and answer exactly as alone."""
    bad = Request(prompt=[1, 2, engine.info.n_vocab + 7], sampling=GREEDY, max_tokens=8)

    async def scenario():
        alone = [await run(engine, ask(engine, q)) for q in QUESTIONS[:3]]
        together = await asyncio.gather(run(engine, bad), *(run(engine, ask(engine, q)) for q in QUESTIONS[:3]))
        return alone, together

    isolated_before = engine.stats.isolated_steps
    alone, together = asyncio.run(scenario())
    (_, failed), *others = together
    assert failed.reason == "error" and "llama_decode" in failed.error
    assert [text for text, _ in others] == [text for text, _ in alone]
    assert engine.stats.isolated_steps > isolated_before, "the bad request never shared a step with the others"
    for believed, held in engine.slot_kv_state():
        assert believed == held


def test_a_wedged_worker_is_reported_stalled(default_gguf):
    """/health's source: with work waiting and a worker that cannot move (here: its lock held), the engine
    reports how long it has not made progress, without waiting for that lock itself."""
    small = Engine(default_gguf, name="small", slots=1, ctx_per_slot=256)
    try:
        assert small.state().stalled_seconds == 0 and small.state().worker_alive
        with small._wake:  # the worker cannot take a request, nor step
            asyncio.run(_submit_only(small))
            deadline = time.monotonic() + 60
            while (state := small.state()).stalled_seconds < 1.0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state.stalled_seconds >= 1.0 and state.queue_depth == 1
    finally:
        small.close()


async def _submit_only(engine: Engine) -> None:
    engine.submit(Request(prompt=engine.tokenize("Hello", add_special=True), max_tokens=2))


def test_a_token_longer_than_the_piece_buffer_is_not_cut(engine):
    """Pieces come through a reused buffer (256 bytes); a longer one makes it grow instead of being dropped.
    No token of the default model is that long, so the buffer is made 1 byte here."""
    import ctypes

    token = engine.tokenize(" international", add_special=False, parse_special=False)
    assert len(token) == 1
    engine.context._piece = ctypes.create_string_buffer(1)
    assert engine.context.piece(token[0]) == b" international"
    assert len(engine.context._piece) >= len(b" international")
