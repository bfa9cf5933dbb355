"""Handing the worker thread's events to the asyncio side: once per step, not once per token."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from parrot_edge.engine.requests import Delta, Finished, Generation

# After handing a step's events for several streams over, wait (at most this long) for the asyncio side to
# send them before the next llama_decode: on a small machine, streaming concurrently with decoding steals a
# core from llama.cpp's threads, which then wait for each other at every operation.
HANDOFF_WAIT = 0.005


class Outbox:
    """The worker's events of one step, delivered together (one wake-up per event loop)."""

    def __init__(self):
        self._events: list[tuple[Generation, Delta | Finished | None]] = []

    def post(self, generation: Generation, event: Delta | Finished | None) -> None:
        """Queue an event for the generation's reader; None: it has left the queue (sets `admitted_event`)."""
        self._events.append((generation, event))

    def deliver(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Delta | Finished | None]]] = {}
        for generation, event in self._events:
            by_loop.setdefault(generation.loop, []).append((generation, event))
        streams = len({generation for generation, _ in self._events})
        self._events = []
        if not by_loop:
            return
        handled = threading.Event()
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, events, handled)
        if streams > 1:  # one stream's chunk costs the asyncio side less than waiting for it would
            handled.wait(HANDOFF_WAIT)


def _put_all(events: list[tuple[Generation, Delta | Finished | None]], handled: threading.Event) -> None:
    for generation, event in events:
        if event is None:
            generation.admitted_event.set()
        else:
            generation.events.put_nowait(event)
    # Queued after the readers these events wake: runs once they have sent their chunks.
    asyncio.get_running_loop().call_soon(handled.set)
