"""The --quant choices and how each is made: one table, plain strings, so `parrot-edge --help` can list
them without importing gguf (or anything else the kiosk does not install).

Names are gguf-py's enum names: convert.py and quantize.py turn them into gguf.GGMLQuantizationType /
gguf.LlamaFileType.
"""

from __future__ import annotations

# Written by parrot-edge's own GGUF writer: --quant value → GGML type of the weight matrices.
DIRECT_QUANTS: dict[str, str] = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
# Made by llama.cpp's quantiser: --quant value → (llama_ftype, GGML type of its ordinary weight matrices).
LLAMA_CPP_QUANTS: dict[str, tuple[str, str]] = {
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"),
    "q4_0": ("MOSTLY_Q4_0", "Q4_0"),
    "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
    "iq4_nl": ("MOSTLY_IQ4_NL", "IQ4_NL"),  # 4.5 bits like Q4_0, a non-linear grid: closer, no imatrix needed
    "iq4_xs": ("MOSTLY_IQ4_XS", "IQ4_XS"),  # IQ4_NL's grid in 256-value super-blocks: 4.25 bits
    "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"),
    "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K"),
}
QUANT_CHOICES: tuple[str, ...] = (*DIRECT_QUANTS, *LLAMA_CPP_QUANTS)
# 4-bit types of 32-value blocks: what a model whose rows do not divide into 256 should use instead of K-quants
SMALL_BLOCK_4BIT = ("q4_0", "q4_1", "iq4_nl")
# Calibrated unless --no-calibrate (converters/importance.py): the 4-bit types, where rounding costs the most
CALIBRATED_BY_DEFAULT = ("q4_0", "q4_1", "iq4_nl", "iq4_xs", "q4_k_m")
# ggml's Q8_0 quantiser takes no importance matrix (quantize_q8_0 ignores it): --calibrate cannot change it
NOT_CALIBRATED = ("q8_0",)
