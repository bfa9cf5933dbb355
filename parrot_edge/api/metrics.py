"""Prometheus metrics in the text exposition format, without a client library.

Only what an operator of a classroom server asks: how many requests and how they ended, tokens in and
out, how long students wait for the first word, how fast answers stream, and how full the engine is.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return "{" + inner + "}"


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._values[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(dict(key))} {value:g}" for key, value in sorted(self._values.items())]
        if not self._values:
            lines.append(f"{self.name} 0")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sum += value

    def observe_many(self, value: float, count: int) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += count
        self._sum += value * count

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self._counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        lines += [f"{self.name}_sum {self._sum:g}", f"{self.name}_count {running}"]
        return lines


# What /metrics shows of the engine's snapshot: (metric, snapshot key, Prometheus type, help).
ENGINE_STATE = (
    ("parrot_edge_slots_total", "slots_total", "gauge", "Sequences served at once."),
    ("parrot_edge_slots_busy", "slots_busy", "gauge", "Slots generating or reading a prompt."),
    ("parrot_edge_queue_depth", "queue_depth", "gauge", "Requests waiting for a slot."),
    ("parrot_edge_model_loaded", "loaded", "gauge", "1 once the model is ready."),
    ("parrot_edge_engine_steps_total", "steps", "counter", "llama_decode calls."),
    ("parrot_edge_reevaluated_tokens_total", "reevaluated_tokens", "counter",
     "Cached tokens evaluated again (to the same values) to keep batching exact or join micro-batches."),
    ("parrot_edge_guessed_rows_total", "guessed_rows", "counter",
     "Companion rows that were a guess of the next token (a lone student past 256 cells)."),
    ("parrot_edge_guessed_tokens_total", "guessed_tokens", "counter", "Guesses that were right: a token for free."),
    ("parrot_edge_borrowed_tokens_total", "borrowed_tokens", "counter", "Prompt tokens copied from another slot."),
    ("parrot_edge_shelved_total", "shelved", "counter", "Conversations put aside when their slot was reused."),
    ("parrot_edge_unshelved_total", "unshelved", "counter", "Shelved conversations copied back into a slot."),
)


class Metrics:
    """Everything /metrics shows. Updated from the event loop; rendered under a lock with the gauges."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = Counter("parrot_edge_requests_total", "Requests by endpoint and outcome.")
        self.prompt_tokens = Counter("parrot_edge_prompt_tokens_total", "Prompt tokens received.")
        self.cached_tokens = Counter("parrot_edge_prompt_tokens_cached_total",
                                     "Prompt tokens not evaluated: kept in a slot, restored from the shelf, "
                                     "or borrowed from another slot.")
        self.completion_tokens = Counter("parrot_edge_completion_tokens_total", "Tokens generated.")
        self.ttft = Histogram("parrot_edge_time_to_first_token_seconds", "Arrival to first token, queueing included.",
                              (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.decode_speed = Histogram("parrot_edge_decode_tokens_per_second", "Per-request streaming speed.",
                                      (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200))

    def record_request(self, endpoint: str, outcome: str) -> None:
        with self.lock:
            self.requests.inc(endpoint=endpoint, outcome=outcome)

    def record_generation(self, finished) -> None:
        with self.lock:
            self.prompt_tokens.inc(finished.prompt_tokens)
            self.cached_tokens.inc(finished.cached_tokens)
            self.completion_tokens.inc(finished.completion_tokens)
            if finished.completion_tokens:
                self.ttft.observe((finished.queued_ms + finished.prompt_ms) / 1000)
            if finished.completion_tokens > 1:
                self.decode_speed.observe(finished.decode_tokens_per_second)

    def render(self, engine_state: dict | None, batch_sizes: dict[int, int]) -> str:
        lines: list[str] = []
        with self.lock:
            for metric in (self.requests, self.prompt_tokens, self.cached_tokens, self.completion_tokens,
                           self.ttft, self.decode_speed):
                lines += metric.render()
        batches = Histogram("parrot_edge_batch_tokens", "Tokens per llama_decode call.",
                            (1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        for size, count in batch_sizes.items():
            batches.observe_many(size, count)
        lines += batches.render()
        state = engine_state or {}
        for name, key, kind, help in ENGINE_STATE:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {int(state.get(key, 0))}"]
        return "\n".join(lines) + "\n"
