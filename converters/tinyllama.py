"""Family 2: TinyLlama / lit-gpt fork pretraining checkpoints — ParrotAI's own format.

`fabric.save` writes iter-NNNNNN-ckpt.pth holding {"model": state_dict, "optimizer", "hparams",
"iter_num", "step_count"}; converted checkpoints are a bare state dict. Attention is fused in the
grouped layout (`attn.attn`), the MLP is xformers' SwiGLU (`mlp.swiglu.w1/w2/w3` = gate/up/down). The
architecture comes from model_config.yaml beside the file, --config, or the preset the training
script named in hparams["model_name"].
"""

from __future__ import annotations

from pathlib import Path

from parrot_edge.converters.checkpoint import Family
from parrot_edge.converters.lit_checkpoint import (
    PRESETS,
    find_torch_file,
    has_keys,
    open_lit_checkpoint,
    split_grouped_qkv,
)
from parrot_edge.converters.llama import LlamaCheckpoint
from parrot_edge.converters.weights import WeightFiles


def matches(source: Path) -> bool:
    return has_keys(source, "attn.attn.weight", "mlp.swiglu.w1.weight")


def open_checkpoint(source: Path, config: str | None) -> LlamaCheckpoint:
    path = find_torch_file(source)
    hparams = WeightFiles([path]).extras.get("hparams") if path else None
    preset = hparams.get("model_name") if isinstance(hparams, dict) else None
    return open_lit_checkpoint(source, config, family="tinyllama", qkv_key="attn.attn", split_qkv=split_grouped_qkv,
                               mlp_keys=("mlp.swiglu.w1", "mlp.swiglu.w2", "mlp.swiglu.w3"), preset_hint=preset)


FAMILY = Family(
    name="tinyllama",
    expects="a torch file (iter-*-ckpt.pth with 'model', or a bare state dict) with keys "
            "transformer.h.N.attn.attn.weight and mlp.swiglu.w1/w2/w3, plus model_config.yaml beside it, "
            f"--config FILE, or a preset ({', '.join(PRESETS)})",
    matches=matches,
    open=open_checkpoint,
)
