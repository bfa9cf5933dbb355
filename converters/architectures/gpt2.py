"""The llama.cpp `gpt2` architecture: learned positions, LayerNorm with bias, fused QKV, tanh-GELU MLP.

Its loader requires every bias (src/models/gpt2.cpp): a checkpoint trained without them gets zero biases,
which compute exactly what no bias does. GELU is ggml_gelu: the tanh form, which llama.cpp's CPU backend
evaluates through a float16 table (input and output rounded to float16; ggml-cpu/vec.h, GGML_GELU_FP16).
"""

from __future__ import annotations

from typing import Any

from parrot_edge.converters.architectures._keys import common_metadata
from parrot_edge.converters.architectures.llama import LlamaConfig

ARCH = "gpt2"
GELU_APPROXIMATION = ("GELU: llama.cpp's CPU backend evaluates tanh-GELU through a float16 table (its input and "
                      "output rounded to float16); the checkpoint computes it in float32")


def gguf_metadata(config: LlamaConfig) -> dict[str, Any]:
    # config.norm_eps is the LayerNorm epsilon here
    return common_metadata(ARCH, config, rope=False) | {f"{ARCH}.attention.layer_norm_epsilon": float(config.norm_eps)}


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    c = config
    shapes = {"token_embd.weight": (c.n_vocab, c.n_embd), "position_embd.weight": (c.context_length, c.n_embd)}
    for i in range(c.n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (c.n_embd,), f"blk.{i}.attn_norm.bias": (c.n_embd,),
            f"blk.{i}.attn_qkv.weight": (3 * c.n_embd, c.n_embd), f"blk.{i}.attn_qkv.bias": (3 * c.n_embd,),
            f"blk.{i}.attn_output.weight": (c.n_embd, c.n_embd), f"blk.{i}.attn_output.bias": (c.n_embd,),
            f"blk.{i}.ffn_norm.weight": (c.n_embd,), f"blk.{i}.ffn_norm.bias": (c.n_embd,),
            f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd), f"blk.{i}.ffn_up.bias": (c.n_ff,),
            f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff), f"blk.{i}.ffn_down.bias": (c.n_embd,),
        }
    shapes |= {"output_norm.weight": (c.n_embd,), "output_norm.bias": (c.n_embd,)}
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.n_vocab, c.n_embd)
    return shapes
