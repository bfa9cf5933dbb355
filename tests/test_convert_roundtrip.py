"""Round trip on real trained weights: the default model's GGUF → HF checkpoint → parrot-edge convert F32.

The rebuilt checkpoint (dequantised SmolLM2-135M, its real byte-level BPE tokenizer) is what
`parrot-edge bench convert` converts. Converting it back must compute what the dequantised weights
compute, and its tokenizer.json must tokenise exactly as the original GGUF does in llama.cpp.
"""

from __future__ import annotations

import numpy as np
import pytest
from converter_fixtures import TEXTS

from parrot_edge.converters.convert import convert, open_source
from parrot_edge.converters.from_gguf import hf_checkpoint_from_gguf
from parrot_edge.converters.gguf_eval import gguf_logits, gguf_tokenize
from parrot_edge.converters.verify import verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rebuilt(default_gguf, tmp_path_factory):
    directory = hf_checkpoint_from_gguf(default_gguf, tmp_path_factory.mktemp("smollm2-hf"))
    return directory, *open_source(directory, None, None, None)


def test_rebuilt_tokenizer_matches_the_original_gguf(rebuilt, default_gguf):
    from tokenizers import Tokenizer

    directory, _, vocabulary = rebuilt
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert vocabulary.metadata["tokenizer.ggml.pre"] == "smollm"
    assert gguf_tokenize(default_gguf, TEXTS) == [tokenizer.encode(text).ids for text in TEXTS]


def test_f32_round_trip_computes_the_dequantised_model(rebuilt, default_gguf, tmp_path):
    _, checkpoint, vocabulary = rebuilt
    output = tmp_path / "smollm2-f32.gguf"
    convert(checkpoint, vocabulary, output, "f32", progress=lambda _: None)
    report = verify(checkpoint, vocabulary, output, TEXTS, threads=1)
    assert report.figures.passed and report.figures.max_abs_dlogit < 1e-3, report.lines()
    assert report.tokenizer_matches == len(TEXTS)
    # and it is the same model as the original Q4_1 file (which also rounds activations to 8 bits)
    ids = [vocabulary.encode(text) for text in TEXTS]
    ours, original = gguf_logits(output, ids, threads=1), gguf_logits(default_gguf, ids, threads=1)
    agreement = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, original, strict=True)]))
    assert agreement >= 0.9, agreement
