"""`parrot-edge convert`: checkpoint → GGUF (+ manifest), from start to finish.

1. open the checkpoint (its family checks keys and shapes against the config) and its tokenizer;
2. hash the source weights, meanwhile (the GGUF and the manifest record which checkpoint they came from);
3. F32/F16/BF16: stream the tensors straight into the output (calibration never touches them). Q8_0, the
   4-bit types, Q5_K_M: with a calibration text, measure the importance matrix in the reference forward
   (converters/importance.py); stream the tensors into an intermediate GGUF in the output directory, in F16
   as llama.cpp's own pipeline does (a 16-bit checkpoint: its own F16/BF16; a matrix F16 cannot hold: F32),
   and let llama.cpp's quantiser write the output from it, weighting its rounding by the importance matrix;
4. rename the finished file into place, then write the manifest beside it (with the calibration text's name
   and sha256).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from parrot_edge import __version__
from parrot_edge.converters.calibration import CalibrationText
from parrot_edge.converters.checkpoint import Checkpoint
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families import open_checkpoint
from parrot_edge.converters.gguf_writer import BeyondF16, fill_in, write_gguf
from parrot_edge.converters.quantize import describe_fallbacks, fallbacks, quantize
from parrot_edge.converters.quants import DIRECT_QUANTS, NOT_CALIBRATED, QUANT_CHOICES
from parrot_edge.converters.tokenizer import Vocabulary, find_tokenizer, load_vocabulary
from parrot_edge.converters.weights import source_sha256
from parrot_edge.files import leftovers_beside, replaced_atomically, temp_file_beside
from parrot_edge.store.manifest import Calibration, ModelManifest, manifest_path_for, model_name, sha256_file

SOURCE_HASH_KEY = "parrot_edge.source.sha256"
PENDING_HASH = "0" * 64  # in the GGUF until the hash is known: as long as a sha256 in hex (fill_in)
DIRECT_TYPES = {quant: gguf.GGMLQuantizationType[name] for quant, name in DIRECT_QUANTS.items()}


def say(message: str) -> None:
    print(message, file=sys.stderr)


def check_quant(quant: str) -> str:
    if quant.lower() not in QUANT_CHOICES:
        raise BadInput(f"unknown quant type {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    return quant.lower()


def check_output(output: Path) -> None:
    if output.suffix != ".gguf":
        raise BadInput(f"output {output} must end in .gguf")
    if output.is_dir():
        raise BadInput(f"output {output} is a directory")


def open_source(source: Path, family: str | None, config: str | None,
                tokenizer: Path | None) -> tuple[Checkpoint, Vocabulary]:
    checkpoint = open_checkpoint(source, family, config)
    tokenizer_path = find_tokenizer(tokenizer or checkpoint.source.tokenizer_dir or source)
    vocabulary = load_vocabulary(tokenizer_path, checkpoint.n_vocab, checkpoint.source.declared_vocab,
                                  checkpoint.source.tokenizer_hints)
    return checkpoint, vocabulary


def check_exactness(checkpoint: Checkpoint, strict: bool, progress: Callable[[str], None] = say) -> None:
    """Say plainly what an approximate conversion changes; with `strict`, refuse it."""
    if not checkpoint.approximations:
        return
    listing = "; ".join(checkpoint.approximations)
    if strict:
        raise BadInput(f"--strict: no llama.cpp architecture computes this {checkpoint.source.family} checkpoint "
                       f"exactly (closest: `{checkpoint.arch}`, which differs by: {listing})")
    for approximation in checkpoint.approximations:
        progress(f"warning: APPROXIMATE conversion to `{checkpoint.arch}`: {approximation}")
    progress("warning: the GGUF computes something slightly different from the checkpoint; verification measures "
             "how much, and the manifest records it (\"exact\": false)")


def convert(checkpoint: Checkpoint, vocabulary: Vocabulary, output: Path, quant: str, *, name: str | None = None,
            license: str | None = None, threads: int | None = None, strict: bool = False,
            calibration: CalibrationText | None = None, progress: Callable[[str], None] = say) -> ModelManifest:
    """Write `output` (and its manifest) from an opened checkpoint; returns the manifest. `calibration`: the text
    llama.cpp's quantiser is calibrated on (ignored for F32/F16/BF16, which are written exactly)."""
    quant = check_quant(quant)
    if quant in DIRECT_TYPES or quant in NOT_CALIBRATED:
        calibration = None
    check_output(output)
    check_exactness(checkpoint, strict, progress)
    source = checkpoint.source
    for note in source.notes + vocabulary.notes:
        progress(f"note: {note}")
    if output.parent.is_dir():
        for leftover in leftovers_beside(output, "partial", "unquantised"):
            leftover.unlink(missing_ok=True)
            progress(f"note: removed {leftover.name}, left by an earlier run that was killed")
    # First: an unwritable output fails before any work. The output is an ordinary file (the umask's mode).
    with replaced_atomically(output, mode=None) as partial, hashed_meanwhile(source.weight_files) as hashing:
        metadata = gguf_metadata(checkpoint, vocabulary, name or source.name, license or source.license,
                                 PENDING_HASH)
        if quant in DIRECT_TYPES:
            write_gguf(partial, checkpoint.arch, metadata, checkpoint.gguf_tensors(), DIRECT_TYPES[quant],
                       f"writing {quant.upper()}")
        else:
            _write_quantised(checkpoint, vocabulary, metadata, output, partial, quant, calibration, threads,
                             progress)
        source_hash = hashing.result()
        fill_in(partial, SOURCE_HASH_KEY, source_hash)

    manifest = ModelManifest(
        name=model_name(name or output.stem), file=output.name, sha256=sha256_file(output),
        size=output.stat().st_size, quant=quant.upper(), architecture=checkpoint.arch,
        parameters=checkpoint.parameter_count, context_length=checkpoint.context_length,
        tokenizer=vocabulary.metadata["tokenizer.ggml.model"], license=license or source.license,
        source=f"{source.family}:{source.path.name}", source_sha256=source_hash,
        exact=not checkpoint.approximations, approximations=list(checkpoint.approximations) or None,
        calibration=Calibration(text=calibration.name, sha256=calibration.sha256) if calibration else None,
    )
    manifest.write(manifest_path_for(output))
    return manifest


