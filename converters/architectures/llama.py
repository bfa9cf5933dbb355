"""The llama.cpp `llama` architecture: config, GGUF metadata keys, tensor names and shapes, the Q/K
permutation, the checkpoint class families hand their tensors to, and the PyTorch reference forward.

All three families of this converter (HF Llama, TinyLlama/lit-gpt, modern litgpt) are Llama-style
models; each maps its own keys onto the tensor names below and hands them to `LlamaCheckpoint`, which
writes them for llama.cpp and runs them through the reference forward.

Why the permutation: HF and lit-gpt apply RoPE "rotate-half" (dimension i pairs with i + head_dim/2),
llama.cpp's `llama` rotates adjacent pairs (2i, 2i+1). Reordering the rows of every Q and K head so that
row 2i+j comes from row j·head_dim/2 + i makes the two agree exactly; V and the output projection are
untouched (attention scores q·k do not depend on a shared reordering of q and k).

Why a reference forward of our own: the lit-gpt families have no other implementation available at run
time, so verification compares llama.cpp against this. It reads weights by their GGUF names but in the
checkpoint's own layout (rotate-half RoPE, Q/K rows not permuted), so a wrong permutation or split in the
writer shows up as a mismatch. Weights are fetched per layer as the forward reaches them: memory stays
near one layer. Tests prove it against transformers' LlamaForCausalLM and the litgpt package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from parrot_edge.converters.checkpoint import GGUFTensor, SourceInfo
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.reference import ATTN_IN, ATTN_OUT, FFN_HIDDEN, FFN_IN, Observe, Reference, Weight

# -- config


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-style architecture in llama.cpp's terms."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_ff: int
    n_vocab: int  # rows of the token embedding and of output.weight
    context_length: int
    rope_base: float = 10000.0
    rope_scale: float = 1.0  # linear RoPE scaling: positions are divided by this factor
    norm_eps: float = 1e-5
    tied_embeddings: bool = False

    def __post_init__(self):
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "n_ff",
                                               "n_vocab", "context_length")}
        if any(not isinstance(v, int) or v <= 0 for v in sizes.values()):
            raise BadInput(f"architecture sizes must be positive integers: {sizes}")
        if self.n_head % self.n_kv_head:
            raise BadInput(f"n_head {self.n_head} is not a multiple of the key/value heads {self.n_kv_head}")
        if self.head_dim % 2:
            raise BadInput(f"head size {self.head_dim} is odd: RoPE needs pairs of dimensions")
        if self.rope_scale <= 0 or self.rope_base <= 0 or self.norm_eps <= 0:
            raise BadInput(f"rope base {self.rope_base}, rope scale {self.rope_scale} and norm eps "
                           f"{self.norm_eps} must be positive")


# -- GGUF metadata and tensors


def gguf_metadata(config: LlamaConfig) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "llama.context_length": config.context_length,
        "llama.embedding_length": config.n_embd,
        "llama.block_count": config.n_layer,
        "llama.feed_forward_length": config.n_ff,
        "llama.attention.head_count": config.n_head,
        "llama.attention.head_count_kv": config.n_kv_head,
        "llama.attention.layer_norm_rms_epsilon": float(config.norm_eps),
        "llama.rope.freq_base": float(config.rope_base),
        "llama.rope.dimension_count": config.head_dim,
        "llama.vocab_size": config.n_vocab,
    }
    if config.head_dim * config.n_head != config.n_embd:  # llama.cpp assumes n_embd / n_head otherwise
        meta["llama.attention.key_length"] = meta["llama.attention.value_length"] = config.head_dim
    if config.rope_scale != 1.0:
        meta["llama.rope.scaling.type"] = "linear"
        meta["llama.rope.scaling.factor"] = float(config.rope_scale)
    return meta


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a `llama` GGUF and its torch-order shape, in writing order."""
    c = config
    q_rows, kv_rows = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    shapes = {"token_embd.weight": (c.n_vocab, c.n_embd)}
    for i in range(c.n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (c.n_embd,),
            f"blk.{i}.attn_q.weight": (q_rows, c.n_embd),
            f"blk.{i}.attn_k.weight": (kv_rows, c.n_embd),
            f"blk.{i}.attn_v.weight": (kv_rows, c.n_embd),
            f"blk.{i}.attn_output.weight": (c.n_embd, q_rows),
            f"blk.{i}.ffn_norm.weight": (c.n_embd,),
            f"blk.{i}.ffn_gate.weight": (c.n_ff, c.n_embd),
            f"blk.{i}.ffn_up.weight": (c.n_ff, c.n_embd),
            f"blk.{i}.ffn_down.weight": (c.n_embd, c.n_ff),
        }
    shapes["output_norm.weight"] = (c.n_embd,)
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.n_vocab, c.n_embd)
    return shapes


