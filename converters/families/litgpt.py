"""Family: modern litgpt checkpoint directories — lit_model.pth + model_config.yaml.

Attention is fused as [all Q; all K; all V] (`attn.qkv`, litgpt ≥ 0.5) or, in older litgpt, in the
grouped layout (`attn.attn`); the MLP is `mlp.fc_1/fc_2/proj` (gate/up/down).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from parrot_edge.converters.families import Family, register

if TYPE_CHECKING:
    from parrot_edge.converters.architectures.llama import LlamaCheckpoint

_MLP_KEYS = ("mlp.fc_1", "mlp.fc_2", "mlp.proj")


def matches(source: Path) -> bool:
    from parrot_edge.converters.families._lit_checkpoint import has_keys  # torch: not at import (see the registry)

    return has_keys(source, "mlp.fc_1.weight")


def open_checkpoint(source: Path, config: str | None) -> LlamaCheckpoint:
    # torch and the architecture load here, not at import: the registry imports this module for --help
    from parrot_edge.converters.families._lit_checkpoint import (
        has_keys,
        open_lit_checkpoint,
        split_concatenated_qkv,
        split_grouped_qkv,
    )

    if has_keys(source, "attn.qkv.weight"):
        return open_lit_checkpoint(source, config, family="litgpt", qkv_key="attn.qkv",
                                   split_qkv=split_concatenated_qkv, mlp_keys=_MLP_KEYS)
    return open_lit_checkpoint(source, config, family="litgpt", qkv_key="attn.attn", split_qkv=split_grouped_qkv,
                               mlp_keys=_MLP_KEYS)


register(Family(
    name="litgpt",
    expects="lit_model.pth (keys transformer.h.N.attn.qkv.weight, mlp.fc_1/fc_2/proj) with model_config.yaml "
            "beside it (or --config)",
    priority=20,  # before hf-llama: a litgpt directory may also hold a config.json
    matches=matches,
    open=open_checkpoint,
))
