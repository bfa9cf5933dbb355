"""Converted GGUFs, run by llama.cpp, against the independent implementations of every family.

F32 must match transformers / litgpt to float32 rounding (max |Δlogit| ≤ 1e-3; measured 4e-6 to 8e-5),
F16 and BF16 closely (≤ 0.1 and ≤ 0.5; measured ≤ 0.043 and ≤ 0.31). Q8_0 and Q4_K_M must load and keep
the same most likely next token on ≥ 90% / ≥ 65% of positions (measured 97-100% and 72-89% on these
random models). Shapes that do not fit a quant type's blocks fall back per tensor, and the conversion
says which.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from converter_fixtures import (
    TEXTS,
    hf_llama,
    hf_logits,
    lit_config,
    lit_logits,
    litgpt_checkpoint,
    tinyllama_checkpoint,
    train_sentencepiece,
)

from parrot_edge.converters.convert import convert, open_source
from parrot_edge.converters.gguf_eval import gguf_logits
from parrot_edge.converters.quantize import fallbacks
from parrot_edge.converters.verify import verify
from parrot_edge.store.gguf_check import read_header

# name → builder(directory) returning a function from token ids to the true logits
CASES = {
    "hf-gqa-hd64": lambda d: _hf(d, heads=4, kv_heads=2),
    "hf-bin-shards-hd32-linear-rope": lambda d: _hf(d, heads=8, kv_heads=2, ff=768, safetensors=False,
                                                    shard_size="1MB", rope_scaling={"rope_type": "linear",
                                                                                    "factor": 2.0}),
    "hf-mqa-hd48-tied": lambda d: _hf(d, heads=4, kv_heads=1, head_dim=48, tied=True),
    "litgpt-gqa-hd32": lambda d: _lit(litgpt_checkpoint(d, lit_config(500, n_head=8, n_query_groups=2))),
    "tinyllama-gqa-hd64-rope-x4": lambda d: _lit(tinyllama_checkpoint(d, lit_config(500, n_head=4, n_query_groups=2,
                                                                                  condense_ratio=4))),
}


def _hf(directory, **shape):
    model = hf_llama(directory, vocab_size=500, **shape)
    return lambda ids: hf_logits(model, ids)


def _lit(model):
    return lambda ids: lit_logits(model, ids)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tokenizer_model):
    directory = tmp_path_factory.mktemp(request.param)
    truth = CASES[request.param](directory / "checkpoint")
    shutil.copy(tokenizer_model, directory / "checkpoint" / "tokenizer.model")
    checkpoint, vocabulary = open_source(directory / "checkpoint", None, None, None)
    return directory, checkpoint, vocabulary, truth


def _converted(case, quant: str) -> Path:
    directory, checkpoint, vocabulary, _ = case
    output = directory / f"model-{quant}.gguf"
    if not output.exists():
        convert(checkpoint, vocabulary, output, quant, progress=lambda _: None)
    return output


def _against_truth(case, path: Path) -> tuple[float, float]:
    """(max |Δlogit|, top-1 agreement) of llama.cpp on `path` vs the independent implementation."""
    _, _, vocabulary, truth = case
    token_lists = [vocabulary.encode(text) for text in TEXTS]
    ours = gguf_logits(path, token_lists, threads=1)
    diffs, agree, total = [], 0, 0
    for ids, logits in zip(token_lists, ours, strict=True):
        expected = truth(ids)[:, : logits.shape[1]]
        got = torch.from_numpy(logits)[:, : expected.shape[1]]
        diffs.append((got - expected).abs().max().item())
        agree += (got.argmax(-1) == expected.argmax(-1)).sum().item()
        total += len(ids)
    return max(diffs), agree / total


def test_f32_matches_the_independent_implementation(case):
    path = _converted(case, "f32")
    max_diff, top1 = _against_truth(case, path)
    assert max_diff <= 1e-3 and top1 == 1.0, (max_diff, top1)
    _, checkpoint, vocabulary, _ = case
    report = verify(checkpoint, vocabulary, path, TEXTS, threads=1)
    assert report.figures.passed and report.tokenizer_matches == len(TEXTS), report.lines()
    assert report.figures.max_abs_dlogit <= 1e-3


def test_f16_and_bf16_are_close(case):
    for quant, bound in (("f16", 0.1), ("bf16", 0.5)):
        path = _converted(case, quant)
        max_diff, top1 = _against_truth(case, path)
        assert max_diff <= bound and top1 >= 0.95, (quant, max_diff, top1)
        _, checkpoint, vocabulary, _ = case
        assert verify(checkpoint, vocabulary, path, TEXTS, threads=1).figures.passed


@pytest.mark.parametrize("quant,bound", [("q8_0", 0.90), ("q4_k_m", 0.65)])
def test_quantised_files_load_and_agree(case, quant, bound):
    path = _converted(case, quant)
    _, top1 = _against_truth(case, path)
    assert top1 >= bound, top1
    file_type = read_header(path).metadata["general.file_type"]
    assert file_type == {"q8_0": 7, "q4_k_m": 15}[quant]


@pytest.mark.parametrize("quant,ff,expected", [("q4_k_m", 320, {"Q5_0", "Q8_0"}), ("q8_0", 336, {"F16"})],
                         ids=["k-quant-needs-256", "q8_0-needs-32"])
def test_shapes_that_do_not_fit_a_block_fall_back_per_tensor(tmp_path, tokenizer_model, quant, ff, expected):
    model = hf_llama(tmp_path / "checkpoint", vocab_size=500, heads=4, kv_heads=2, ff=ff)
    shutil.copy(tokenizer_model, tmp_path / "checkpoint" / "tokenizer.model")
    checkpoint, vocabulary = open_source(tmp_path / "checkpoint", None, None, None)
    messages = []
    output = tmp_path / "out.gguf"
    convert(checkpoint, vocabulary, output, quant, progress=messages.append)
    fell_back = dict(fallbacks(output, quant))
    assert set(fell_back) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert set(fell_back.values()) <= expected
    assert any("blk.0.ffn_down.weight" in m and "do not divide" in m for m in messages), messages
    ids = vocabulary.encode(TEXTS[0])
    logits = torch.from_numpy(gguf_logits(output, [ids], threads=1)[0])
    assert (logits.argmax(-1) == hf_logits(model, ids).argmax(-1)).float().mean() >= 0.65


def test_metadata_records_the_architecture_and_the_source(case):
    directory, checkpoint, _, _ = case
    meta = read_header(_converted(case, "f32")).metadata
    files = sorted(checkpoint.source.weight_files)
    listing = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files)
    expected = hashlib.sha256(files[0].read_bytes() if len(files) == 1 else listing.encode()).hexdigest()
    assert meta["parrot_edge.source.sha256"] == expected
    assert meta["general.file_type"] == 0 and meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == 512 and meta["llama.block_count"] == 2
    assert meta["tokenizer.ggml.tokens"].length == checkpoint.n_vocab  # litgpt pads 500 → 512
    scale = {"rope-x4": 4.0, "linear-rope": 2.0}
    factor = next((f for marker, f in scale.items() if marker in directory.name), None)
    assert meta.get("llama.rope.scaling.factor") == factor
    assert meta.get("llama.attention.key_length") == (48 if "hd48" in directory.name else None)