# -- Q/K permutation


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows (2, hd/2) → (hd/2, 2): new row 2i+j = old row j·hd/2 + i."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse reordering, (hd/2, 2) → (2, hd/2), for reading a `llama` GGUF back."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# -- the checkpoint, as families hand it over


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the llama layout (GGUF name, checkpoint's RoPE order), as a family provides it."""

    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    stream: Callable[[], Iterator[torch.Tensor]] | None = None  # as GGUFTensor.stream


class LlamaCheckpoint:
    """A Llama-style checkpoint, whatever its family: written as `llama`, run by the reference forward."""

    arch = "llama"

    def __init__(self, source: SourceInfo, config: LlamaConfig, tensors: dict[str, SourceTensor]):
        self.source = source
        self.config = config
        self.tensors = tensors
        self.n_vocab = config.n_vocab
        self.context_length = config.context_length
        self.parameter_count = sum(math.prod(shape) for shape in tensor_shapes(config).values())
        self.approximations: list[str] = []  # every Llama-style checkpoint maps exactly
        # the checkpoint's function; a family whose checkpoint computes something else replaces it (ParrotLLM)
        self.reference = Reference(LlamaForward(config), lambda name: self.tensors[name].load().float())

    def gguf_metadata(self) -> dict[str, Any]:
        return gguf_metadata(self.config)

    def gguf_tensors(self) -> list[GGUFTensor]:
        heads = {"attn_q.weight": self.config.n_head, "attn_k.weight": self.config.n_kv_head}
        out = []
        for name, shape in tensor_shapes(self.config).items():
            source = self.tensors[name]
            n_heads = heads.get(name.split(".", 2)[-1])
            if n_heads is None:
                out.append(GGUFTensor(name, shape, source.dtype, source.load, source.stream))
            else:
                out.append(GGUFTensor(name, shape, source.dtype, _permuted(source.load, n_heads)))
        return out

    def reference_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.reference.logits(tokens)


def _permuted(load: Callable[[], torch.Tensor], n_heads: int) -> Callable[[], torch.Tensor]:
    # rotate_half_to_interleaved is looked up at call time, so a test can skip it and see verification fail
    return lambda: rotate_half_to_interleaved(load(), n_heads)


# -- reference forward


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


@dataclass(frozen=True)
class LlamaForward:
    """The Llama forward (converters/reference.py's LayeredForward) over weights named as the `llama` GGUF's."""

    config: LlamaConfig

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def output_key(self) -> str:
        return "token_embd.weight" if self.config.tied_embeddings else "output.weight"

    def embed(self, weight: Weight, tokens: torch.Tensor) -> torch.Tensor:
        return weight("token_embd.weight")[tokens]

    def block(self, weight: Weight, i: int, x: torch.Tensor, observe: Observe) -> torch.Tensor:
        config = self.config
        batch, length, _ = x.shape
        hd, n_head, n_kv = config.head_dim, config.n_head, config.n_kv_head
        cos, sin = rope_tables(config, length)

        def w(part: str) -> torch.Tensor:
            return weight(f"blk.{i}.{part}.weight")

        h = rms_norm(x, w("attn_norm"), config.norm_eps)
        observe(ATTN_IN, h)
        q = (h @ w("attn_q").T).view(batch, length, n_head, hd).transpose(1, 2)
        k = (h @ w("attn_k").T).view(batch, length, n_kv, hd).transpose(1, 2)
        v = (h @ w("attn_v").T).view(batch, length, n_kv, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # grouped-query attention: query head j reads key/value head j // (n_head // n_kv)
        k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
        # softmax(q·kᵀ/√hd, causal)·v, fused: a [time, time] score matrix per head is never stored
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attention = attention.transpose(1, 2).reshape(batch, length, n_head * hd)
        observe(ATTN_OUT, attention)
        x = x + attention @ w("attn_output").T

        h = rms_norm(x, w("ffn_norm"), config.norm_eps)
        observe(FFN_IN, h)
        hidden = F.silu(h @ w("ffn_gate").T) * (h @ w("ffn_up").T)
        observe(FFN_HIDDEN, hidden)
        return x + hidden @ w("ffn_down").T

    def final(self, weight: Weight, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight("output_norm.weight"), self.config.norm_eps)
