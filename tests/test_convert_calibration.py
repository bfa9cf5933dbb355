"""Calibration: the importance matrix measured in the reference forward and handed to llama.cpp's quantiser.

Proven here on small random checkpoints of every family, through the real llama.cpp quantiser:
- what is measured is the mean squared input of every matrix, as transformers' own LlamaForCausalLM computes it;
- it changes the quantised weights, and in the direction it should: the rounding error weighted by the
  importance is smaller than without calibration (a calibration that did nothing, or was handed over in the
  wrong order, fails);
- it leaves an F32 file byte for byte unchanged, is deterministic, and is recorded in the manifest and the GGUF;
- an empty, unreadable or non-UTF-8 calibration file is refused before any work, with exit code 2;
- every family calibrates (hf-llama tied and untied, tinyllama, litgpt, ParrotLLM 1/1a/2/3/5, Parakeet), also
  where the dims force fallbacks (320- and 288-wide rows, d_ff 854 padded to 864).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from converter_fixtures import hf_llama, lit_config, litgpt_checkpoint, tinyllama_checkpoint, train_sentencepiece
from seed_checkpoints import parakeet_state, parrotllm_state, save_parakeet, save_parrotllm

from parrot_edge.cli import main
from parrot_edge.converters.calibration import MAX_TOKENS, built_in, read_calibration, token_windows
from parrot_edge.converters.convert import convert, open_source
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.gguf_eval import gguf_logits
from parrot_edge.converters.importance import importance_matrix, native_bfloat16
from parrot_edge.store.gguf_check import read_header
from parrot_edge.store.manifest import ModelManifest, sha256_file


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_model) -> tuple[Path, object]:
    """A 256-wide HF Llama (every row fits Q4_K's 256-value blocks), its tokenizer beside it."""
    directory = tmp_path_factory.mktemp("hf") / "model"
    model = hf_llama(directory, vocab_size=500, hidden=256, ff=512, layers=2)
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory, model


def tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF, dequantised to float32 in torch order [rows, columns]."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
            for t in reader.tensors}


def raw(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for t in gguf.GGUFReader(path).tensors}


