"""Family: TinyLlama / lit-gpt fork pretraining checkpoints — ParrotAI's own format.

`fabric.save` writes iter-NNNNNN-ckpt.pth holding {"model": state_dict, "optimizer", "hparams",
"iter_num", "step_count"}; converted checkpoints are a bare state dict. Attention is fused in the
grouped layout (`attn.attn`), the MLP is xformers' SwiGLU (`mlp.swiglu.w1/w2/w3` = gate/up/down). The
architecture comes from model_config.yaml beside the file, --config, or the preset the training
script named in hparams["model_name"].
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from parrot_edge.converters.families import Family, register

if TYPE_CHECKING:
    from parrot_edge.converters.architectures.llama import LlamaCheckpoint

_LLAMA_STYLE = dict(rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                    mlp_class_name="LLaMAMLP", norm_eps=1e-5, block_size=2048, vocab_size=32000, padding_multiple=64)
# Named architectures (lit_gpt/config.py of TinyLlama; litgpt's micro-llama-300M), in model_config.yaml terms.
# Either lit-gpt family accepts them (_lit_checkpoint.read_config), as the registry's presets.
PRESETS = {
    "tiny_LLaMA_1b": dict(_LLAMA_STYLE, n_layer=22, n_head=32, n_embd=2048, n_query_groups=4, intermediate_size=5632),
    "tiny_LLaMA_120M": dict(_LLAMA_STYLE, n_layer=12, n_head=12, n_embd=768, n_query_groups=1,
                            intermediate_size=2048),
    "code_tiny_LLaMA_1b": dict(_LLAMA_STYLE, n_layer=22, n_head=32, n_embd=2048, n_query_groups=4,
                               intermediate_size=5632, block_size=8192, rope_condense_ratio=4),
    "micro-llama-300M": dict(_LLAMA_STYLE, n_layer=12, n_head=16, n_embd=1024, n_query_groups=4,
                             intermediate_size=5632),
}


def matches(source: Path) -> bool:
    from parrot_edge.converters.families._lit_checkpoint import has_keys  # torch: not at import (see the registry)

    return has_keys(source, "attn.attn.weight", "mlp.swiglu.w1.weight")


def open_checkpoint(source: Path, config: str | None) -> LlamaCheckpoint:
    # torch and the architecture load here, not at import: the registry imports this module for --help
    from parrot_edge.converters.families._lit_checkpoint import find_torch_file, open_lit_checkpoint, split_grouped_qkv
    from parrot_edge.converters.weights import WeightFiles

    path = find_torch_file(source)
    hparams = WeightFiles([path]).extras.get("hparams") if path else None
    preset = hparams.get("model_name") if isinstance(hparams, dict) else None
    return open_lit_checkpoint(source, config, family="tinyllama", qkv_key="attn.attn", split_qkv=split_grouped_qkv,
                               mlp_keys=("mlp.swiglu.w1", "mlp.swiglu.w2", "mlp.swiglu.w3"), preset_hint=preset)


register(Family(
    name="tinyllama",
    expects="a torch file (iter-*-ckpt.pth with 'model', or a bare state dict) with keys "
            "transformer.h.N.attn.attn.weight and mlp.swiglu.w1/w2/w3, plus model_config.yaml beside it, "
            f"--config FILE, or a preset ({', '.join(PRESETS)})",
    priority=10,  # first: the most specific keys
    matches=matches,
    open=open_checkpoint,
    presets=PRESETS,
))
