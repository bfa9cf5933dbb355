"""The PyTorch reference forward of a Llama-style model: what the checkpoint computes, written out plainly.

The lit-gpt families have no other implementation available at run time, so verification compares
llama.cpp against this. It reads weights by their GGUF names but in the checkpoint's own layout
(rotate-half RoPE, Q/K rows not permuted), so a wrong permutation or split in the writer shows up as a
mismatch. Weights are fetched per layer as the forward reaches them: memory stays near one layer.
Tests prove it against transformers' LlamaForCausalLM and the litgpt package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from parrot_edge.converters.llama import LlamaConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(config: LlamaConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [time, head_dim] for rotate-half RoPE; linear scaling divides positions by rope_scale."""
    inv_freq = 1.0 / config.rope_base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    positions = torch.arange(length, dtype=torch.float64) / config.rope_scale
    angles = torch.outer(positions, inv_freq).repeat(1, 2)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@torch.inference_mode()
def llama_logits(config: LlamaConfig, weight: Callable[[str], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, time, n_vocab] for token ids [batch, time]; `weight(name)` returns a float32 tensor."""
    batch, length = tokens.shape
    hd, n_head, n_kv = config.head_dim, config.n_head, config.n_kv_head
    cos, sin = rope_tables(config, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    x = weight("token_embd.weight")[tokens]
    for i in range(config.n_layer):
        def w(part: str, i: int = i) -> torch.Tensor:
            return weight(f"blk.{i}.{part}.weight")

        h = rms_norm(x, w("attn_norm"), config.norm_eps)
        q = (h @ w("attn_q").T).view(batch, length, n_head, hd).transpose(1, 2)
        k = (h @ w("attn_k").T).view(batch, length, n_kv, hd).transpose(1, 2)
        v = (h @ w("attn_v").T).view(batch, length, n_kv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # grouped-query attention: query head j reads key/value head j // (n_head // n_kv)
        k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + attention.transpose(1, 2).reshape(batch, length, n_head * hd) @ w("attn_output").T

        h = rms_norm(x, w("ffn_norm"), config.norm_eps)
        x = x + (F.silu(h @ w("ffn_gate").T) * (h @ w("ffn_up").T)) @ w("ffn_down").T

    x = rms_norm(x, weight("output_norm.weight"), config.norm_eps)
    return x @ weight("token_embd.weight" if config.tied_embeddings else "output.weight").T