@contextmanager
def hashed_meanwhile(files: list[Path]) -> Iterator[Future[str]]:
    """The checkpoint's sha256, computed on another core while its tensors are written (hashlib lets go of the
    GIL on large chunks): hashing ParrotAI-1.1B's 4.4 GB alone took 4.1 s of a 77.6 s conversion. Stopped at
    its next chunk if the block fails."""
    stop = threading.Event()

    def progress(nbytes: int) -> None:
        if stop.is_set():
            raise InterruptedError("the conversion stopped")
        bar.update(nbytes)

    with ThreadPoolExecutor(1) as pool, tqdm(total=sum(path.stat().st_size for path in files), unit="B",
                                             unit_scale=True, desc="hashing the checkpoint", file=sys.stderr,
                                             disable=None, leave=False, position=1) as bar:
        try:
            yield pool.submit(source_sha256, files, progress)
        finally:
            stop.set()


def _write_quantised(checkpoint: Checkpoint, vocabulary: Vocabulary, metadata: dict, output: Path, partial: Path,
                     quant: str, calibration: CalibrationText | None, threads: int | None,
                     progress: Callable[[str], None]) -> None:
    """An unquantised GGUF beside `output`, then llama.cpp's quantiser (calibrated when `calibration`) into
    `partial`, the output's temporary file."""
    importance = calibrate(checkpoint, vocabulary, calibration, threads, progress) if calibration else None
    if importance:  # llama-quantize's keys: the quantiser copies them into the output
        metadata |= {"quantize.imatrix.dataset": calibration.name, "quantize.imatrix.entries_count": len(importance)}
    with temp_file_beside(output, "unquantised") as intermediate:
        wide: frozenset[str] = frozenset()
        while True:  # again with each matrix F16 cannot hold as F32: in practice, never
            try:
                write_gguf(intermediate, checkpoint.arch, metadata, checkpoint.gguf_tensors(), None, "writing",
                           wide)
                break
            except BeyondF16 as exc:
                progress(f"note: {exc.tensor} has values beyond float16's range: quantising it from float32")
                wide |= {exc.tensor}
        progress(f"quantising to {quant.upper()} with llama.cpp"
                 + (f", calibrated on {calibration.name}" if importance else ""))
        quantize(intermediate, partial, quant, threads, importance=importance)
    if found := fallbacks(partial, quant):
        progress(f"note: {describe_fallbacks(found, quant)}")


def calibrate(checkpoint: Checkpoint, vocabulary: Vocabulary, calibration: CalibrationText, threads: int | None,
              progress: Callable[[str], None]) -> dict[str, np.ndarray]:
    """The importance matrix of the checkpoint on the calibration text (converters/importance.py)."""
    from parrot_edge.converters.calibration import token_windows
    from parrot_edge.converters.importance import importance_matrix

    windows = token_windows(vocabulary.encode, calibration.text, checkpoint.context_length)
    progress(f"calibrating on {calibration.name}: {sum(map(len, windows))} tokens in {len(windows)} windows, "
             "through the reference forward one layer at a time")
    if threads:
        torch.set_num_threads(threads)
    return importance_matrix(checkpoint, windows)


def gguf_metadata(checkpoint: Checkpoint, vocabulary: Vocabulary, name: str, license: str | None,
                  source_hash: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"general.type": "model", "general.name": name}
    if license:
        metadata["general.license"] = license
    metadata |= checkpoint.gguf_metadata()
    metadata |= {
        "parrot_edge.version": __version__,
        "parrot_edge.source.family": checkpoint.source.family,
        SOURCE_HASH_KEY: source_hash,
    }
    return metadata | vocabulary.gguf_metadata()
