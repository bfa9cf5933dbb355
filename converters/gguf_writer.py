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

F32, F16, BF16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16
FILE_TYPES = {F32: gguf.LlamaFileType.ALL_F32, F16: gguf.LlamaFileType.MOSTLY_F16,
              BF16: gguf.LlamaFileType.MOSTLY_BF16}
_NUMPY = {F32: np.float32, F16: np.float16, BF16: np.uint16}  # bf16 travels as its raw 16-bit pattern
_LOSSLESS = {torch.float16: F16, torch.bfloat16: BF16}  # anything else is kept as F32
_CHUNK = 4 << 20  # values converted at a time


def tensor_type(tensor: GGUFTensor, requested: gguf.GGMLQuantizationType | None) -> gguf.GGMLQuantizationType:
    """Norms and other 1-D tensors stay F32 (as llama.cpp expects); matrices take the requested type, or
    with `requested=None` the type that holds the checkpoint's values exactly (for quantising from)."""
    if len(tensor.shape) < 2:
        return F32
    return requested if requested is not None else _LOSSLESS.get(tensor.source_dtype, F32)


def write_gguf(path: Path, arch: str, metadata: dict[str, Any], tensors: list[GGUFTensor],
               requested: gguf.GGMLQuantizationType | None, description: str = "writing") -> None:
    """Write a complete GGUF to `path` (a temp file: see parrot_edge.files)."""
    writer = gguf.GGUFWriter(path, arch)
    types = [tensor_type(t, requested) for t in tensors]
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


def _converted_chunks(tensor: GGUFTensor, qtype: gguf.GGMLQuantizationType) -> Iterator[np.ndarray]:
    """The tensor's values in the GGUF type, a few MB at a time (no second full-size copy)."""
    value = tensor.load()
    if tuple(value.shape) != tensor.shape:
        raise BadInput(f"{tensor.name}: the checkpoint gave shape {list(value.shape)}, expected {list(tensor.shape)}")
    for part in value.contiguous().view(-1).split(_CHUNK):
        if not math.isfinite(part.float().sum()):  # any NaN or inf makes the sum NaN/inf; cheap to compute
            raise BadInput(f"{tensor.name} holds NaN or infinite values: the checkpoint is broken (diverged training?)")
        if qtype == BF16:
            yield part.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            continue
        data = part.to(torch.float16 if qtype == F16 else torch.float32).numpy()
        if qtype == F16 and not np.isfinite(data).all():
            raise BadInput(f"{tensor.name} has values beyond float16's range (±65504): use --quant bf16 or f32")
        yield data


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
