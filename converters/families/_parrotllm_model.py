"""ParrotLLM's generations, told apart by their keys, and what each computes (the reference forwards).

A helper of families/parrotllm.py (hence the "_"): imported only once a checkpoint is opened, so torch
may be imported at the top. ParrotLLM (cyrilgabriele/ParrotLLM, src/model/transformer.py) changed its
architecture several times; a trainer checkpoint holds the state dict of whichever one trained it:

  1   RMSNorm pre-norm, interleaved RoPE (pairs 2i, 2i+1), SwiGLU, tied embeddings — the seed README's model
  1a  the same model under its first key names (attn_norm, ffn_norm, ffn.*, final_norm) with rotate-half RoPE
  2   1 + per-head q/k RMSNorm after RoPE (`attn.q_norm`, `attn.k_norm`)
  3   2 + post-sublayer RMSNorms ("Peri-LN": `ln_1_out`, `ln_2_out`)
  4   3 without `ln_2` and/or `ln_f` (its forward skips what is missing)
  5   the oldest, GPT-2-like: learned `pos_emb`, LayerNorm with bias, tanh-GELU MLP (`mlp.c_fc`, `mlp.c_proj`)

The forwards below are written from ParrotLLM's code, not from any llama.cpp architecture: verification
compares llama.cpp against them, so an approximate target shows up as a measured difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parrot_edge.converters.checkpoint import StateDictSizes
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.reference import ATTN_IN, ATTN_OUT, FFN_HIDDEN, FFN_IN, Observe, Weight

RMS_EPS = 1e-6  # every RMSNorm of ParrotLLM, q/k norms included
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, generation 5

# a block's parts → key suffix, per naming; "ln_1_out" etc. exist only where the generation has them
_NAMES = {
    "current": {"ln_1": "ln_1", "ln_2": "ln_2", "ln_f": "ln_f", "mlp": "mlp"},
    "first": {"ln_1": "attn_norm", "ln_2": "ffn_norm", "ln_f": "final_norm", "mlp": "ffn"},
}


@dataclass(frozen=True)
class Layout(StateDictSizes):
    """Which ParrotLLM generation a state dict is, and the sizes its keys and config give."""

    generation: str
    rope_base: float
    naming: str = "current"
    qk_norm: bool = False
    peri_ln: bool = False
    tied: bool = True

    def key(self, part: str, layer: int | None = None) -> str:
        """The state-dict key of a part: key("ln_1", 3) → blocks.3.ln_1.weight; key("gate_proj", 0) → …mlp.gate_proj."""
        names = _NAMES[self.naming]
        if part in ("gate_proj", "up_proj", "down_proj", "c_fc", "c_proj"):
            part = f"{names['mlp']}.{part}"
        elif part in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            part = f"attn.{part}"
        else:
            part = names.get(part, part)
        return f"{part}.weight" if layer is None else f"blocks.{layer}.{part}.weight"


def identify(keys: set[str]) -> tuple[str, dict[str, bool]]:
    """(generation, its flags) from the keys of a ParrotLLM state dict, or a refusal naming what has no
    llama.cpp counterpart."""
    def any_block(suffix: str) -> bool:
        return any(k.startswith("blocks.") and k.endswith(suffix) for k in keys)

    if "pos_emb.weight" in keys or any_block("mlp.c_fc.weight"):
        return "5", {}
    if any_block("attn_norm.weight"):
        return "1a", {}
    if any_block(".bias"):
        raise BadInput("this ParrotLLM checkpoint has bias tensors (trained with bias: true); parrot-edge converts "
                       "the bias-free RMSNorm generations only")
    qk_norm, peri = any_block("attn.q_norm.weight"), any_block("ln_1_out.weight")
    missing = [name for name, present in (("ln_2 (the norm before each MLP)", any_block(".ln_2.weight")),
                                          ("ln_f (the final norm)", "ln_f.weight" in keys)) if not present]
    if missing:
        raise BadInput(f"this ParrotLLM checkpoint (generation 4) has no {' and no '.join(missing)}: its forward then "
                       "feeds the raw residual stream on, and every llama.cpp architecture normalises there (an "
                       "RMSNorm with unit gain is not the identity), so no llama.cpp architecture computes it")
    if peri and not qk_norm:
        raise BadInput("this ParrotLLM checkpoint has post-sublayer norms (ln_1_out) but no q/k norms: no ParrotLLM "
                       "generation looks like that, and parrot-edge does not convert it")
    if peri != any_block("ln_2_out.weight"):
        raise BadInput("this ParrotLLM checkpoint has only one of the post-sublayer norms ln_1_out / ln_2_out")
    return ("3" if peri else "2" if qk_norm else "1"), {"qk_norm": qk_norm, "peri_ln": peri}


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight


def rope(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """ParrotLLM's RoPE on [batch, heads, time, head_dim], in float32 as it computes it: interleaved pairs
    (2i, 2i+1) for every generation but 1a, which rotates halves (i, i + head_dim/2)."""
    hd, length = layout.head_dim, x.shape[2]
    inv_freq = 1.0 / (layout.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    if layout.naming == "first":
        first, second = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


@dataclass(frozen=True)
class _LayoutForward:
    """What both forwards below share: the checkpoint's layout, and its number of layers."""

    layout: Layout

    @property
    def n_layer(self) -> int:
        return self.layout.n_layer


