"""ParrotLLM's generations mapped onto llama.cpp architectures: which one, how exact, and every tensor.

A helper of families/parrotllm.py. The survey of the vendored llama.cpp (src/models/*.cpp):
- 1, 1a → `llama`, exact. llama.cpp's `llama` rotates interleaved pairs (2i, 2i+1), ParrotLLM's own RoPE,
  so its Q/K rows go in unpermuted (they are handed to LlamaCheckpoint in rotate-half order, which it
  permutes back: the identity). 1a rotates halves, so it is handed over as stored, as HF Llama is.
- 2 → `hunyuan-dense`, exact: pre-norm and per-head q/k RMSNorm after (NEOX) RoPE; Q/K rows and the q/k gains
  are reordered interleaved → rotate-half, a reordering of each head's dimensions on both sides.
- 3 → `plamo3`, the closest: pre- and post-sublayer norms and per-head q/k norms, but normalising q/k
  before RoPE. The RMS factor commutes with a rotation; the gain does only where both dimensions of a
  rotated pair share it: exact for such gains, approximate (and measured) otherwise. No vendored
  architecture has post-sublayer norms and q/k norms after RoPE (hunyuan-* lack the post-norms;
  gemma3/4, olmo2, exaone4, afmoe, muse-glimmer normalise before RoPE or differ further).
- 5 → `gpt2`, structurally exact (learned positions, LayerNorm, zero biases where ParrotLLM has none),
  approximate only through ggml's float16 GELU table.
d_ff that does not divide into 32-value blocks (854) is zero-padded (854 → 864): zero gate/up (c_fc)
rows and zero down (c_proj) columns add silu(0)·0 = 0 (gelu(0) = 0): exact, and every 32-block type fits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from parrot_edge.converters.architectures import gpt2, hunyuan_dense, plamo3
from parrot_edge.converters.architectures.llama import LlamaCheckpoint, LlamaConfig, SourceTensor
from parrot_edge.converters.architectures.llama import interleaved_to_rotate_half as to_rotate_half
from parrot_edge.converters.architectures.llama import tensor_shapes as llama_shapes
from parrot_edge.converters.checkpoint import GGUFTensor, MappedCheckpoint, SourceInfo
from parrot_edge.converters.families._parrotllm_model import LAYER_NORM_EPS, RMS_EPS, GPT2Forward, Layout, RMSForward
from parrot_edge.converters.reference import Reference
from parrot_edge.converters.weights import WeightFiles

BLOCK = 32  # the block of Q4_0 / Q4_1 / IQ4_NL / Q8_0: d_ff is padded to a multiple of it
QK_NORM_ORDER = ("q/k RMSNorm gains applied before RoPE (llama.cpp plamo3) instead of after it (ParrotLLM): the "
                 "same only where both dimensions of a rotated pair share their gain, which {pairs} of {total} q/k "
                 "gain pairs of this checkpoint do not")

Loader = Callable[[], torch.Tensor]


def padded(n_ff: int) -> int:
    return -(-n_ff // BLOCK) * BLOCK


def sizes(layout: Layout, eps: float) -> LlamaConfig:
    return LlamaConfig(n_layer=layout.n_layer, n_embd=layout.n_embd, n_head=layout.n_head, n_kv_head=layout.n_head,
                       head_dim=layout.head_dim, n_ff=padded(layout.n_ff), n_vocab=layout.n_vocab,
                       context_length=layout.context_length, rope_base=layout.rope_base, norm_eps=eps,
                       tied_embeddings=layout.tied)


def _pad_rows(load: Loader, rows: int) -> Loader:
    def grown() -> torch.Tensor:
        value = load()
        return torch.nn.functional.pad(value, (0, 0, 0, rows - value.shape[0]))
    return grown


def _pad_columns(load: Loader, columns: int) -> Loader:
    def grown() -> torch.Tensor:
        value = load()
        return torch.nn.functional.pad(value, (0, columns - value.shape[1]))
    return grown


def _interleaved_to_neox(load: Loader, n_heads: int) -> Loader:
    """Each head's rows (or a gain vector's entries) from pairs (2i, 2i+1) to halves (i, i + head_dim/2)."""
    def reordered() -> torch.Tensor:
        value = load()
        if value.dim() == 1:
            return to_rotate_half(value[:, None], 1)[:, 0]
        return to_rotate_half(value, n_heads)
    return reordered


def _sources(layout: Layout, files: WeightFiles) -> dict[str, Loader]:
    """Every GGUF tensor the RMSNorm generations could need, by GGUF name, as the checkpoint stores it
    (Q/K rows and gains still in ParrotLLM's order; d_ff padded)."""
    n_ff = padded(layout.n_ff)
    load = {"token_embd.weight": partial(files.load, layout.key("tok_emb")),
            "output_norm.weight": partial(files.load, layout.key("ln_f"))}
    if not layout.tied:
        load["output.weight"] = partial(files.load, layout.key("lm_head"))
    parts = {"attn_norm": "ln_1", "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
             "ffn_norm": "ln_2", "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
             "attn_q_norm": "q_norm", "attn_k_norm": "k_norm", "post_attention_norm": "ln_1_out",
             "post_ffw_norm": "ln_2_out"}
    for i in range(layout.n_layer):
        for gguf_part, part in parts.items():
            load[f"blk.{i}.{gguf_part}.weight"] = partial(files.load, layout.key(part, i))
        for part in ("ffn_gate", "ffn_up"):
            load[f"blk.{i}.{part}.weight"] = _pad_rows(load[f"blk.{i}.{part}.weight"], n_ff)
        load[f"blk.{i}.ffn_down.weight"] = _pad_columns(load[f"blk.{i}.ffn_down.weight"], n_ff)
    return load


def _tensors(shapes: dict[str, tuple[int, ...]], load: dict[str, Loader], dtype: torch.dtype) -> list[GGUFTensor]:
    return [GGUFTensor(name, shape, dtype, load[name]) for name, shape in shapes.items()]


def to_llama(layout: Layout, files: WeightFiles, source: SourceInfo) -> LlamaCheckpoint:
    config = sizes(layout, RMS_EPS)
    load = _sources(layout, files)
    if layout.naming == "current":  # LlamaCheckpoint permutes rotate-half → interleaved: hand it the inverse
        for i in range(layout.n_layer):
            for part in ("attn_q", "attn_k"):
                load[f"blk.{i}.{part}.weight"] = _interleaved_to_neox(load[f"blk.{i}.{part}.weight"], layout.n_head)
    dtype = files.dtype(layout.key("tok_emb"))
    tensors = {name: SourceTensor(dtype, load[name]) for name in llama_shapes(config)}
    checkpoint = LlamaCheckpoint(source, config, tensors)
    # its own forward would be llama's (rotate-half over the handed-over rows): ParrotLLM's is the truth
    checkpoint.reference = Reference(RMSForward(layout), _float(files))
    return checkpoint


def to_hunyuan_dense(layout: Layout, files: WeightFiles, source: SourceInfo, parameters: int) -> MappedCheckpoint:
    config = sizes(layout, RMS_EPS)
    load = _sources(layout, files)
    for name in list(load):
        if name.endswith(("attn_q.weight", "attn_k.weight", "attn_q_norm.weight", "attn_k_norm.weight")):
            load[name] = _interleaved_to_neox(load[name], layout.n_head)
    return _mapped(hunyuan_dense, config, load, layout, files, source, parameters, [])


def to_plamo3(layout: Layout, files: WeightFiles, source: SourceInfo, parameters: int) -> MappedCheckpoint:
    config = sizes(layout, RMS_EPS)
    load = _sources(layout, files)
    for i in range(layout.n_layer):
        blk = f"blk.{i}"
        q, k = (_interleaved_to_neox(load[f"{blk}.{p}.weight"], layout.n_head) for p in ("attn_q", "attn_k"))
        v = load[f"{blk}.attn_v.weight"]  # V is not rotated: never reordered
        load[f"{blk}.attn_qkv.weight"] = lambda q=q, k=k, v=v: torch.cat([q(), k(), v()])
        # the gains as they are (reordered): measured closer than handing plamo3 each pair's mean q·k product
        for part in ("attn_q_norm", "attn_k_norm"):
            load[f"{blk}.{part}.weight"] = _interleaved_to_neox(load[f"{blk}.{part}.weight"], layout.n_head)
        gate, up = load[f"{blk}.ffn_gate.weight"], load[f"{blk}.ffn_up.weight"]
        load[f"{blk}.ffn_up.weight"] = lambda gate=gate, up=up: torch.cat([gate(), up()])  # swiglu: silu(first half)
        load[f"{blk}.post_attention_norm"] = load[f"{blk}.post_attention_norm.weight"]
        load[f"{blk}.post_ffw_norm"] = load[f"{blk}.post_ffw_norm.weight"]
    unshared = _unshared_gain_pairs(layout, files)
    approximations = ([QK_NORM_ORDER.format(pairs=unshared, total=layout.n_layer * layout.head_dim // 2)]
                      if unshared else [])
    return _mapped(plamo3, config, load, layout, files, source, parameters, approximations)


def _unshared_gain_pairs(layout: Layout, files: WeightFiles) -> int:
    """How many rotated pairs (2i, 2i+1) have q or k gains that differ within the pair: where none do, the
    gains commute with RoPE and plamo3 computes ParrotLLM's function exactly."""
    count = 0
    for i in range(layout.n_layer):
        q, k = files.load(layout.key("q_norm", i)), files.load(layout.key("k_norm", i))
        count += int(((q[0::2] != q[1::2]) | (k[0::2] != k[1::2])).sum())
    return count


def to_gpt2(layout: Layout, files: WeightFiles, source: SourceInfo, parameters: int) -> MappedCheckpoint:
    config = sizes(layout, LAYER_NORM_EPS)
    n_ff, d = config.n_ff, layout.n_embd
    load: dict[str, Loader] = {"token_embd.weight": partial(files.load, "tok_emb.weight"),
                               "position_embd.weight": partial(files.load, "pos_emb.weight"),
                               "output_norm.weight": partial(files.load, "ln_f.weight"),
                               "output_norm.bias": partial(files.load, "ln_f.bias")}
    if not layout.tied:
        load["output.weight"] = partial(files.load, "lm_head.weight")
    zeros = {size: (lambda size=size: torch.zeros(size)) for size in (d, 3 * d, n_ff)}
    for i in range(layout.n_layer):
        blk, block = f"blk.{i}", f"blocks.{i}"
        qkv = [partial(files.load, f"{block}.attn.{n}_proj.weight") for n in "qkv"]
        load |= {
            f"{blk}.attn_norm.weight": partial(files.load, f"{block}.ln_1.weight"),
            f"{blk}.attn_norm.bias": partial(files.load, f"{block}.ln_1.bias"),
            f"{blk}.attn_qkv.weight": lambda qkv=qkv: torch.cat([part() for part in qkv]),
            f"{blk}.attn_qkv.bias": zeros[3 * d],
            f"{blk}.attn_output.weight": partial(files.load, f"{block}.attn.o_proj.weight"),
            f"{blk}.attn_output.bias": zeros[d],
            f"{blk}.ffn_norm.weight": partial(files.load, f"{block}.ln_2.weight"),
            f"{blk}.ffn_norm.bias": partial(files.load, f"{block}.ln_2.bias"),
            f"{blk}.ffn_up.weight": _pad_rows(partial(files.load, f"{block}.mlp.c_fc.weight"), n_ff),
            f"{blk}.ffn_up.bias": zeros[n_ff],
            f"{blk}.ffn_down.weight": _pad_columns(partial(files.load, f"{block}.mlp.c_proj.weight"), n_ff),
            f"{blk}.ffn_down.bias": zeros[d],
        }
    checkpoint = _mapped(gpt2, config, load, layout, files, source, parameters, [gpt2.GELU_APPROXIMATION])
    checkpoint.reference = Reference(GPT2Forward(layout), _float(files))
    return checkpoint


def _mapped(architecture, config: LlamaConfig, load: dict[str, Loader], layout: Layout, files: WeightFiles,
            source: SourceInfo, parameters: int, approximations: list[str]) -> MappedCheckpoint:
    dtype = files.dtype("tok_emb.weight")
    return MappedCheckpoint(
        arch=architecture.ARCH, source=source, n_vocab=layout.n_vocab, context_length=layout.context_length,
        parameter_count=parameters, metadata=architecture.gguf_metadata(config),
        tensors=_tensors(architecture.tensor_shapes(config), load, dtype),
        reference=Reference(RMSForward(layout), _float(files)), approximations=approximations)


def _float(files: WeightFiles) -> Callable[[str], torch.Tensor]:
    return lambda key: files.load(key).float()
