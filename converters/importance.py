"""The importance matrix: how strongly each input column of every weight matrix is driven, on calibration text.

For a matrix W applied as y = x·Wᵀ, quantising W[:, j] wrongly costs in proportion to x_j², so llama.cpp's
quantisers (ggml-quants.c, the `quant_weights` of every Q4_0/Q4_1/IQ4_NL/IQ4_XS/K-quant) weight each value's
rounding error by the mean of x_j² over the calibration tokens: the "importance matrix" that llama-imatrix
measures by running the model in llama.cpp. Here it is measured in the checkpoint's own PyTorch reference
forward (converters/reference.py), in float32, and handed to llama.cpp's quantiser (converters/quantize.py).

Memory stays near one layer: the residual stream of every calibration window is kept (windows × tokens ×
width floats: 40 windows of 512 tokens of a 2048-wide model are 168 MB), one layer's weights are loaded, the
windows pass through it a few at a time, and the layer is dropped before the next is loaded.

The forward reports the input of each role (attention in and out, MLP in and hidden, output); ROLE_TENSORS
names the GGUF tensors that read each, whatever the family (fused QKV, fused gate+up, padded d_ff).
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from parrot_edge.converters.checkpoint import Checkpoint, GGUFTensor
from parrot_edge.converters.reference import ATTN_IN, ATTN_OUT, FFN_HIDDEN, FFN_IN, OUTPUT

# GGUF tensor part (blk.N.<part>.weight) → the role whose input it reads, for every architecture written
ROLE_TENSORS = {
    "attn_q": ATTN_IN, "attn_k": ATTN_IN, "attn_v": ATTN_IN, "attn_qkv": ATTN_IN,
    "attn_output": ATTN_OUT,
    "ffn_gate": FFN_IN, "ffn_up": FFN_IN,
    "ffn_down": FFN_HIDDEN,
}
WINDOWS_PER_STEP = 4  # windows through a layer at once: 2048 rows keep the matrix products efficient
# Columns that no calibration token drove (and zero-padded columns, whose weights are zero) still get a small
# positive importance, a fraction of the tensor's mean: the quantisers divide by sums of importances
FLOOR = 1e-3
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class _Sums:
    """Σ x² per column and the number of rows, for every (layer, role)."""

    def __init__(self):
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[tuple[int, str], int] = {}

    def observer(self, layer: int):
        def observe(role: str, x: torch.Tensor) -> None:
            flat = x.reshape(-1, x.shape[-1])
            key = (layer, role)
            squares = flat.float().pow(2).sum(0, dtype=torch.float64)  # float64: thousands of rows are summed
            self.sums[key] = self.sums[key] + squares if key in self.sums else squares
            self.rows[key] = self.rows.get(key, 0) + flat.shape[0]
        return observe

    def mean(self, layer: int, role: str) -> torch.Tensor | None:
        key = (layer, role)
        return self.sums[key] / self.rows[key] if key in self.sums else None


@cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): the statistics are then gathered in
    bfloat16 matrix products, 1.6× faster than float32 on the CI machine's Xeon and as useful (SmolLM2-135M, 4096
    tokens: 6.6 s against 10.4 s, Q4_K_M held-out perplexity 15.016 against 15.034). Elsewhere float32.
    The flags are the kernel's (Linux); anything else counts as no."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


@torch.inference_mode()
def measure(checkpoint: Checkpoint, windows: list[list[int]], description: str = "calibrating") -> _Sums:
    """Run the windows through the reference forward layer by layer, gathering Σ x² of every role's input."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bfloat16()):
        return _measure(checkpoint, windows, description)


def _measure(checkpoint: Checkpoint, windows: list[list[int]], description: str) -> _Sums:
    reference, sums = checkpoint.reference, _Sums()
    forward = reference.forward
    steps = torch.tensor(windows).split(WINDOWS_PER_STEP)
    stage = cache(reference.weight)  # one stage's weights (the embedding, a layer, the final norm), loaded once
    x = [forward.embed(stage, tokens) for tokens in steps]
    with tqdm(total=forward.n_layer, unit="layer", desc=description, file=sys.stderr, disable=None,
              leave=False) as bar:
        for i in range(forward.n_layer):
            stage = cache(reference.weight)
            x = [forward.block(stage, i, part, sums.observer(i)) for part in x]
            bar.update(1)
    stage = cache(reference.weight)
    observe = sums.observer(forward.n_layer)
    for part in x:
        observe(OUTPUT, forward.final(stage, part))
    return sums


def gguf_importance(sums: _Sums, tensors: list[GGUFTensor], n_layer: int) -> dict[str, np.ndarray]:
    """Importance (float32, one value per input column) for every GGUF matrix that reads a measured input.

    The output matrix is `output.weight`, or the token embedding where the two are tied (llama.cpp then
    quantises token_embd as the output). A tensor wider than its measured input (d_ff zero-padded to a block
    multiple) gets the floor for the padded columns."""
    names = {tensor.name for tensor in tensors}
    output = "output.weight" if "output.weight" in names else "token_embd.weight"
    importance = {}
    for tensor in tensors:
        if len(tensor.shape) != 2:
            continue
        match = _BLOCK_NAME.fullmatch(tensor.name)
        if match and match[2] in ROLE_TENSORS:
            mean = sums.mean(int(match[1]), ROLE_TENSORS[match[2]])
        elif tensor.name == output:
            mean = sums.mean(n_layer, OUTPUT)
        else:
            continue
        if mean is None:
            raise AssertionError(f"the reference forward reported no input for {tensor.name}: out of step with "
                                 "ROLE_TENSORS")
        importance[tensor.name] = _padded(mean, tensor.shape[1], tensor.name)
    return importance


def _padded(mean: torch.Tensor, columns: int, name: str) -> np.ndarray:
    if columns < mean.numel():
        raise AssertionError(f"{name} has {columns} columns but its input {mean.numel()}")
    floor = FLOOR * float(mean.mean()) or FLOOR
    values = torch.full((columns,), floor, dtype=torch.float64)
    values[: mean.numel()] = mean.clamp(min=floor)
    return values.float().numpy()


def importance_matrix(checkpoint: Checkpoint, windows: list[list[int]]) -> dict[str, np.ndarray]:
    """The importance matrix of `checkpoint` on the token windows, by GGUF tensor name."""
    sums = measure(checkpoint, windows)
    return gguf_importance(sums, checkpoint.gguf_tensors(), checkpoint.reference.forward.n_layer)
