"""The GGUF keys every llama.cpp architecture reads the same way (`<arch>.block_count`, …), in one place.

A helper of the architecture modules, not an architecture (hence the "_"). llama.cpp's loader reads these
for every architecture (llama_model_base::load_hparams); each module adds its own keys (norm epsilon,
ALiBi bias, …) on top.
"""

from __future__ import annotations

from typing import Any

from parrot_edge.converters.architectures.llama import LlamaConfig


def common_metadata(arch: str, config: LlamaConfig, *, rope: bool) -> dict[str, Any]:
    """Sizes in `arch.*` keys; `config` is the architecture's sizes (LlamaConfig holds them for all)."""
    meta: dict[str, Any] = {
        f"{arch}.context_length": config.context_length,
        f"{arch}.embedding_length": config.n_embd,
        f"{arch}.block_count": config.n_layer,
        f"{arch}.feed_forward_length": config.n_ff,
        f"{arch}.attention.head_count": config.n_head,
        f"{arch}.attention.head_count_kv": config.n_kv_head,
        f"{arch}.vocab_size": config.n_vocab,
    }
    if config.head_dim * config.n_head != config.n_embd:  # llama.cpp assumes n_embd / n_head otherwise
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = config.head_dim
    if rope:
        meta[f"{arch}.rope.freq_base"] = float(config.rope_base)
        meta[f"{arch}.rope.dimension_count"] = config.head_dim
    return meta
