"""A stateful property test of the engine on a tiny converted model: random submits (of several clients, so
answers are paused and resumed), cancels and short deadlines, in any order. After every engine step, what each
slot believes its KV cells hold equals what llama.cpp holds (the engine checks it itself, `verify_cells`); at
the end everything has finished and the engine is idle."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from parrot_edge.engine.requests import Finished, QueueFull, Request, Standing
from parrot_edge.engine.sampling import SamplingParams
from parrot_edge.engine.scheduler import Engine

PROMPTS = [[1, 17, 42, 99, 7] * 3, [1, 17, 42, 99, 8], [1, 300, 301, 302] * 20, [1, 5] * 140, [1, 17, 42, 99, 7, 3]]


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf):
    engine = Engine(tiny_gguf, name="tiny", slots=3, ctx_per_slot=512, prefill_chunk=32, queue_size=4,
                    shelf_bytes=4 * 2**20, verify_cells=True)
    yield engine
    engine.close()


class EngineMachine(RuleBasedStateMachine):
    engine: Engine  # set by the test below

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.live = []  # everything submitted and accepted (finished or not: timing decides, not the rules)
        self.tries = 0

    @rule(prompt=st.sampled_from(PROMPTS), extra=st.lists(st.integers(2, 400), max_size=30),
          max_tokens=st.integers(1, 40), greedy=st.booleans(), deadline=st.sampled_from([None, 0.0, 0.05, 0.5]),
          client=st.sampled_from("abc"), standing=st.sampled_from(Standing))
    def submit(self, prompt, extra, max_tokens, greedy, deadline, client, standing):
        # several clients, some on notice or in bad standing: answers are paused for stronger claims and resumed
        sampling = SamplingParams(temperature=0) if greedy else SamplingParams(seed=7)
        ends = time.monotonic() + deadline if deadline is not None else float("inf")
        request = Request(prompt=prompt + extra, sampling=sampling, max_tokens=max_tokens, client=client,
                          standing=standing, deadline=ends)
        with contextlib.suppress(QueueFull):
            self.live.append(self.engine.submit(request, self.loop))
        self.tries += 1

    @precondition(lambda self: self.tries)
    @rule(index=st.integers(0, 30))
    def cancel(self, index):
        if self.live:  # cancelling a finished request is allowed and does nothing
            self.engine.cancel(self.live[index % len(self.live)])

    @rule(steps=st.integers(1, 5))
    def let_it_run(self, steps):
        self.loop.run_until_complete(asyncio.sleep(0.01 * steps))

    @invariant()
    def cells_always_matched_tokens(self):
        assert self.engine.stats.cell_mismatches == 0
        assert self.engine.stats.decode_errors == 0

    def teardown(self):
        async def drain():
            for generation in self.live:  # each ends exactly once, whether it finished, timed out or is cancelled
                self.engine.cancel(generation)
                while not isinstance(await asyncio.wait_for(generation.events.get(), 60), Finished):
                    pass
                assert generation.events.empty()
        self.loop.run_until_complete(drain())
        deadline = time.monotonic() + 60
        while (state := self.engine.state()).slots_busy or state.queue_depth:
            assert time.monotonic() < deadline, "the engine never drained to idle"
            time.sleep(0.01)
        self.cells_always_matched_tokens()
        for believed, held in self.engine.slot_kv_state():
            assert believed == held
        self.loop.close()


def test_the_engine_keeps_its_books_whatever_clients_do(tiny_engine):
    EngineMachine.engine = tiny_engine
    machine = EngineMachine.TestCase
    machine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None, database=None,
                                suppress_health_check=list(HealthCheck))
    machine().runTest()
