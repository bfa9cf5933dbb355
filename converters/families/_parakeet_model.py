"""What a Parakeet checkpoint computes (the reference forward) and how it maps onto llama.cpp's `mpt`.

A helper of families/parakeet.py (hence the "_"), imported once a checkpoint is opened. Written from
bytebreezestudios/ml-parakeet's model.py: StableEmbedding (lookup, then LayerNorm with bias, eps 1e-5);
per block, pre-LayerNorm (no bias), query from c_query, key and value from c_kv (one c_kv shared by each
pair of layers: both keys are saved), scores q·kᵀ/√head_dim + m_h·(j − i), causal softmax, c_proj; then
LayerNorm, c_fc, exact (erf) GELU, c_proj; final LayerNorm; logits against the raw (tied) embedding.
Slopes: ALiBi's power-of-two formula applied to n heads whatever n is, m_h = 2^(−8(h+1)/n).

The `mpt` mapping (architectures/mpt.py):
- token_embd = StableEmbedding's LayerNorm applied to every row of the embedding (exact: it depends on the row
  alone), output = the raw embedding (the two sides of the tie now differ, so both are stored);
- attn_qkv = [c_query; c_kv] of each layer (the shared c_kv copied into both layers of its pair: exact);
- max_alibi_bias = 8·n2/n with n2 = 2^⌊log2 n⌋, which gives heads 0 … n2−1 exactly Parakeet's slopes; ggml
  gives heads n2 … n−1 slopes no bias can match (for 18 heads, 16 and 17 get 2^(−2/9) and 2^(−2/3) instead of
  2^(−68/9) and 2^(−8): ~161× steeper). An exact construction would need more head slots than n_embd / head
  size, which mpt's fused attn_qkv [n_embd + 2·n_embd] and attn_output [n_embd, n_embd] do not allow;
- GELU: mpt's is ggml_gelu, the tanh form, evaluated through a float16 table on the CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from parrot_edge.converters.architectures import mpt
from parrot_edge.converters.architectures.llama import LlamaConfig
from parrot_edge.converters.checkpoint import GGUFTensor, StateDictSizes
from parrot_edge.converters.reference import ATTN_IN, ATTN_OUT, FFN_HIDDEN, FFN_IN, Observe, Weight

LAYER_NORM_EPS = 1e-5
# main.py's ParakeetConfig for the published model; the file name repeats most of it
DEFAULTS = {"block_size": 8192, "n_head": 18}
_NAME_FIELDS = {"block_size": r"-c(\d+)", "n_embd": r"-d(\d+)", "n_fexp": r"fexp(\d+)", "vocab_size": r"_v(\d+)",
                "n_head": r"_h(\d+)", "n_layer": r"_l(\d+)"}
GELU_APPROXIMATION = ("GELU: llama.cpp's mpt uses the tanh approximation (evaluated through a float16 table on the "
                      "CPU), Parakeet the exact erf form (pointwise up to 4.7e-4 apart, plus float16 rounding)")


Layout = StateDictSizes  # Parakeet's sizes are all there is to its layout


def from_file_name(path: Path) -> dict[str, int]:
    """The sizes main.py writes into the file name (parakeet8k-c8192-d1152-fexp4_v100288_h18_l18-alibi+gqa2.pth)."""
    found = {name: re.search(pattern, path.name) for name, pattern in _NAME_FIELDS.items()}
    return {name: int(match[1]) for name, match in found.items() if match}


def parakeet_slopes(n_head: int) -> torch.Tensor:
    """ALiBi.get_slopes(n) as Parakeet uses it (the power-of-two formula for any n), float32 like its buffer."""
    start = 2 ** (-(2 ** -(math.log2(n_head) - 3)))
    return torch.tensor([start * start**i for i in range(n_head)])


def alibi_bias_for(n_head: int) -> float:
    """The max_alibi_bias that makes ggml's first 2^⌊log2 n⌋ slopes Parakeet's."""
    return 8.0 * 2 ** (n_head.bit_length() - 1) / n_head


def alibi_approximation(n_head: int) -> str | None:
    ours, theirs = mpt.alibi_slopes(n_head, alibi_bias_for(n_head)), parakeet_slopes(n_head).tolist()
    wrong = [h for h in range(n_head) if abs(ours[h] - theirs[h]) > 1e-6 * theirs[h]]
    if not wrong:
        return None
    pairs = ", ".join(f"head {h} {ours[h]:.4g} instead of {theirs[h]:.4g}" for h in wrong)
    return (f"ALiBi: ggml's slope rule cannot give all {n_head} heads Parakeet's slopes 2^(-8(h+1)/{n_head}); "
            f"heads 0-{wrong[0] - 1} are exact, {pairs} (much more local attention)")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, LAYER_NORM_EPS)


@dataclass(frozen=True)
class ParakeetForward:
    """Parakeet's forward (converters/reference.py's LayeredForward, over its own keys)."""

    layout: Layout
    output_key = "transformer.wte.weight"  # tied: logits against the raw embedding

    @property
    def n_layer(self) -> int:
        return self.layout.n_layer

    def embed(self, weight: Weight, tokens: torch.Tensor) -> torch.Tensor:
        return layer_norm(weight("transformer.wte.weight")[tokens], weight("transformer.wte.norm.weight"),
                          weight("transformer.wte.norm.bias"))

    def block(self, weight: Weight, i: int, x: torch.Tensor, observe: Observe) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, hd, d = self.layout.n_head, self.layout.head_dim, self.layout.n_embd

        def w(part: str) -> torch.Tensor:
            return weight(f"transformer.h.{i}.{part}.weight")

        h = layer_norm(x, w("ln_1"))
        observe(ATTN_IN, h)
        q = (h @ w("attn.c_query").T).view(batch, length, heads, hd).transpose(1, 2)
        k, v = (part.reshape(batch, length, heads, hd).transpose(1, 2)
                for part in (h @ w("attn.c_kv").T).split(d, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + alibi_bias(heads, length)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, d)
        observe(ATTN_OUT, a)
        x = x + a @ w("attn.c_proj").T
        u = layer_norm(x, w("ln_2"))
        observe(FFN_IN, u)
        hidden = F.gelu(u @ w("mlp.c_fc").T)
        observe(FFN_HIDDEN, hidden)
        return x + hidden @ w("mlp.c_proj").T

    def final(self, weight: Weight, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, weight("transformer.ln_f.weight"))


def alibi_bias(n_head: int, length: int) -> torch.Tensor:
    """[heads, time, time]: m_h·(j − i) where query i may look at key j, −inf after it (causal)."""
    positions = torch.arange(length, dtype=torch.float32)
    distance = positions[None, :] - positions[:, None]  # j − i: ≤ 0 where a query may look
    bias = parakeet_slopes(n_head)[:, None, None] * distance
    return bias.masked_fill(distance > 0, float("-inf"))


def mpt_tensors(layout: Layout, config: LlamaConfig, load: Callable[[str], torch.Tensor],
                dtype: torch.dtype) -> list[GGUFTensor]:
    """Every `mpt` tensor from the Parakeet keys, in writing order, each computed when asked for."""
    def folded_embedding() -> torch.Tensor:
        return layer_norm(load("transformer.wte.weight").float(), load("transformer.wte.norm.weight").float(),
                          load("transformer.wte.norm.bias").float())

    sources: dict[str, tuple[Callable[[], torch.Tensor], torch.dtype]] = {
        # the folded embedding is a computed float32 value: kept F32 in the lossless intermediate
        "token_embd.weight": (folded_embedding, torch.float32),
        "output.weight": (lambda: load("transformer.wte.weight"), dtype),
        "output_norm.weight": (lambda: load("transformer.ln_f.weight"), dtype),
    }
    parts = {"attn_norm": "ln_1", "attn_output": "attn.c_proj", "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc",
             "ffn_down": "mlp.c_proj"}
    for i in range(layout.n_layer):
        block = f"transformer.h.{i}"
        for gguf_part, part in parts.items():
            sources[f"blk.{i}.{gguf_part}.weight"] = (lambda key=f"{block}.{part}.weight": load(key), dtype)
        sources[f"blk.{i}.attn_qkv.weight"] = (lambda block=block: torch.cat(
            [load(f"{block}.attn.c_query.weight"), load(f"{block}.attn.c_kv.weight")]), dtype)
    shapes = mpt.tensor_shapes(config)
    if set(shapes) != set(sources):
        raise AssertionError(f"mpt mapping out of step with architectures/mpt.py: {set(shapes) ^ set(sources)}")
    return [GGUFTensor(name, shape, sources[name][1], sources[name][0]) for name, shape in shapes.items()]
