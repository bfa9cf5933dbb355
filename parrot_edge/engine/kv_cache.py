"""The KV cache's types: what keys and values are stored as, the memory that takes, and what it does to exactness.

llama.cpp's CPU flash attention has a faster split kernel for a micro-batch of one row over 512 cells or more,
which rounds differently from the row-by-row kernel every other row takes; it (and the tiled kernel for 64 rows
of a sequence) runs only where keys and values are both F16 (or both F32, which llama.cpp casts to F16 for
flash attention: llama-graph.cpp), ggml-cpu ops.cpp `kv_is_f32_or_f16 && k->type == v->type`. So:

  * "f16-bf16", the default: f16 keys, bf16 values. Same memory as f16; no row ever takes the split kernel, so
    a student alone deep in a conversation is evaluated one row a step, with no companion row (exactness.py).
    Values are read as f32 and summed in f32 (f16 values are summed in f16), so answers are as close to an
    exact F32 evaluation as with f16 values (the README's figures; `parrot-edge bench memory` measures them).
  * "f16": keys and values f16, llama.cpp's own default. A lone row past 256 cells needs a companion row to
    stay exact, which makes one student alone deep in a conversation 1.6-1.8× slower (measured at 1.1B).
  * "q8_0": keys and values 8-bit, about half the memory: twice the students in the same RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

# ggml's type ids (ggml.h `enum ggml_type`; llama-cpp-python's bindings lack BF16)
GGML_F16, GGML_Q8_0, GGML_BF16 = 1, 8, 30


@dataclass(frozen=True)
class KVType:
    keys: int  # ggml type id
    values: int
    scale: float  # bytes per byte of an f16 cache

    @property
    def split_kernel_possible(self) -> bool:
        """Whether a lone row over many cells takes llama.cpp's split kernel (and 64 rows the tiled one)."""
        return self.keys == self.values == GGML_F16


KV_TYPES = {
    "f16-bf16": KVType(GGML_F16, GGML_BF16, 1.0),
    "f16": KVType(GGML_F16, GGML_F16, 1.0),
    "q8_0": KVType(GGML_Q8_0, GGML_Q8_0, 34 / 64),  # 32 values in 34 bytes (f16: 64)
}
DEFAULT_KV_TYPE = "f16-bf16"
