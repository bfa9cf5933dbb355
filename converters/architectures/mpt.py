"""The llama.cpp `mpt` architecture: LayerNorm, fused QKV, ALiBi, tanh-GELU MLP, no RoPE.

Its graph (src/models/mpt.cpp): LayerNorm (bias optional) → attn_qkv [Q; K; V] (Q and output are n_embd
wide: heads × head size must be n_embd) → attention with ALiBi → + residual → LayerNorm → ffn_up →
ggml_gelu → ffn_down → + residual; final LayerNorm; `output` optional (tied). The ALiBi slopes are
ggml's rule (soft_max_ext / flash_attn_ext): with n2 = 2^⌊log2 n_head⌋, head h < n2 gets
m0^(h+1) with m0 = 2^(−max_bias/n2), head h ≥ n2 gets m1^(2(h−n2)+1) with m1 = 2^(−max_bias/(2·n2)).
"""

from __future__ import annotations

from typing import Any

from parrot_edge.converters.architectures._keys import common_metadata
from parrot_edge.converters.architectures.llama import LlamaConfig

ARCH = "mpt"


def gguf_metadata(config: LlamaConfig, max_alibi_bias: float) -> dict[str, Any]:
    # config.norm_eps is the LayerNorm epsilon here
    return common_metadata(ARCH, config, rope=False) | {
        f"{ARCH}.attention.layer_norm_epsilon": float(config.norm_eps),
        f"{ARCH}.attention.max_alibi_bias": float(max_alibi_bias),
    }


def alibi_slopes(n_head: int, max_alibi_bias: float) -> list[float]:
    """The slope llama.cpp gives each head (ggml's rule above), in float64."""
    n2 = 2 ** (n_head.bit_length() - 1)
    m0, m1 = 2.0 ** (-max_alibi_bias / n2), 2.0 ** (-max_alibi_bias / (2 * n2))
    return [m0 ** (h + 1) if h < n2 else m1 ** (2 * (h - n2) + 1) for h in range(n_head)]


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The tensors without biases (all optional in mpt), in writing order."""
    c = config
    shapes = {"token_embd.weight": (c.n_vocab, c.n_embd)}
    for i in range(c.n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (c.n_embd,), f"blk.{i}.attn_qkv.weight": (3 * c.n_embd, c.n_embd),
            f"blk.{i}.attn_output.weight": (c.n_embd, c.n_embd), f"blk.{i}.ffn_norm.weight": (c.n_embd,),
            f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd), f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff),
        }
    shapes["output_norm.weight"] = (c.n_embd,)
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.n_vocab, c.n_embd)
    return shapes