def test_what_is_measured_is_the_mean_squared_input_of_every_matrix(hf_dir):
    """Against transformers: hooks on its q/o/gate/down projections and lm_head see the same inputs."""
    directory, model = hf_dir
    checkpoint, vocabulary = open_source(directory, None, None, None)
    windows = token_windows(vocabulary.encode, built_in().text, checkpoint.context_length, 1024)
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        return lambda _module, inputs: seen.setdefault(name, []).append(inputs[0].reshape(-1, inputs[0].shape[-1]))

    names = {"blk.1.attn_q.weight": model.model.layers[1].self_attn.q_proj,
             "blk.1.attn_output.weight": model.model.layers[1].self_attn.o_proj,
             "blk.0.ffn_up.weight": model.model.layers[0].mlp.up_proj,
             "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj, "output.weight": model.lm_head}
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in names.items()]
    with torch.no_grad():
        model(torch.tensor(windows))
    for handle in handles:
        handle.remove()
    ours = importance_matrix(checkpoint, windows)
    assert set(ours) == {f"blk.{i}.{p}.weight" for i in range(2) for p in ("attn_q", "attn_k", "attn_v",
                         "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {"output.weight"}
    tolerance = 3e-2 if native_bfloat16() else 1e-4  # bfloat16 products where the CPU has them
    for name in names:
        expected = torch.cat(seen[name]).double().pow(2).mean(0).float().numpy()
        np.testing.assert_allclose(ours[name], expected, rtol=tolerance, atol=1e-6, err_msg=name)


def test_calibration_changes_the_weights_where_the_input_matters(hf_dir, tmp_path):
    """The quantiser minimises rounding error weighted by importance: calibrated, that error is smaller."""
    directory, _ = hf_dir
    checkpoint, vocabulary = open_source(directory, None, None, None)
    calibration = built_in()
    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "calibrated.gguf"
    convert(checkpoint, vocabulary, plain, "q4_k_m", progress=quiet)
    convert(checkpoint, vocabulary, calibrated, "q4_k_m", calibration=calibration, progress=quiet)
    exact = {t.name: t.load().float().numpy() for t in checkpoint.gguf_tensors()}
    windows = token_windows(vocabulary.encode, calibration.text, checkpoint.context_length)
    importance = importance_matrix(checkpoint, windows)
    before, after = tensors(plain), tensors(calibrated)
    changed = {name for name, data in raw(calibrated).items() if data != raw(plain)[name]}
    assert changed == set(importance)  # every matrix that reads a measured input, and only those
    for name, weights in importance.items():
        def weighted_error(quantised, name=name, weights=weights):
            return float((((quantised[name] - exact[name]) ** 2) * weights).sum())
        assert weighted_error(after) < weighted_error(before), name
    assert read_header(calibrated).metadata["quantize.imatrix.dataset"] == "built-in:school-en-es"
    manifest = ModelManifest.read(calibrated.with_suffix(".json"))
    assert manifest.calibration.text == "built-in:school-en-es"
    assert manifest.calibration.sha256 == sha256_file(Path(__file__).parents[1] / "converters" / "calibration" /
                                                      "school-en-es.txt")
    assert ModelManifest.read(plain.with_suffix(".json")).calibration is None


def test_f32_is_unchanged_and_calibration_is_deterministic(hf_dir, tmp_path, capsys):
    directory, _ = hf_dir
    text = tmp_path / "lessons.txt"
    text.write_text("The river rises in the rainy season.\n\nEl río crece en la temporada de lluvias.\n" * 40)
    made = {}
    for label, quant, extra in (("f32", "f32", []), ("f32-calibrated", "f32", ["--calibrate", text]),
                                ("q4-a", "q4_k_m", ["--calibrate", text]), ("q4-b", "q4_k_m", ["--calibrate", text])):
        made[label] = tmp_path / f"{label}.gguf"
        assert main(["convert", str(directory), "-o", str(made[label]), "--quant", quant, *map(str, extra)]) == 0
    assert "note: --calibrate has no effect on F32: it is written exactly" in capsys.readouterr().err
    assert sha256_file(made["f32"]) == sha256_file(made["f32-calibrated"])
    assert ModelManifest.read(made["f32-calibrated"].with_suffix(".json")).calibration is None
    assert sha256_file(made["q4-a"]) == sha256_file(made["q4-b"])
    manifest = ModelManifest.read(made["q4-a"].with_suffix(".json"))
    assert manifest.calibration.text == "lessons.txt" and manifest.calibration.sha256 == sha256_file(text)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b" \n\n\t\n", "is empty"),
    (b"\xff\xfe\x00 not text", "is not UTF-8 text"),
    (None, "cannot read the calibration text"),
], ids=["empty", "blank", "binary", "missing"])
def test_a_bad_calibration_file_is_refused_before_any_work(hf_dir, tmp_path, capsys, content, message):
    directory, _ = hf_dir
    path = tmp_path / "calibration.txt"
    if content is not None:
        path.write_bytes(content)
    output = tmp_path / "out.gguf"
    assert main(["convert", str(directory), "-o", str(output), "--quant", "q4_k_m", "--calibrate", str(path)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(path) in error and "Traceback" not in error, error
    assert not list(tmp_path.glob("*out.gguf*"))


def test_an_unreadable_calibration_file_says_why(tmp_path):
    with pytest.raises(BadInput, match=r"cannot read the calibration text .*: Is a directory"):
        read_calibration(tmp_path)


def test_calibrate_and_no_calibrate_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "x", "-o", "y.gguf", "--calibrate", "a.txt", "--no-calibrate"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_built_in_text_is_bilingual_school_prose_of_tens_of_thousands_of_tokens():
    text = built_in().text
    assert "Licence" not in text[:200]  # the header is not calibrated on
    words = text.split()
    assert len(words) > 12_000
    assert {"the", "and", "el", "la", "que", "fracciones", "photosynthesis"} <= {w.strip(".,:;").lower() for w in words}
    windows = token_windows(str.split, text, 4096, 10**9)  # one "token" per word
    assert len(windows) == len(words) // 512
    spread = token_windows(str.split, text, 4096, MAX_TOKENS)
    assert len(spread) == MAX_TOKENS // 512 and spread[0] == windows[0] and spread[-1] != windows[len(spread) - 1]


# -- every family


def _hf(root: Path, tokenizer: Path, tied: bool) -> Path:
    hf_llama(root, vocab_size=500, hidden=256, ff=512, layers=2, tied=tied)
    shutil.copy(tokenizer, root / "tokenizer.model")
    return root


def _lit(root: Path, tokenizer: Path, make) -> Path:
    make(root, lit_config(500, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=512))
    shutil.copy(tokenizer, root / "tokenizer.model")
    return root


def _parrotllm(root: Path, generation: str, gpt2: Path) -> Path:
    path = save_parrotllm(root, parrotllm_state(generation, pair_constant_qk=True))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2 / name, path.parent / name)
    return path


def _parakeet(root: Path, cl100k: Path) -> Path:
    path = save_parakeet(root, parakeet_state(n_layers=2))
    shutil.copy(cl100k, path.parent / "cl100k_base.tiktoken")
    return path


FAMILIES = {  # name → (maker, a quant type whose blocks fit; "q4_k_m" with its fallbacks where they do not)
    "hf-llama": (lambda root, sp, gpt2, cl100k: _hf(root, sp, tied=False), "q4_k_m"),
    "hf-llama-tied": (lambda root, sp, gpt2, cl100k: _hf(root, sp, tied=True), "iq4_xs"),
    "tinyllama": (lambda root, sp, gpt2, cl100k: _lit(root, sp, tinyllama_checkpoint), "q4_k_m"),
    "litgpt": (lambda root, sp, gpt2, cl100k: _lit(root, sp, litgpt_checkpoint), "q4_0"),
    **{f"parrotllm-{g}": (lambda root, sp, gpt2, cl100k, g=g: _parrotllm(root, g, gpt2), "q4_k_m")
       for g in ("1", "1a", "2", "3", "5")},
    "parakeet": (lambda root, sp, gpt2, cl100k: _parakeet(root, cl100k), "q4_k_m"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_calibrates(family, tmp_path, tokenizer_model, gpt2_vocabulary, cl100k_file):
    """Every quantised matrix gets an importance of its own width (fused QKV, fused gate+up, padded d_ff), the
    calibrated file differs from the plain one, and it loads and computes."""
    maker, quant = FAMILIES[family]
    source = maker(tmp_path / "source", tokenizer_model, gpt2_vocabulary, cl100k_file)
    checkpoint, vocabulary = open_source(source, None, None, None)
    windows = token_windows(vocabulary.encode, built_in().text, checkpoint.context_length, 1024)
    importance = importance_matrix(checkpoint, windows)
    shapes = {t.name: t.shape for t in checkpoint.gguf_tensors()}
    matrices = {name for name, shape in shapes.items() if len(shape) == 2 and name.startswith("blk.")}
    output = "output.weight" if "output.weight" in shapes else "token_embd.weight"
    assert set(importance) == matrices | {output}
    assert all(values.shape == (shapes[name][1],) and (values > 0).all() and np.isfinite(values).all()
               for name, values in importance.items())

    plain, calibrated = tmp_path / "plain.gguf", tmp_path / "calibrated.gguf"
    convert(checkpoint, vocabulary, plain, quant, progress=quiet)
    convert(checkpoint, vocabulary, calibrated, quant, calibration=built_in(), progress=quiet)
    before, after = raw(plain), raw(calibrated)
    assert [name for name in matrices if before[name] != after[name]], "calibration changed no matrix"
    logits = gguf_logits(calibrated, [windows[0][:32]], threads=1)[0]
    assert logits.shape == (32, checkpoint.n_vocab) and np.isfinite(logits).all()
