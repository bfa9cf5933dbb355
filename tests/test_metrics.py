"""/metrics' text, read back with prometheus_client's own parser (what a scraper does): the engine's state and
the requests' figures come out as the operator's dashboards expect them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from parrot_edge.api.metrics import ENGINE_COUNTERS, Metrics
from parrot_edge.engine.requests import EngineState, EngineStats, Finished


def scraped(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample: (name, sorted labels) → value."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for sample in family.samples}


def finished(**figures) -> Finished:
    return Finished(**{"reason": "stop", "prompt_tokens": 30, "completion_tokens": 11, "cached_tokens": 0,
                       "reused_tokens": 20, "queued_ms": 100.0, "prompt_ms": 200.0, "decode_ms": 1000.0} | figures)


def test_while_the_model_loads_the_engine_figures_are_zero():
    samples = scraped(Metrics(lambda: None))
    assert samples[("parrot_edge_model_loaded", ())] == 0
    assert samples[("parrot_edge_slots_busy", ())] == 0
    assert samples[("parrot_edge_batch_tokens_count", ())] == 0


def test_the_engine_state_and_the_requests_figures():
    stats = EngineStats(steps=7, guessed_rows=3, shelved=2, paused=1)
    state = EngineState(slots_total=4, slots_busy=3, queue_depth=2, queue_size=64, ctx_per_slot=1024, stats=stats,
                        batch_sizes={1: 5, 4: 2}, worker_alive=True, stalled_seconds=0.0)
    metrics = Metrics(lambda: state)
    metrics.record_request("chat", "ok")
    metrics.record_request("chat", "ok")
    metrics.record_request("completions", "too_many")
    metrics.record_generation(finished())
    samples = scraped(metrics)

    assert samples[("parrot_edge_model_loaded", ())] == 1
    assert (samples[("parrot_edge_slots_total", ())], samples[("parrot_edge_slots_busy", ())],
            samples[("parrot_edge_queue_depth", ())]) == (4, 3, 2)
    for name, attribute, _ in ENGINE_COUNTERS:  # every counter of the engine, under its documented name
        assert samples[(name + "_total", ())] == getattr(stats, attribute), name
    assert samples[("parrot_edge_requests_total", (("endpoint", "chat"), ("outcome", "ok")))] == 2
    assert samples[("parrot_edge_requests_total", (("endpoint", "completions"), ("outcome", "too_many")))] == 1
    assert samples[("parrot_edge_prompt_tokens_total", ())] == 30
    assert samples[("parrot_edge_prompt_tokens_cached_total", ())] == 20  # every reuse, whoever's cache it was
    assert samples[("parrot_edge_completion_tokens_total", ())] == 11
    # one request: 0.3 s to its first token (queued + prompt), 10 tokens in 1 s after it
    assert samples[("parrot_edge_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 0
    assert samples[("parrot_edge_time_to_first_token_seconds_bucket", (("le", "0.5"),))] == 1
    assert samples[("parrot_edge_decode_tokens_per_second_sum", ())] == 10
    # the batch histogram: 5 steps of 1 row and 2 of 4
    assert samples[("parrot_edge_batch_tokens_bucket", (("le", "1"),))] == 5
    assert samples[("parrot_edge_batch_tokens_bucket", (("le", "4"),))] == 7
    assert samples[("parrot_edge_batch_tokens_sum", ())] == 13


def test_a_request_that_generated_nothing_is_not_a_first_token():
    metrics = Metrics(lambda: None)
    metrics.record_generation(finished(reason="timeout", completion_tokens=0, decode_ms=0.0))
    samples = scraped(metrics)
    assert samples[("parrot_edge_time_to_first_token_seconds_count", ())] == 0
    assert samples[("parrot_edge_decode_tokens_per_second_count", ())] == 0
