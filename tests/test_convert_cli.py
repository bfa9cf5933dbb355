"""The real `parrot-edge` command: convert --verify, verify failing with exit 3, inspect, errors, memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from converter_fixtures import hf_llama, lit_config, tinyllama_checkpoint, train_sentencepiece

from parrot_edge.bench.conversion import run_measured
from parrot_edge.store.manifest import ModelManifest, sha256_file

PARROT_EDGE = Path(sys.executable).parent / "parrot-edge"


def run(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(PARROT_EDGE), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """ParrotAI's own format: two TinyLlama pretraining checkpoints (different seeds), tokenizer beside them."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = train_sentencepiece(root / "sp")
    for seed in (0, 1):
        tinyllama_checkpoint(root / f"run{seed}", lit_config(500, n_head=4, n_query_groups=2), seed=seed)
        shutil.copy(tokenizer, root / f"run{seed}" / "tokenizer.model")
    return root


@pytest.fixture(scope="module")
def converted(workdir) -> tuple[subprocess.CompletedProcess, Path]:
    output = workdir / "out" / "parrot-tiny.gguf"
    output.parent.mkdir()
    result = run("convert", workdir / "run0" / "iter-000100-ckpt.pth", "-o", output, "--quant", "f16", "--verify",
                 "--threads", "1", "--name", "Parrot Tiny", "--license", "apache-2.0", cwd=workdir)
    return result, output


def test_convert_with_verification(converted, workdir):
    result, output = converted
    assert result.returncode == 0, result.stderr
    assert "5/5 texts tokenised identically by llama.cpp" in result.stdout and "PASSED" in result.stdout
    assert "note: architecture from" in result.stderr and "Traceback" not in result.stderr
    manifest = ModelManifest.read(output.with_suffix(".json"))
    assert manifest.name == "parrot-tiny" and manifest.file == "parrot-tiny.gguf" and manifest.quant == "F16"
    assert manifest.sha256 == sha256_file(output) and manifest.size == output.stat().st_size
    assert manifest.source_sha256 == sha256_file(workdir / "run0" / "iter-000100-ckpt.pth")
    assert manifest.tokenizer == "llama" and manifest.context_length == 512 and manifest.license == "apache-2.0"
    assert manifest.verification.passed and manifest.verification.max_abs_dlogit < 0.1
    assert sorted(p.name for p in output.parent.iterdir()) == ["parrot-tiny.gguf", "parrot-tiny.json"]


def test_verify_fails_with_exit_3_on_a_gguf_of_another_checkpoint(converted, workdir):
    _, output = converted
    result = run("verify", workdir / "run1", output, "--threads", "1", cwd=workdir)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "FAILED" in result.stdout and result.stderr.startswith("error: ")


