"""Converted seed models serve: the engine's exactness rules hold on architectures other than `llama`, and
`parrot-edge serve` answers from a converted Parakeet.

The rules (tests/test_engine.py's test_other_models_are_exact_under_batching_and_reuse, on `llama`): with
temperature 0 an answer is the same alone or among others, and whether its prompt came from the cache
(a shared system prompt, borrowed) or was evaluated cold. Checked here on a Parakeet-shaped `mpt` (ALiBi,
no RoPE: the KV mask carries −|i − j|, which a copied or shelved cell keeps) and ParrotLLM-shaped
`plamo3` (Peri-LN, q/k norms) and `hunyuan-dense`.
"""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
from seed_checkpoints import parakeet_state, parrotllm_state, save_parakeet, save_parrotllm
from serving import run_server

from parrot_edge.api.chat_template import render_chat
from parrot_edge.converters.convert import convert, open_source
from parrot_edge.engine.requests import Finished, Request
from parrot_edge.engine.sampling import SamplingParams
from parrot_edge.engine.scheduler import Engine

QUESTIONS = ["What is the capital of France?", "¿Cuál es la capital de España?", "Write a haiku about rain.",
             "Name three colors.", "¿Por qué el cielo es azul?"]
SYSTEM = "You are a patient tutor for children. Answer simply, in the student's language."


@pytest.fixture(scope="module")
def converted(tmp_path_factory, cl100k_file, gpt2_vocabulary):
    made = {}

    def make(kind: str, quant: str = "f32"):
        if (kind, quant) not in made:
            root = tmp_path_factory.mktemp(kind)
            if kind == "parakeet":
                path = save_parakeet(root, parakeet_state(n_layers=2))
                tokenizer = cl100k_file
            else:
                path = save_parrotllm(root, parrotllm_state(kind.removeprefix("parrotllm-")))
                tokenizer = gpt2_vocabulary / "vocab.json"
            checkpoint, vocabulary = open_source(path, None, None, tokenizer)
            made[kind, quant] = root / f"{kind}-{quant}.gguf"
            convert(checkpoint, vocabulary, made[kind, quant], quant, progress=lambda _: None)
        return made[kind, quant]
    return make


async def _answer(engine: Engine, request: Request) -> tuple[str, Finished]:
    generation = engine.submit(request)
    parts = []
    while not isinstance(event := await generation.events.get(), Finished):
        parts.append(event.text)
    return "".join(parts), event


@pytest.mark.parametrize("kind", ["parakeet", "parrotllm-3", "parrotllm-2"])
def test_answers_are_equal_alone_together_and_cached(converted, kind):
    engine = Engine(converted(kind), name=kind, slots=3, ctx_per_slot=256, prefill_chunk=16)
    try:
        info = engine.info

        def request(question: str) -> Request:
            text = render_chat(info.chat_template, [{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": question}],
                               bos_token=info.bos_text, eos_token=info.eos_text)
            return Request(prompt=engine.tokenize(text, add_special=False), sampling=SamplingParams(temperature=0),
                           max_tokens=20)

        async def scenario():
            alone = [await _answer(engine, request(q)) for q in QUESTIONS]
            together = await asyncio.gather(*(_answer(engine, request(q)) for q in QUESTIONS))
            again = [await _answer(engine, request(q)) for q in reversed(QUESTIONS)]
            return alone, together, again[::-1]

        alone, together, again = asyncio.run(scenario())
        assert [t for t, _ in together] == [t for t, _ in alone] == [t for t, _ in again]
        assert all(finished.completion_tokens > 0 for _, finished in alone)
        assert any(finished.cached_tokens > 0 for _, finished in together + again)  # the system prompt, reused
        assert max(engine.batch_sizes) > 1
    finally:
        engine.close()


def test_parrot_edge_serve_answers_from_a_converted_parakeet(converted, tmp_path):
    model = tmp_path / "parakeet.gguf"
    for suffix in (".gguf", ".json"):
        shutil.copy(converted("parakeet", "q4_0").with_suffix(suffix), model.with_suffix(suffix))
    with run_server(tmp_path, "--model", str(model), "--slots", "2", "--ctx", "256") as server:
        served = httpx.get(f"{server.api}/models", timeout=30).json()["data"][0]["id"]
        reply = httpx.post(f"{server.api}/chat/completions", timeout=120, json={
            "model": served, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "¿Qué es un volcán?"}]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] > 0
    assert body["usage"]["prompt_tokens"] > 10
