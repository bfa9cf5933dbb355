"""Family: Hugging Face Llama directories (LlamaForCausalLM) — MicroLlama, TinyLlama's hub releases, SmolLM2.

A directory with config.json and the weights as model.safetensors, sharded model-*.safetensors with
model.safetensors.index.json, or pytorch_model*.bin. Keys map one to one onto the `llama` tensors.

Self-contained, so the family to copy: module-level imports stay light (the registry imports this
module for `parrot-edge --help`), the family registers itself at the bottom.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families import Family, register

if TYPE_CHECKING:
    from parrot_edge.converters.architectures.llama import LlamaCheckpoint, LlamaConfig

# per-layer GGUF name → HF name
_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_KEYS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# buffers some transformers versions saved; they hold nothing the model learned
_IGNORED = ("rotary_emb.inv_freq",)


def hf_key(gguf_name: str) -> str:
    """HF Llama key of a `llama` GGUF tensor name (blk.3.attn_q.weight → model.layers.3.self_attn.q_proj.weight)."""
    if match := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name):
        return f"model.layers.{match[1]}.{_LAYER_KEYS[match[2]]}.weight"
    return f"{_GLOBAL_KEYS[gguf_name.removesuffix('.weight')]}.weight"


def weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError):
                raise BadInput(f"{index} is not a valid shard index (no weight_map)") from None
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise BadInput(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [directory / n for n in names]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        if found := sorted(directory.glob(pattern)):
            return found
    return []


def _directory(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def matches(path: Path) -> bool:
    directory = _directory(path)
    return (directory / "config.json").is_file() and bool(weight_files(directory))


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from a transformers config.json (v4 rope_theta/rope_scaling or v5 rope_parameters)."""
    from parrot_edge.converters.architectures.llama import LlamaConfig  # torch: not at import (see the registry)

    architectures = hf.get("architectures") or []
    if "LlamaForCausalLM" not in architectures and hf.get("model_type") != "llama":
        raise BadInput(f"config.json describes {architectures or hf.get('model_type')}, not LlamaForCausalLM")
    unsupported = {key: hf[key] for key in ("attention_bias", "mlp_bias") if hf.get(key)}
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear"):
        unsupported["rope scaling"] = rope_type
    if unsupported:
        raise BadInput(f"config.json asks for features the `llama` conversion does not support: {unsupported}")
    try:
        n_head = hf["num_attention_heads"]
        return LlamaConfig(
            n_layer=hf["num_hidden_layers"],
            n_embd=hf["hidden_size"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            n_ff=hf["intermediate_size"],
            n_vocab=hf["vocab_size"],
            context_length=hf.get("max_position_embeddings", 2048),
            rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scale=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise BadInput(f"config.json lacks {exc.args[0]}") from None


def read_license(directory: Path) -> str | None:
    """The `license:` of a model card's front matter (README.md), as the hub writes it."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None
    front = readme.read_text(errors="replace").split("---")
    match = re.search(r"^license:\s*(\S+)", front[1], re.MULTILINE) if len(front) > 2 else None
    return match[1].strip("'\"") if match else None


def open_checkpoint(path: Path, config_path: str | None) -> LlamaCheckpoint:
    # torch and the architecture load here, not at import: the registry imports this module for --help
    from parrot_edge.converters.architectures.llama import LlamaCheckpoint, SourceTensor, tensor_shapes
    from parrot_edge.converters.checkpoint import SourceInfo
    from parrot_edge.converters.weights import WeightFiles

    directory = _directory(path)
    config_file = Path(config_path) if config_path else directory / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise BadInput(f"no config.json at {config_file}") from None
    except ValueError as exc:
        raise BadInput(f"{config_file} is not valid JSON: {exc}") from None
    config = config_from_hf(hf)
    files = WeightFiles(weight_files(directory))
    expected = {hf_key(name): shape for name, shape in tensor_shapes(config).items()}
    ignored = _IGNORED + (("lm_head.weight",) if config.tied_embeddings else ())
    files.check(expected, ignored_suffixes=ignored)

    def source_tensor(key: str) -> SourceTensor:
        return SourceTensor(files.dtype(key), lambda: files.load(key), lambda: files.stream(key))

    tensors = {name: source_tensor(hf_key(name)) for name in tensor_shapes(config)}
    source = SourceInfo(family="hf-llama", path=directory, weight_files=files.paths, tokenizer_dir=directory,
                        name=directory.name, license=read_license(directory))
    return LlamaCheckpoint(source, config, tensors)


register(Family(
    name="hf-llama",
    expects="a directory with config.json (LlamaForCausalLM) and model*.safetensors or pytorch_model*.bin "
            "(keys model.layers.N.self_attn.q_proj.weight, ...)",
    priority=30,  # last: its test looks at file names only, and other formats may hold a config.json too
    matches=matches,
    open=open_checkpoint,
))
