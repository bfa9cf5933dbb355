"""/metrics: what an operator of a classroom server asks, in Prometheus' text format (prometheus_client).

How many requests and how they ended, tokens in and out, how long students wait for the first word, how fast
answers stream, and how full and how busy the engine is. Each server has its own registry (no global state),
and the engine's figures are read from it when scraped, not copied on every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from parrot_edge.engine.requests import EngineState, Finished

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# The engine's gauges and counters: (metric, EngineState or EngineStats attribute, help).
ENGINE_GAUGES = (
    ("parrot_edge_slots_total", "slots_total", "Sequences served at once."),
    ("parrot_edge_slots_busy", "slots_busy", "Slots generating or reading a prompt."),
    ("parrot_edge_queue_depth", "queue_depth", "Requests waiting for a slot."),
)
ENGINE_COUNTERS = (
    ("parrot_edge_engine_steps", "steps", "llama_decode calls."),
    ("parrot_edge_reevaluated_tokens", "reevaluated_tokens",
     "Cached tokens evaluated again (to the same values) to keep batching exact or join micro-batches."),
    ("parrot_edge_throwaway_rows", "throwaway_rows",
     "Rows evaluated only to fill a group of 4 for repacked K-quant weights, then removed (padding.py)."),
    ("parrot_edge_guessed_rows", "guessed_rows",
     "Companion rows that were a guess of the next token (a lone student past 256 cells)."),
    ("parrot_edge_guessed_tokens", "guessed_tokens", "Guesses that were right: a token for free."),
    ("parrot_edge_borrowed_tokens", "borrowed_tokens", "Prompt tokens copied from another slot."),
    ("parrot_edge_shelved", "shelved", "Conversations put aside when their slot was reused."),
    ("parrot_edge_unshelved", "unshelved", "Shelved conversations copied back into a slot."),
    ("parrot_edge_paused_answers", "paused", "Answers paused to give their slot to a stronger claim (fairness)."),
)


class EngineCollector:
    """The engine's state, read when /metrics is scraped (zeros while the model loads)."""

    def __init__(self, engine_state: Callable[[], EngineState | None]):
        self._engine_state = engine_state

    def collect(self) -> Iterator[Metric]:
        state = self._engine_state()
        yield GaugeMetricFamily("parrot_edge_model_loaded", "1 once the model is ready.", value=int(bool(state)))
        for name, attribute, help in ENGINE_GAUGES:
            yield GaugeMetricFamily(name, help, value=getattr(state, attribute) if state else 0)
        for name, attribute, help in ENGINE_COUNTERS:
            yield CounterMetricFamily(name, help, value=getattr(state.stats, attribute) if state else 0)
        yield _batch_histogram(state.batch_sizes if state else {})


def _batch_histogram(batch_sizes: dict[int, int]) -> HistogramMetricFamily:
    cumulative = [("+Inf" if bound == float("inf") else str(bound),
                   sum(count for size, count in batch_sizes.items() if size <= bound))
                  for bound in (*BATCH_BUCKETS, float("inf"))]
    total = sum(size * count for size, count in batch_sizes.items())
    return HistogramMetricFamily("parrot_edge_batch_tokens", "Tokens per llama_decode call.", buckets=cumulative,
                                 sum_value=total)


class Metrics:
    """Everything /metrics shows. Updated from the event loop."""

    def __init__(self, engine_state: Callable[[], EngineState | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        kw = {"registry": self.registry}
        self.requests = Counter("parrot_edge_requests", "Requests by endpoint and outcome.", ["endpoint", "outcome"],
                                **kw)
        self.prompt_tokens = Counter("parrot_edge_prompt_tokens", "Prompt tokens received.", **kw)
        self.cached_tokens = Counter("parrot_edge_prompt_tokens_cached",
                                     "Prompt tokens not evaluated: kept in a slot, restored from the shelf, or "
                                     "borrowed from another slot.", **kw)
        self.completion_tokens = Counter("parrot_edge_completion_tokens", "Tokens generated.", **kw)
        self.ttft = Histogram("parrot_edge_time_to_first_token_seconds", "Arrival to first token, queueing included.",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), **kw)
        self.decode_speed = Histogram("parrot_edge_decode_tokens_per_second", "Per-request streaming speed.",
                                      buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200), **kw)
        self.registry.register(EngineCollector(engine_state))

    def record_request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def record_generation(self, finished: Finished) -> None:
        self.prompt_tokens.inc(finished.prompt_tokens)
        self.cached_tokens.inc(finished.reused_tokens)  # all of them: the figure for the operator, not a client
        self.completion_tokens.inc(finished.completion_tokens)
        if finished.completion_tokens:
            self.ttft.observe((finished.queued_ms + finished.prompt_ms) / 1000)
        if finished.completion_tokens > 1:
            self.decode_speed.observe(finished.decode_tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