class RMSForward(_LayoutForward):
    """Generations 1 to 3 (converters/reference.py's LayeredForward, over ParrotLLM's own keys)."""

    @property
    def output_key(self) -> str:
        return self.layout.key("tok_emb" if self.layout.tied else "lm_head")

    def embed(self, weight: Weight, tokens: torch.Tensor) -> torch.Tensor:
        return weight(self.layout.key("tok_emb"))[tokens]

    def block(self, weight: Weight, i: int, x: torch.Tensor, observe: Observe) -> torch.Tensor:
        layout = self.layout
        batch, length, _ = x.shape
        heads, hd = layout.n_head, layout.head_dim

        def w(part: str) -> torch.Tensor:
            return weight(layout.key(part, i))

        h = rms_norm(x, w("ln_1"))
        observe(ATTN_IN, h)
        q, k, v = ((h @ w(f"{name}_proj").T).view(batch, length, heads, hd).transpose(1, 2) for name in "qkv")
        q, k = rope(q, layout), rope(k, layout)
        if layout.qk_norm:  # after RoPE, one gain vector for every head
            q, k = rms_norm(q, w("q_norm")), rms_norm(k, w("k_norm"))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, heads * hd)
        observe(ATTN_OUT, a)
        a = a @ w("o_proj").T
        x = x + (rms_norm(a, w("ln_1_out")) if layout.peri_ln else a)
        u = rms_norm(x, w("ln_2"))
        observe(FFN_IN, u)
        hidden = F.silu(u @ w("gate_proj").T) * (u @ w("up_proj").T)
        observe(FFN_HIDDEN, hidden)
        m = hidden @ w("down_proj").T
        return x + (rms_norm(m, w("ln_2_out")) if layout.peri_ln else m)

    def final(self, weight: Weight, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight(self.layout.key("ln_f")))


class GPT2Forward(_LayoutForward):
    """Generation 5, GPT-2-like (converters/reference.py's LayeredForward, over ParrotLLM's own keys)."""

    @property
    def output_key(self) -> str:
        return "tok_emb.weight" if self.layout.tied else "lm_head.weight"

    def layer_norm(self, weight: Weight, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.layout.n_embd,), weight(f"{name}.weight"), weight(f"{name}.bias"),
                            LAYER_NORM_EPS)

    def embed(self, weight: Weight, tokens: torch.Tensor) -> torch.Tensor:
        return weight("tok_emb.weight")[tokens] + weight("pos_emb.weight")[: tokens.shape[1]]

    def block(self, weight: Weight, i: int, x: torch.Tensor, observe: Observe) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, hd, block = self.layout.n_head, self.layout.head_dim, f"blocks.{i}"
        h = self.layer_norm(weight, x, f"{block}.ln_1")
        observe(ATTN_IN, h)
        q, k, v = ((h @ weight(f"{block}.attn.{n}_proj.weight").T).view(batch, length, heads, hd).transpose(1, 2)
                   for n in "qkv")
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, -1)
        observe(ATTN_OUT, a)
        x = x + a @ weight(f"{block}.attn.o_proj.weight").T
        u = self.layer_norm(weight, x, f"{block}.ln_2")
        observe(FFN_IN, u)
        hidden = F.gelu(u @ weight(f"{block}.mlp.c_fc.weight").T, approximate="tanh")
        observe(FFN_HIDDEN, hidden)
        return x + hidden @ weight(f"{block}.mlp.c_proj.weight").T

    def final(self, weight: Weight, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(weight, x, "ln_f")
