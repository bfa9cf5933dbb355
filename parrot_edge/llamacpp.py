"""The one door to llama.cpp (through llama-cpp-python's ctypes bindings).

Importing llama_cpp is slow and pulls a native library, so callers get it from `lib()` when they need it.
llama.cpp's own log is kept in a small ring buffer instead of flooding the terminal: when llama.cpp
refuses something (a corrupt file, an unknown architecture, a failed quantisation) it only logs why, and
`recent_log()` lets the caller put that reason in its error message.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from functools import cache
from pathlib import Path

from parrot_edge.errors import ParrotEdgeError

log = logging.getLogger("parrot_edge.llama")
_recent: collections.deque[str] = collections.deque(maxlen=40)
_recent_lock = threading.Lock()


# K- and i-quant weights have faster CPU kernels that compute a row differently depending on how many rows
# share the matrix multiplication (measured: tests/test_exactness.py on a Q4_K_M model), which would make an
# answer depend on its company. The repacked one is decided per model by `repack_policy`. The tiled one
# (ggml-cpu/tiled/tiled.cpp: the K- and i-quant weights not repacked, in a Q4_K_M file the Q6_K ones, output
# included) takes 8 rows or more and leaves fewer to vec_dot, which sums in another order. It is switched off
# for the whole process, or forced to take every row count (`force_tiled_matmul`), which is exact too.
BATCH_VARIANT_TYPE_PREFIXES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ", "TQ")
# What ggml-cpu repacks on x86 whose repacked kernels differ by a row's place in its micro-batch (gemm for
# groups of 4, gemv for the rest: repack.cpp, see parrot_edge/engine/padding.py). The other types it repacks
# there (Q4_0, IQ4_NL, MXFP4) compute a row alike either way; K-quants other than these it does not repack.
PADDED_REPACK_TYPES = ("Q4_K", "Q2_K")


_tiled_forced = False


def force_tiled_matmul() -> None:
    """Force ggml's tiled matmul to take every row count, for this whole process: ggml reads the switches once,
    at the process's first matrix multiplication, so this must come before any decode (later, it changes
    nothing: the kernel stays off, which is exact and slower). Forced, a row computes the same alone and among
    32 rows (measured on ParrotAI-1.1B's shape as Q4_K_M, weights as stored, 1 to 32 rows: one result;
    tests/test_engine.py runs a class on it). Cheaper than vec_dot from 16 rows on, dearer below (the
    engine forces it only for large classes: engine/context.py, TILED_MIN_SLOTS)."""
    global _tiled_forced
    _tiled_forced = True
    os.environ["GGML_CPU_TILED_MM"] = os.environ["GGML_CPU_TILED_MM_FORCE"] = "1"


def tiled_matmul_forced() -> bool:
    return _tiled_forced


@cache
def lib():
    """The llama_cpp module, imported once, with its log captured and the backend initialised."""
    if not _tiled_forced:  # see BATCH_VARIANT_TYPE_PREFIXES
        os.environ["GGML_CPU_TILED_MM"] = "0"
    import llama_cpp

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user_data) -> None:
        message = text.decode("utf-8", errors="replace")
        with _recent_lock:
            if level == 5 and _recent:  # continuation of the previous line
                _recent[-1] += message
            else:
                _recent.append(message)
        # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continue. Errors reach users through the
        # exceptions that quote recent_log(), so the log itself stays at debug level.
        log.debug("llama.cpp[%d] %s", level, message.rstrip())

    lib._callback = on_log  # keep the ctypes callback alive for as long as the library lives
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    return llama_cpp


@cache
def amx_build() -> bool:
    """Whether this llama.cpp was compiled with its AMX kernels (a -march=native build on a Xeon of the Sapphire
    Rapids generation or later). They crash in ggml_backend_amx_mul_mat on quantised models (llama.cpp issue
    20824; reproduced on this project's CI machine with every quantised test model), and they come in as an
    "extra buffer type", so such a build loads weights without any (see load_model): slower, never a crash.
    The Makefile builds without AMX, and the portable bundle does not install its AMX variant."""
    return "AMX_INT8 = 1" in lib().llama_print_system_info().decode(errors="replace")


def recent_log(lines: int = 6) -> str:
    """The last warning/error-looking lines llama.cpp printed, for error messages."""
    with _recent_lock:
        tail = [line.strip() for line in _recent if line.strip()]
    interesting = [line for line in tail if any(w in line.lower() for w in ("error", "fail", "invalid", "unknown",
                                                                              "exceed", "unsupported", "wrong"))]
    return " | ".join((interesting or tail)[-lines:])


def load_model(path: Path, *, vocab_only: bool = False, repack: bool = True):
    """Load a GGUF with llama.cpp; returns the `llama_model` pointer or raises a clear error. `repack=False`
    keeps the weights in their file layout (no "extra buffer types"): see `repack_policy`, and `amx_build`,
    which rules them out.

    Repacked weights are copies: llama.cpp reads each from the file into its repack buffer. From a memory map
    the pages it read stay mapped and resident beside the copy (llama.cpp unmaps only the file's ends), so a
    repacked model is read instead: ParrotAI-1.1B at Q4_K_M adds 648 MB of resident memory loaded that way,
    1,091 MB mapped (tests/test_memory.py). Unrepacked weights are used in place, so those stay mapped."""
    llama = lib()
    params = llama.llama_model_default_params()
    params.vocab_only = vocab_only
    params.use_extra_bufts = repack and not amx_build()
    mapped = vocab_only or not params.use_extra_bufts
    params.load_mode = llama.LLAMA_LOAD_MODE_MMAP if mapped else llama.LLAMA_LOAD_MODE_NONE
    model = llama.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ParrotEdgeError(f"llama.cpp could not load {path}: {recent_log() or 'no reason given'}")
    return model


def repack_policy(path: Path, allow: bool = True) -> str:
    """How the engine loads a model so that batching stays exact:
    "exact"  repacked weights, which compute every row the same in any batch (F32/F16/Q8_0/Q4_0/Q4_1, and on
             x86 every type but Q4_K and Q2_K: tests/test_exactness.py);
    "padded" repacked weights whose row results depend on the row's place in its micro-batch (Q4_K, Q2_K on
             x86): exact only with the engine's padded steps (parrot_edge/engine/padding.py), or, in a
             context of one slot, with micro-batches under 4 rows (engine/context.py, GEMV_UBATCH_ROWS);
    "off"    weights kept in their file layout: K- and i-quants elsewhere than x86 (their repacked kernels
             there are other, unmeasured ones), `allow=False` (the repacked_weights = "off" setting), or a
             build with AMX kernels (`amx_build`), which loads no model repacked."""
    import platform

    import gguf

    from parrot_edge.store.gguf_check import read_header

    types = {gguf.GGMLQuantizationType(tensor.ggml_type).name for tensor in read_header(path).tensors}
    variant = any(name.startswith(BATCH_VARIANT_TYPE_PREFIXES) for name in types)
    if not variant:
        return "exact"
    if not allow or amx_build() or platform.machine() not in ("x86_64", "AMD64"):
        return "off"
    return "padded" if types & set(PADDED_REPACK_TYPES) else "exact"


class Batch:
    """A llama_batch of up to `capacity` rows, each in one sequence, filled a run of positions at a time.

    The rows' arrays are numpy views of llama.cpp's own memory, so a run is copied in with a few slice
    assignments instead of a Python loop over ctypes fields (this is on the engine's hot path)."""

    def __init__(self, capacity: int):
        import numpy as np

        self._np = np
        self._llama = lib()
        self.raw = self._llama.llama_batch_init(capacity, 0, 1)
        self.capacity = capacity
        self._tokens = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))
        self._positions = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))[:] = 1
        self.raw.n_tokens = 0

    @property
    def rows(self) -> int:
        return self.raw.n_tokens

    def clear(self) -> None:
        self.raw.n_tokens = 0

    def add(self, tokens: list[int], first_position: int, seq_id: int, logits: bool = False) -> int:
        """Append `tokens` at consecutive positions of sequence `seq_id`; the batch index of the first."""
        start, end = self.raw.n_tokens, self.raw.n_tokens + len(tokens)
        self._tokens[start:end] = tokens
        self._positions[start:end] = self._np.arange(first_position, first_position + len(tokens))
        self._logits[start:end] = logits
        for i in range(start, end):
            self.raw.seq_id[i][0] = seq_id
        self.raw.n_tokens = end
        return start

    @property
    def outputs(self) -> int:
        """Rows asking for logits."""
        return int(self._logits[:self.raw.n_tokens].sum())

    def want_logits(self, start: int, end: int) -> None:
        """Ask for the logits of rows start..end-1."""
        self._logits[start:end] = 1

    def free(self) -> None:
        self._llama.llama_batch_free(self.raw)
