"""The GGUF writer: metadata, then tensors streamed one at a time, into a file that appears only when complete.

gguf-py encodes the format; this module decides the tensor types, plans every tensor before writing
(GGUF lists all tensor infos ahead of the data), and loads, converts and writes one tensor at a time.
Output goes to a hidden temp file in the output's directory and is renamed over the target only after
it is complete and synced, so a crash or Ctrl-C never leaves a half-written GGUF; the temp file is
deleted on every failure path, and what a killed run (SIGKILL, power cut) left is removed by the next.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from parrot_edge.converters.checkpoint import GGUFTensor
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.weights import flat_parts

F32, F16, BF16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16
FILE_TYPES = {F32: gguf.LlamaFileType.ALL_F32, F16: gguf.LlamaFileType.MOSTLY_F16,
              BF16: gguf.LlamaFileType.MOSTLY_BF16}
_NUMPY = {F32: np.float32, F16: np.float16, BF16: np.uint16}  # bf16 travels as its raw 16-bit pattern
_SIXTEEN_BITS = {torch.float16: F16, torch.bfloat16: BF16}


class BeyondF16(BadInput):
    """A matrix with values that float16 cannot hold (beyond ±65504)."""

    def __init__(self, tensor: str):
        super().__init__(f"{tensor} has values beyond float16's range (±65504): use --quant bf16 or f32")
        self.tensor = tensor


def tensor_type(tensor: GGUFTensor, requested: gguf.GGMLQuantizationType | None,
                wide: frozenset[str] = frozenset()) -> gguf.GGMLQuantizationType:
    """Norms and other 1-D tensors stay F32 (as llama.cpp expects); matrices take the requested type, or with
    `requested=None` the quantiser's input type: a 16-bit checkpoint's own type, else F16 (what llama.cpp's
    own pipeline quantises from, at half the bytes of F32: the measured reason is in converters/convert.py),
    or F32 for the matrices in `wide`, whose values F16 cannot hold."""
    if len(tensor.shape) < 2:
        return F32
    if requested is not None:
        return requested
    return F32 if tensor.name in wide else _SIXTEEN_BITS.get(tensor.source_dtype, F16)


def write_gguf(path: Path, arch: str, metadata: dict[str, Any], tensors: list[GGUFTensor],
               requested: gguf.GGMLQuantizationType | None, description: str = "writing",
               wide: frozenset[str] = frozenset()) -> None:
    """Write a complete GGUF to `path` (a temp file: see parrot_edge.files). Raises BeyondF16 for a matrix
    bound for F16 whose values it cannot hold."""
    writer = gguf.GGUFWriter(path, arch)
    types = [tensor_type(t, requested, wide) for t in tensors]
    matrix_type = next((q for t, q in zip(tensors, types, strict=True) if len(t.shape) >= 2), F32)
    writer.add_file_type(FILE_TYPES[matrix_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items():
        _add_value(writer, key, value)
    sizes = [math.prod(t.shape) * np.dtype(_NUMPY[q]).itemsize for t, q in zip(tensors, types, strict=True)]
    for tensor, qtype, nbytes in zip(tensors, types, sizes, strict=True):
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(_NUMPY[qtype]), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    out = writer.fout[0]
    threads = torch.get_num_threads()
    # Converting is memory-bound: one thread is as fast, and OpenMP workers spinning between tensors
    # would take the CPU from reading the next one.
    torch.set_num_threads(1)
    try:
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=description, file=sys.stderr, disable=None,
                  leave=False) as bar:
            for tensor, qtype, nbytes in zip(tensors, types, sizes, strict=True):
                writer.write_padding(out, out.tell())  # each tensor's data starts aligned
                for chunk in _converted_chunks(tensor, qtype):
                    out.write(chunk.data)
                    bar.update(chunk.nbytes)
                writer.write_padding(out, nbytes)
    finally:
        torch.set_num_threads(threads)
    # No fsync here: the output is synced by parrot_edge.files when it is renamed into place, and the
    # quantiser's intermediate file is deleted right after use (syncing its 4.4 GB at 1.1B took seconds).
    out.flush()
    writer.close()


def fill_in(path: Path, key: str, value: str) -> None:
    """Overwrite the string `key` of the GGUF at `path` in place with `value`, as long as the value it holds: for
    what is known only once the file is written (the source's sha256, computed meanwhile)."""
    reader = gguf.GGUFReader(path, "r+")
    stored = reader.fields[key].parts[reader.fields[key].data[0]]
    encoded = np.frombuffer(value.encode(), dtype=np.uint8)
    if encoded.size != stored.size:
        raise ValueError(f"{key}: {value!r} is not as long as the {stored.size} bytes it replaces")
    stored[:] = encoded
    reader.data.flush()


def _converted_chunks(tensor: GGUFTensor, qtype: gguf.GGMLQuantizationType) -> Iterator[np.ndarray]:
    """The tensor's values in the GGUF type, a few MB at a time (no second full-size copy)."""
    count = 0
    for part in _source_parts(tensor):
        count += part.numel()
        if qtype == F16:
            data = part.to(torch.float16).numpy()
            if not np.isfinite(data).all():  # NaN and overflow alike: which one, the source says
                _check_finite(tensor.name, part)
                raise BeyondF16(tensor.name)
            yield data
            continue
        _check_finite(tensor.name, part)
        if qtype == BF16:
            yield part.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            yield part.to(torch.float32).numpy()
    if count != math.prod(tensor.shape):
        raise BadInput(f"{tensor.name}: the checkpoint gave {count} values, expected {list(tensor.shape)}")


def _source_parts(tensor: GGUFTensor) -> Iterator[torch.Tensor]:
    """The tensor's values in order, flat, a few MB at a time: streamed where its checkpoint can (read straight
    from a memory map, no copy), else from the whole tensor."""
    if tensor.stream is not None:
        yield from tensor.stream()
        return
    value = tensor.load()
    if tuple(value.shape) != tensor.shape:
        raise BadInput(f"{tensor.name}: the checkpoint gave shape {list(value.shape)}, expected {list(tensor.shape)}")
    yield from flat_parts(value)


def _check_finite(name: str, part: torch.Tensor) -> None:
    if not math.isfinite(part.float().sum()):  # any NaN or inf makes the sum NaN/inf; cheap to compute
        raise BadInput(f"{name} holds NaN or infinite values: the checkpoint is broken (diverged training?)")


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    # bool before int: a bool is an int in Python
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)  # element type from the first item: str, int → int32, float → float32
    else:
        raise TypeError(f"no GGUF type for {key}={value!r}")
