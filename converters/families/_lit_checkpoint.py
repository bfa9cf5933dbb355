"""What the two lit-gpt families share: the torch file, the architecture config, and the fused QKV layouts.

A helper, not a family (hence the "_": the registry does not import it). The families import it when they
detect or open a checkpoint, so it may import torch and yaml at the top.

lit-gpt checkpoints carry no architecture: it comes from a litgpt-style model_config.yaml beside the
file, a named preset, or --config. Keys are `transformer.h.N.…`; the attention projections are fused
into one matrix, in one of two layouts:
- grouped (TinyLlama's lit-gpt fork, litgpt < 0.5, key `attn.attn`): for each key/value group g, that
  group's q_per_kv query heads, then its key head, then its value head;
- concatenated (litgpt ≥ 0.5, key `attn.qkv`): all query heads, then all key heads, then all value heads.
Both split into separate Q, K, V matrices in rotate-half order, exactly what HF Llama stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from parrot_edge.converters.architectures.llama import LlamaCheckpoint, LlamaConfig, SourceTensor, tensor_shapes
from parrot_edge.converters.checkpoint import SourceInfo
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families import presets
from parrot_edge.converters.weights import WeightFiles

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# litgpt options that change the computation away from plain Llama: refused when set (truthy)
_NOT_LLAMA = ("norm_qk", "post_attention_norm", "post_mlp_norm", "shared_attention_norm", "scale_embeddings",
              "lm_head_bias", "attn_bias", "final_logit_softcapping", "attention_logit_softcapping",
              "sliding_window_size", "rope_adjustments", "rope_interleave", "n_expert", "latent_attention",
              "attention_scores_scalar", "rope_local_base_freq")


def find_torch_file(source: Path) -> Path | None:
    """The checkpoint file: the source itself, or lit_model.pth / the one torch file in a directory."""
    if source.is_file():
        return source if source.suffix in TORCH_SUFFIXES else None
    if (source / "lit_model.pth").is_file():
        return source / "lit_model.pth"
    candidates = [p for p in source.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file()]
    return candidates[0] if len(candidates) == 1 else None


def has_keys(source: Path, *markers: str) -> bool:
    path = find_torch_file(source)
    keys = WeightFiles([path]).keys() if path is not None else []
    return bool(keys) and all(any(marker in key for key in keys) for marker in markers)


def read_config(argument: str | None, beside: Path) -> tuple[dict[str, Any], str] | None:
    """(litgpt-style config dict, where it came from) from --config (preset name or file) or model_config.yaml.

    Any family's preset is accepted: a preset only names an architecture, whichever format holds the weights.
    """
    known = presets()
    if argument in known:
        return dict(known[argument], name=argument), f"preset {argument}"
    path = Path(argument) if argument else beside / "model_config.yaml"
    if argument is None and not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"--config {argument}: neither a preset ({', '.join(known)}) nor an existing file") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a litgpt model config (expected a mapping of fields)")
    return data, str(path)


def llama_config(lit: dict[str, Any], origin: str) -> tuple[LlamaConfig, int]:
    """(LlamaConfig, declared vocabulary) from a litgpt Config's fields, refusing anything not plain Llama.

    Absent fields take litgpt's defaults; TinyLlama's fork spells some differently (_norm_class,
    _mlp_class, condense_ratio) and has no rope_base (always 10000).
    """
    lit = dict(lit)
    for old, new in (("_norm_class", "norm_class_name"), ("_mlp_class", "mlp_class_name"),
                     ("condense_ratio", "rope_condense_ratio")):
        if old in lit:
            lit.setdefault(new, lit.pop(old))
    problems = {key: lit[key] for key in _NOT_LLAMA if lit.get(key)}
    required = {"norm_class_name": ("RMSNorm", "FusedRMSNorm"), "mlp_class_name": ("LLaMAMLP",),
                "rotary_percentage": (1.0,), "parallel_residual": (False,), "bias": (False,)}
    defaults = {"norm_class_name": "LayerNorm", "mlp_class_name": "GptNeoxMLP", "rotary_percentage": 0.25,
                "parallel_residual": True, "bias": True}
    problems |= {key: lit.get(key, defaults[key]) for key, allowed in required.items()
                 if lit.get(key, defaults[key]) not in allowed}
    if problems:
        raise BadInput(f"{origin} describes a model the `llama` conversion cannot represent: {problems}")
    try:
        n_head, n_embd, vocab = lit["n_head"], lit["n_embd"], lit.get("vocab_size", 50254)
        padded = lit.get("padded_vocab_size") or _round_up(vocab, lit.get("padding_multiple", 512))
        config = LlamaConfig(
            n_layer=lit["n_layer"], n_embd=n_embd, n_head=n_head,
            n_kv_head=lit.get("n_query_groups") or n_head,
            head_dim=lit.get("head_size") or n_embd // n_head,
            n_ff=lit["intermediate_size"], n_vocab=padded, context_length=lit.get("block_size", 4096),
            rope_base=float(lit.get("rope_base", 10000)), rope_scale=float(lit.get("rope_condense_ratio", 1)),
            norm_eps=float(lit.get("norm_eps", 1e-5)), tied_embeddings=False,
        )
    except KeyError as exc:
        raise BadInput(f"{origin} lacks {exc.args[0]}") from None
    return config, vocab


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def split_grouped_qkv(fused: torch.Tensor, config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[per group: q_per_kv query heads, 1 key head, 1 value head] → (Q, K, V)."""
    q_per_kv = config.n_head // config.n_kv_head
    groups = fused.reshape(config.n_kv_head, q_per_kv + 2, config.head_dim, fused.shape[-1])
    q = groups[:, :q_per_kv].reshape(-1, fused.shape[-1])
    return q, groups[:, q_per_kv].reshape(-1, fused.shape[-1]), groups[:, q_per_kv + 1].reshape(-1, fused.shape[-1])


