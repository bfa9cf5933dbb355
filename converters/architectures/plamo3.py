"""The llama.cpp `plamo3` architecture: pre- and post-sublayer RMSNorms ("Peri-LN"), per-head q/k RMSNorm
BEFORE RoPE, fused QKV and fused SwiGLU.

Its graph (src/models/plamo3.cpp): RMSNorm → attn_qkv [Q; K; V] → RMSNorm of each query and key head (one
gain vector [head_dim]) → NEOX RoPE → attention → attn_output → RMSNorm (`post_attention_norm`) → +
residual → RMSNorm → ffn_up [gate; up] (ggml_swiglu: silu of the first half times the second) → ffn_down →
RMSNorm (`post_ffw_norm`) → + residual; final RMSNorm; `output` optional (tied). The two post-norms are
named without ".weight", as the loader asks for them. No sliding window unless its key is written.
"""

from __future__ import annotations

from typing import Any

from parrot_edge.converters.architectures._keys import common_metadata
from parrot_edge.converters.architectures.llama import LlamaConfig

ARCH = "plamo3"


def gguf_metadata(config: LlamaConfig) -> dict[str, Any]:
    return common_metadata(ARCH, config, rope=True) | {
        f"{ARCH}.attention.layer_norm_rms_epsilon": float(config.norm_eps)}


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    c = config
    q_rows, kv_rows = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    shapes = {"token_embd.weight": (c.n_vocab, c.n_embd)}
    for i in range(c.n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (c.n_embd,),
            f"blk.{i}.attn_qkv.weight": (q_rows + 2 * kv_rows, c.n_embd),
            f"blk.{i}.attn_q_norm.weight": (c.head_dim,),
            f"blk.{i}.attn_k_norm.weight": (c.head_dim,),
            f"blk.{i}.attn_output.weight": (c.n_embd, q_rows),
            f"blk.{i}.post_attention_norm": (c.n_embd,),
            f"blk.{i}.ffn_norm.weight": (c.n_embd,),
            f"blk.{i}.ffn_up.weight": (2 * c.n_ff, c.n_embd),
            f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff),
            f"blk.{i}.post_ffw_norm": (c.n_embd,),
        }
    shapes["output_norm.weight"] = (c.n_embd,)
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.n_vocab, c.n_embd)
    return shapes
