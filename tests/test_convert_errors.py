"""Bad input gets a specific message (never a traceback), and nothing half-written is left behind.

Also: verification catches a GGUF that computes something else (a skipped Q/K permutation, another
checkpoint's weights) — the worst bug a converter can have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from converter_fixtures import (
    TEXTS,
    build_bpe_tokenizer,
    hf_llama,
    lit_config,
    tinyllama_checkpoint,
    train_sentencepiece,
)
from safetensors.torch import load_file, save_file

from parrot_edge.converters.architectures import llama
from parrot_edge.converters.convert import check_quant, convert, open_source
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families import open_checkpoint
from parrot_edge.converters.verify import verify
from parrot_edge.errors import ParrotEdgeError


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture
def hf_dir(tmp_path, tokenizer_model) -> Path:
    directory = tmp_path / "hf"
    hf_llama(directory, vocab_size=500, layers=2)
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory


def _edit_weights(directory: Path, edit) -> None:
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors")


def test_no_family_matches(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(BadInput) as error:
        open_checkpoint(tmp_path)
    message = str(error.value)
    assert "matches no checkpoint family" in message and "README.md" in message
    assert all(f"{name}:" in message for name in ("hf-llama", "tinyllama", "litgpt", "parrotllm", "parakeet"))


def test_missing_and_unexpected_keys_are_listed(hf_dir):
    def edit(weights):
        del weights["model.layers.1.mlp.up_proj.weight"]
        weights["model.layers.0.self_attn.q_norm.weight"] = torch.ones(64)

    _edit_weights(hf_dir, edit)
    with pytest.raises(BadInput, match=r"missing keys \(1\): model.layers.1.mlp.up_proj.weight; unexpected keys "
                                       r"\(1\): model.layers.0.self_attn.q_norm.weight"):
        open_checkpoint(hf_dir)


def test_shapes_that_contradict_the_config(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (hf_dir / "config.json").write_text(json.dumps(config))
    expected = r"contradict the config \(4\): model.layers.0.self_attn.k_proj.weight is \[128, 256\], config implies"
    with pytest.raises(BadInput, match=expected + r" \[256, 256\]"):
        open_checkpoint(hf_dir)


def test_tokenizer_of_another_model(hf_dir):
    (hf_dir / "tokenizer.model").unlink()
    build_bpe_tokenizer(hf_dir, "gpt-2", vocab_size=600)
    with pytest.raises(BadInput, match="the tokenizer has 600 tokens but the model's embedding has 500 rows"):
        open_source(hf_dir, None, None, None)


def test_missing_tokenizer(hf_dir):
    (hf_dir / "tokenizer.model").unlink()
    with pytest.raises(BadInput, match="no tokenizer in"):
        open_source(hf_dir, None, None, None)


class NotAWeight:
    """Anything but tensors and plain containers: what weights_only refuses to unpickle."""


def test_pickle_that_is_not_plain_weights(tmp_path):
    torch.save({"model": {"transformer.wte.weight": torch.zeros(2, 2)}, "trainer": NotAWeight()},
               tmp_path / "iter-000001-ckpt.pth")
    with pytest.raises(BadInput, match=r"pickle that holds more than plain weights.*weights_only=True"):
        open_checkpoint(tmp_path / "iter-000001-ckpt.pth")


def test_legacy_torch_format(tmp_path):
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    with pytest.raises(BadInput, match="legacy"):
        open_checkpoint(tmp_path / "old.pth")


def test_truncated_safetensors(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match="truncated"):  # safe_open checks the file's length as it opens it
        checkpoint, vocabulary = open_source(hf_dir, None, None, None)
        convert(checkpoint, vocabulary, hf_dir.parent / "out.gguf", "f16", progress=lambda _: None)
    assert not list(hf_dir.parent.glob("*.gguf")) and not list(hf_dir.parent.glob(".out.gguf.*"))


def test_unknown_quant_type():
    with pytest.raises(BadInput, match="unknown quant type 'q3_k'; choose one of f32, f16, bf16, q8_0, q4_0, "
                                       "q4_1, iq4_nl, iq4_xs, q4_k_m, q5_k_m"):
        check_quant("q3_k")


def test_unwritable_output(hf_dir):
    checkpoint, vocabulary = open_source(hf_dir, None, None, None)
    (hf_dir.parent / "a-file").write_text("not a directory")
    with pytest.raises(ParrotEdgeError, match=r"cannot write to .*a-file: Not a directory") as error:
        convert(checkpoint, vocabulary, hf_dir.parent / "a-file" / "out.gguf", "f16", progress=lambda _: None)
    assert error.value.exit_code == 1
    with pytest.raises(BadInput, match=r"must end in \.gguf"):
        convert(checkpoint, vocabulary, hf_dir.parent / "out.bin", "f16", progress=lambda _: None)


def test_non_llama_configs_are_refused(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(BadInput, match=r"not support.*'rope scaling': 'llama3'"):
        open_checkpoint(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(config | {"architectures": ["MistralForCausalLM"],
                                                             "model_type": "mistral"}))
    with pytest.raises(BadInput, match="MistralForCausalLM"):
        open_checkpoint(hf_dir)


def test_tinyllama_needs_a_config(tmp_path):
    tinyllama_checkpoint(tmp_path, lit_config(500), write_config=False)
    with pytest.raises(BadInput, match=r"missing config for .*model_config\.yaml.*--config.*tiny_LLaMA_1b"):
        open_checkpoint(tmp_path)
    with pytest.raises(BadInput, match="neither a preset"):
        open_checkpoint(tmp_path, config="tiny_LLaMA_7b")
    # a preset that names a different architecture: the shapes say so
    with pytest.raises(BadInput, match=r"shapes that contradict the config"):
        open_checkpoint(tmp_path, config="tiny_LLaMA_120M")


def test_tinyllama_preset_named_in_hparams_and_wrapper_prefixes(tmp_path):
    config = lit_config(32000, n_embd=768, n_head=12, n_query_groups=1, intermediate_size=2048, n_layer=1)
    tinyllama_checkpoint(tmp_path, config, write_config=False, model_name="tiny_LLaMA_120M", prefix="_orig_mod.")
    with pytest.raises(BadInput, match=r"missing keys \(77\): transformer.h.1.norm_1.weight"):
        open_checkpoint(tmp_path)  # the preset (12 layers) came from hparams; this checkpoint has 1 layer


def test_litgpt_config_that_is_not_llama(tmp_path):
    from converter_fixtures import litgpt_checkpoint

    litgpt_checkpoint(tmp_path, lit_config(500))
    text = (tmp_path / "model_config.yaml").read_text()
    (tmp_path / "model_config.yaml").write_text(text.replace("parallel_residual: false", "parallel_residual: true"))
    with pytest.raises(BadInput, match=r"cannot represent: \{'parallel_residual': True\}"):
        open_checkpoint(tmp_path)


def test_nan_weights_leave_no_file(hf_dir, tmp_path):
    _edit_weights(hf_dir, lambda w: w["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")))
    checkpoint, vocabulary = open_source(hf_dir, None, None, None)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BadInput, match=r"blk\.1\.ffn_down\.weight holds NaN"):
        convert(checkpoint, vocabulary, out / "model.gguf", "q8_0", progress=lambda _: None)
    assert list(out.iterdir()) == []


def test_a_matrix_beyond_float16_is_quantised_from_float32(hf_dir, tmp_path):
    """The quantiser's input is F16 (as llama.cpp's own pipeline); a matrix F16 cannot hold goes in as F32 and
    keeps its value. Written as F16 itself, it is refused."""
    import gguf

    _edit_weights(hf_dir, lambda w: w["model.layers.0.mlp.up_proj.weight"].__setitem__((3, 5), 1e5))
    checkpoint, vocabulary = open_source(hf_dir, None, None, None)
    said: list[str] = []
    convert(checkpoint, vocabulary, tmp_path / "q8.gguf", "q8_0", progress=said.append)
    assert "note: blk.0.ffn_up.weight has values beyond float16's range: quantising it from float32" in said
    up = next(t for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    values = gguf.dequantize(up.data, up.tensor_type).reshape(up.shape[::-1])
    assert abs(values[3, 5] - 1e5) < 1e5 / 127  # within Q8_0's step: not float16's infinity
    with pytest.raises(BadInput, match=r"blk\.0\.ffn_up\.weight has values beyond float16's range"):
        convert(checkpoint, vocabulary, tmp_path / "f16.gguf", "f16", progress=lambda _: None)
    assert not (tmp_path / "f16.gguf").exists()


def test_interrupt_leaves_no_half_written_file(hf_dir, tmp_path, monkeypatch):
    checkpoint, vocabulary = open_source(hf_dir, None, None, None)
    tensors = checkpoint.gguf_tensors()

    def interrupted():
        raise KeyboardInterrupt

    tensors[5] = type(tensors[5])(tensors[5].name, tensors[5].shape, tensors[5].source_dtype, interrupted)
    monkeypatch.setattr(checkpoint, "gguf_tensors", lambda: tensors)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.gguf").write_bytes(b"the previous good file")
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoint, vocabulary, out / "model.gguf", "q4_k_m", progress=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]
    assert (out / "model.gguf").read_bytes() == b"the previous good file"


def test_leftovers_of_a_killed_run_are_removed(hf_dir, tmp_path):
    (tmp_path / ".model.gguf.k1ll3d.unquantised").write_bytes(b"half of an intermediate file")
    messages = []
    convert(*open_source(hf_dir, None, None, None), tmp_path / "model.gguf", "f16", progress=messages.append)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert any("left by an earlier run" in m for m in messages)


def test_verification_catches_a_skipped_permutation(hf_dir, tmp_path, monkeypatch):
    checkpoint, vocabulary = open_source(hf_dir, None, None, None)
    monkeypatch.setattr(llama, "rotate_half_to_interleaved", lambda weight, n_heads: weight)
    convert(checkpoint, vocabulary, tmp_path / "wrong.gguf", "f32", progress=lambda _: None)
    report = verify(checkpoint, vocabulary, tmp_path / "wrong.gguf", TEXTS, threads=1)
    assert not report.figures.passed and report.figures.mean_kl > 1e-3, report.lines()
    assert report.lines()[-1].startswith("FAILED")


def test_verification_catches_another_checkpoint(hf_dir, tmp_path, tokenizer_model):
    other = tmp_path / "other"
    hf_llama(other, vocab_size=500, layers=2, seed=1)
    shutil.copy(tokenizer_model, other / "tokenizer.model")
    convert(*open_source(other, None, None, None), tmp_path / "other.gguf", "f16", progress=lambda _: None)
    report = verify(*open_source(hf_dir, None, None, None), tmp_path / "other.gguf", TEXTS, threads=1)
    assert not report.figures.passed and report.figures.top1_agreement < 0.5
