"""The 8-bit and 4-bit types, through llama.cpp's own quantiser (`llama_model_quantize`).

llama.cpp picks each tensor's type itself (Q4_K_M keeps some tensors at Q6_K, norms at F32) and, when
a tensor's rows do not divide into the type's blocks (256 values for K-quants, 32 for Q4_0/Q8_0), falls
back for that tensor alone (Q4_K → Q5_0, Q6_K → Q8_0, …, F16 as the last resort). `fallbacks()` reads the
result back so the command can say which tensors were affected.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np

from parrot_edge.converters.quants import LLAMA_CPP_QUANTS, SMALL_BLOCK_4BIT
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.llamacpp import lib, recent_log
from parrot_edge.store.gguf_check import read_header

SLAB_BYTES = 32 << 20

# --quant value → (llama_ftype, the ggml type of its ordinary weight matrices)
LLAMA_CPP_FTYPES = {quant: (gguf.LlamaFileType[ftype], gguf.GGMLQuantizationType[matrix_type])
                    for quant, (ftype, matrix_type) in LLAMA_CPP_QUANTS.items()}


def quantize(source: Path, target: Path, quant: str, threads: int | None = None, requantize: bool = False,
             importance: dict[str, np.ndarray] | None = None) -> None:
    """Quantise the F32/F16/BF16 GGUF `source` into `target` with llama.cpp's default recipe for `quant`
    (`requantize`: from an already quantised GGUF too, at a loss of quality), weighting each value's rounding
    error by `importance` (tensor name → one float32 per input column: converters/importance.py) if given."""
    llama = lib()
    params = llama.llama_model_quantize_default_params()  # layout must match the bundled library: start here
    params.ftype = int(LLAMA_CPP_FTYPES[quant][0])
    params.allow_requantize = requantize
    params.nthread = threads or 0  # 0: all cores
    # Rows converted to float32 at a time. llama.cpp's default (8 GiB) converts a whole matrix at once and keeps
    # the buffer: from F16, ParrotAI-1.1B's 262 MB of float32 embedding stay resident for the whole run. Rows
    # are quantised on their own, so the output is the same bytes (tests/test_convert_cli.py).
    params.max_buf_size = SLAB_BYTES
    entries, _alive = _imatrix_entries(llama, importance or {})
    if importance:
        params.imatrix = entries
    if llama.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise ParrotEdgeError(f"llama.cpp could not quantise to {quant}: {recent_log() or 'no reason given'}")


def _imatrix_entries(llama, importance: dict[str, np.ndarray]):
    """llama_model_quantize_params.imatrix as llama.h declares it (since the C API replaced the C++ map): an
    array of {name, data, size} ended by a NULL name, which llama.cpp copies before quantising. Returned with
    the arrays its pointers point into, which must outlive the call."""
    entries = (llama.llama_model_imatrix_data * (len(importance) + 1))()  # zeroed: the last one ends it
    alive = []
    for entry, (name, values) in zip(entries, sorted(importance.items()), strict=False):
        values = np.ascontiguousarray(values, dtype=np.float32)
        alive.append(values)
        entry.name = name.encode()
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    return entries, alive


def fallbacks(path: Path, quant: str) -> list[tuple[str, str]]:
    """(tensor, stored type) for every weight matrix whose rows did not fit the blocks of `quant`'s type."""
    block = gguf.GGML_QUANT_SIZES[LLAMA_CPP_FTYPES[quant][1]][0]
    return [(t.name, gguf.GGMLQuantizationType(t.ggml_type).name) for t in read_header(path).tensors
            if len(t.shape) >= 2 and t.name.endswith(".weight") and t.shape[0] % block]


def describe_fallbacks(found: list[tuple[str, str]], quant: str) -> str:
    base = LLAMA_CPP_FTYPES[quant][1]
    block = gguf.GGML_QUANT_SIZES[base][0]
    by_type: dict[str, list[str]] = {}
    for name, stored in found:
        by_type.setdefault(stored, []).append(name)
    parts = [f"{stored} ×{len(names)} ({', '.join(names[:4])}{', …' if len(names) > 4 else ''})"
             for stored, names in sorted(by_type.items())]
    message = (f"--quant {quant}: {len(found)} tensors have rows that do not divide into {base.name}'s {block}-value "
               f"blocks, and llama.cpp stored them as: {'; '.join(parts)}")
    if block > 32:
        message += (f". For 4 bits on a model whose rows do not all divide into {block}, use --quant "
                    f"{' / '.join(SMALL_BLOCK_4BIT)} (32-value blocks)")
    return message
