"""The llama.cpp `hunyuan-dense` architecture: a pre-norm Llama whose per-head q/k RMSNorm comes AFTER RoPE.

Its graph (src/models/hunyuan-vl.cpp, which hunyuan-dense shares): RMSNorm → Q, K, V → NEOX RoPE (pairs
i, i + head_dim/2) → RMSNorm of each query and key head with one shared gain vector [head_dim] →
attention → + residual → RMSNorm → SwiGLU → + residual; final RMSNorm; `output` optional (tied). That is
ParrotLLM's QK-norm generation exactly, once Q/K rows and the q/k-norm gains are reordered from
ParrotLLM's interleaved pairs (2i, 2i+1) to NEOX's (i, i + head_dim/2): the same reordering of every
head's dimensions on both sides leaves attention scores and the per-head RMS unchanged.
"""

from __future__ import annotations

from typing import Any

from parrot_edge.converters.architectures._keys import common_metadata
from parrot_edge.converters.architectures.llama import LlamaConfig
from parrot_edge.converters.architectures.llama import tensor_shapes as llama_shapes

ARCH = "hunyuan-dense"


def gguf_metadata(config: LlamaConfig) -> dict[str, Any]:
    return common_metadata(ARCH, config, rope=True) | {
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(config.norm_eps)}


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """llama's tensors plus each layer's attn_q_norm / attn_k_norm [head_dim], in writing order."""
    shapes = {}
    for name, shape in llama_shapes(config).items():
        shapes[name] = shape
        if name.endswith("attn_output.weight"):
            layer = name.rsplit(".", 2)[0]
            shapes[f"{layer}.attn_q_norm.weight"] = shapes[f"{layer}.attn_k_norm.weight"] = (config.head_dim,)
    return shapes