def test_verify_passes_on_its_own_checkpoint_with_a_text_file(converted, workdir):
    _, output = converted
    (workdir / "texts.txt").write_text("Hola, ¿cómo estás? Muy bien, gracias.\n\nThe cat sat on the mat. 🐈\n")
    result = run("verify", workdir / "run0", output, "--text", workdir / "texts.txt", "--threads", "1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "2 texts" in result.stdout


def test_inspect(converted, workdir):
    _, output = converted
    result = run("inspect", output, cwd=workdir)
    assert result.returncode == 0, result.stderr
    for expected in ("architecture   llama; name 'Parrot Tiny'; license apache-2.0", "2 blocks, embedding 256",
                     "llama (pre-tokenizer default); 512 tokens", "bos 1 '<s>'", "blk.0.attn_q.weight",
                     "F16 ×", "parrot_edge.source.family = 'tinyllama'", "tokenizer.chat_template"):
        assert expected in result.stdout, expected
    assert "blk.1.attn_q.weight" not in result.stdout
    assert "blk.1.attn_q.weight" in run("inspect", output, "--tensors", cwd=workdir).stdout


def test_inspect_does_not_import_torch(converted, workdir):
    _, output = converted
    code = ("import sys; from parrot_edge.cli import main; main(['inspect', sys.argv[1]]); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(output)], capture_output=True, text=True, cwd=workdir)
    assert result.stdout.strip().endswith("False"), result.stderr


def test_parser_loads_nothing_heavy():
    """`parrot-edge --help`, `chat` and a kiosk-only install build the parser, --family and --config presets
    included: the converter's registry and family modules must not import any extra's packages."""
    code = "import sys; from parrot_edge.cli import build_parser; build_parser(); print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in result.stdout.split()}
    heavy = {"torch", "numpy", "gguf", "llama_cpp", "safetensors", "yaml", "sentencepiece", "tokenizers", "tqdm"}
    assert "parrot_edge" in loaded and not loaded & heavy, sorted(loaded & heavy)


def test_family_choices_are_the_registry():
    import argparse

    from parrot_edge.cli import build_parser
    from parrot_edge.converters import families

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("convert", "verify"):
        options = {o: a for a in commands[command]._actions for o in a.option_strings}
        expected = ["tinyllama", "parrotllm", "parakeet", "litgpt", "hf-llama"]
        assert list(options["--family"].choices) == families.names() == expected
        assert all(preset in options["--config"].help for preset in families.presets())


@pytest.mark.parametrize("args,code,message", [
    (["--quant", "q3_k"], 2, "error: unknown quant type 'q3_k'"),
    (["--config", "tiny_LLaMA_9b"], 2, "error: --config tiny_LLaMA_9b: neither a preset"),
    (["-o", "missing-dir/x.gguf"], 1, "error: cannot write to missing-dir: No such file or directory"),
], ids=["unknown-quant", "unknown-preset", "unwritable-output"])
def test_errors_have_a_message_and_an_exit_code(workdir, args, code, message):
    argv = ["convert", workdir / "run0", "-o", workdir / "x.gguf", *args]
    result = run(*argv, cwd=workdir)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_a_torch_checkpoint_is_written_straight_from_its_memory_map(tmp_path):
    """A TinyLlama checkpoint's tensors go from the memory map into the GGUF a few MB at a time, with no copy of
    a whole tensor: a checkpoint whose three largest tensors are 128 MB each costs far less than one of them more
    than a tiny one (measured with 64 MB tensors: +49 to +57 MB; copying each tensor first, +111 to +152 MB)."""
    tokenizer = train_sentencepiece(tmp_path / "sp")
    for name, width, ff in (("small", 64, 128), ("large", 256, 131072)):
        tinyllama_checkpoint(tmp_path / name, lit_config(500, n_embd=width, n_head=4, n_query_groups=2,
                                                         intermediate_size=ff, n_layer=1))
        shutil.copy(tokenizer, tmp_path / name / "tokenizer.model")
    largest_mb = 131072 * 256 * 4 / 2**20
    peaks = [run_measured([PARROT_EDGE, "convert", name, "-o", f"{name}.gguf", "--quant", "f16"], tmp_path).peak_rss_mb
             for name in ("small", "large")]
    print(json.dumps({"largest_tensor_mb": largest_mb, "peak_small_mb": round(peaks[0]),
                      "peak_large_mb": round(peaks[1])}))
    assert peaks[1] - peaks[0] < 0.75 * largest_mb, peaks


def test_the_quantisers_slabs_change_no_byte(converted, tmp_path, monkeypatch):
    """llama.cpp's quantiser is given small slabs of rows to keep its float32 buffer small: the output is the
    same bytes as with its default (a whole matrix at once) and with slabs of a few rows."""
    from parrot_edge.converters import quantize

    outputs = []
    for slab in (quantize.SLAB_BYTES, 0, 16 << 10):  # 0: llama.cpp's default; 16 KB: 9 rows of 256 values
        monkeypatch.setattr(quantize, "SLAB_BYTES", slab)
        outputs.append(tmp_path / f"slab-{slab}.gguf")
        quantize.quantize(converted[1], outputs[-1], "q4_k_m", threads=2)
    assert outputs[0].read_bytes() == outputs[1].read_bytes() == outputs[2].read_bytes()


def test_missing_source(workdir):
    result = run("convert", "nowhere", "-o", "x.gguf", cwd=workdir)
    assert result.returncode == 2 and "error: nowhere does not exist" in result.stderr


def test_peak_memory_stays_far_below_the_model_size(tmp_path):
    """Tensors are streamed: converting a 150 MB checkpoint costs only a few of its tensors more memory than
    converting a 1 MB one (measured: +35 to +50 MB; the whole model twice would be +300 MB)."""
    tokenizer = train_sentencepiece(tmp_path / "sp")
    for name, width, layers in (("small", 64, 1), ("large", 768, 4)):
        hf_llama(tmp_path / name, vocab_size=500, hidden=width, heads=width // 64, kv_heads=width // 64,
                 ff=4 * width, layers=layers)
        shutil.copy(tokenizer, tmp_path / name / "tokenizer.model")
    size_mb = (tmp_path / "large" / "model.safetensors").stat().st_size / 2**20
    small = run_measured([PARROT_EDGE, "convert", "small", "-o", "small.gguf", "--quant", "f16"], tmp_path).peak_rss_mb
    large = run_measured([PARROT_EDGE, "convert", "large", "-o", "large.gguf", "--quant", "f16"], tmp_path).peak_rss_mb
    print(json.dumps({"checkpoint_mb": round(size_mb), "peak_small_mb": round(small), "peak_large_mb": round(large)}))
    assert size_mb > 140
    assert large - small < 0.4 * size_mb, (small, large, size_mb)
