"""The benchmarks' own measurements run where they are least used to: one student, one slot (real llama.cpp).

Both ask llama.cpp for logits, whose buffers the engine's contexts size for a step's 4 rows per slot; a
measurement that asked for more would abort the process inside llama.cpp (GGML_ASSERT)."""

from __future__ import annotations

import re

from parrot_edge.bench.memory import kv_tolerance
from parrot_edge.bench.serving import raw_decode_speed
from parrot_edge.engine.kv_cache import KV_TYPES


def test_raw_decode_measures_one_student(default_gguf):
    assert raw_decode_speed(default_gguf, 1, threads=2, steps=4) > 0


def test_the_kv_caches_tolerance_is_measured_on_a_one_slot_context(default_gguf):
    report = kv_tolerance(default_gguf)
    measured = dict(re.findall(r"(\S+): max \|Δlogit\| [\d.]+, top-1 agreement ([\d.]+)%", report))
    assert set(measured) == set(KV_TYPES) and all(float(top1) > 90 for top1 in measured.values())