def split_concatenated_qkv(fused: torch.Tensor, config: LlamaConfig) -> tuple[torch.Tensor, ...]:
    """[all query heads; all key heads; all value heads] → (Q, K, V)."""
    kv_rows = config.n_kv_head * config.head_dim
    return fused.split((config.n_head * config.head_dim, kv_rows, kv_rows))


def _architecture(path: Path, config_argument: str | None, preset_hint: str | None) -> tuple[dict[str, Any], str]:
    """--config, else model_config.yaml beside the file, else the preset the checkpoint's hparams name."""
    found = read_config(config_argument, path.parent)
    known = presets()
    if found is None and preset_hint in known:
        found = dict(known[preset_hint], name=preset_hint), f"preset {preset_hint} (named in the hparams it holds)"
    if found is None:
        raise BadInput(f"missing config for {path}: a lit-gpt checkpoint does not record its architecture (heads, "
                       f"query groups). Put its model_config.yaml beside it, or pass --config with a file or a "
                       f"preset ({', '.join(known)})")
    return found


def open_lit_checkpoint(source: Path, config_argument: str | None, *, family: str, qkv_key: str,
                        split_qkv, mlp_keys: tuple[str, str, str], preset_hint: str | None = None) -> LlamaCheckpoint:
    """A lit-gpt checkpoint as a LlamaCheckpoint. `mlp_keys` name the gate, up and down projections."""
    path = find_torch_file(source)
    if path is None:
        raise BadInput(f"no checkpoint file in {source} (expected lit_model.pth or a single .pth file)")
    files = WeightFiles([path])
    lit, origin = _architecture(path, config_argument, preset_hint)
    config, declared_vocab = llama_config(lit, origin)

    layer_keys = {"attn_norm": "norm_1", "attn_output": "attn.proj", "ffn_norm": "norm_2",
                  **dict(zip(("ffn_gate", "ffn_up", "ffn_down"), mlp_keys, strict=True))}
    shapes = tensor_shapes(config)
    expected = {"transformer.wte.weight": shapes["token_embd.weight"], "lm_head.weight": shapes["output.weight"],
                "transformer.ln_f.weight": shapes["output_norm.weight"]}
    fused_rows = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    for i in range(config.n_layer):
        expected |= {f"transformer.h.{i}.{key}.weight": shapes[f"blk.{i}.{name}.weight"]
                     for name, key in layer_keys.items()}
        expected[f"transformer.h.{i}.{qkv_key}.weight"] = (fused_rows, config.n_embd)
    files.check(expected)

    def plain(key: str) -> SourceTensor:
        return SourceTensor(files.dtype(key), lambda: files.load(key), lambda: files.stream(key))

    def part_of_qkv(layer: int, part: int) -> SourceTensor:
        key = f"transformer.h.{layer}.{qkv_key}.weight"
        return SourceTensor(files.dtype(key), lambda: split_qkv(files.load(key), config)[part].contiguous())

    tensors = {"token_embd.weight": plain("transformer.wte.weight"), "output.weight": plain("lm_head.weight"),
               "output_norm.weight": plain("transformer.ln_f.weight")}
    for i in range(config.n_layer):
        tensors |= {f"blk.{i}.{name}.weight": plain(f"transformer.h.{i}.{key}.weight")
                    for name, key in layer_keys.items()}
        tensors |= {f"blk.{i}.attn_{part}.weight": part_of_qkv(i, n) for n, part in enumerate("qkv")}

    name = lit.get("name") or path.parent.name
    notes = [f"architecture from {origin}"]
    info = SourceInfo(family=family, path=path, weight_files=[path], tokenizer_dir=path.parent, name=str(name),
                      declared_vocab=declared_vocab, notes=notes)
    return LlamaCheckpoint(info, config, tensors)
