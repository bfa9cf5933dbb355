"""Rebuild a Hugging Face Llama checkpoint from a `llama` GGUF (weights dequantised to float32).

The benchmark needs a realistic HF checkpoint — real trained weights and a real bilingual tokenizer, so
perplexities mean something — and the default model ships only as a GGUF. This undoes the conversion:
dequantise every tensor with gguf-py, undo the Q/K permutation, name the tensors as transformers does,
and write config.json, model.safetensors, tokenizer.json and tokenizer_config.json. It is also the round
trip test of the converter: converting the result back must give what the dequantised GGUF computes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from parrot_edge.converters.architectures.llama import interleaved_to_rotate_half
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families.hf_llama import hf_key
from parrot_edge.converters.tokenizer import CONTROL, PRE_TOKENIZERS, SPECIAL_TOKEN_KEYS, USER_DEFINED


def hf_checkpoint_from_gguf(path: Path, directory: Path) -> Path:
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    if meta.get("general.architecture") != "llama" or meta.get("tokenizer.ggml.model") != "gpt2":
        raise BadInput(f"{path}: only `llama` GGUFs with a byte-level BPE (gpt2) tokenizer can be rebuilt")
    directory.mkdir(parents=True, exist_ok=True)
    config = _hf_config(meta, has_output=any(t.name == "output.weight" for t in reader.tensors))

    weights = {}
    for tensor in reader.tensors:
        shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists ne0 (the row length) first
        values = np.array(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # a writable copy
        value = torch.from_numpy(values).reshape(shape)
        if tensor.name.endswith("attn_q.weight"):
            value = interleaved_to_rotate_half(value, config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            value = interleaved_to_rotate_half(value, config["num_key_value_heads"])
        weights[hf_key(tensor.name)] = value.contiguous()

    from safetensors.torch import save_file

    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(meta, directory)
    return directory


def _hf_config(meta: dict[str, Any], has_output: bool) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"llama.{name}", default)

    n_head = key("attention.head_count")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": key("attention.head_count_kv", n_head),
        "head_dim": key("attention.key_length", key("embedding_length") // n_head),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": not has_output,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    return config


def _write_tokenizer(meta: dict[str, Any], directory: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise BadInput(f"cannot rebuild a tokenizer.json for the llama.cpp pre-tokenizer {pre!r}")
    normalizer, steps, ignore_merges = PRE_TOKENIZERS[pre]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(line.split(" ", 1)) for line in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))

    def step(kind: str, *args: Any):
        if kind == "ByteLevel":
            return pre_tokenizers.ByteLevel(add_prefix_space=args[1], use_regex=args[0])
        if kind == "Digits":
            return pre_tokenizers.Digits(individual_digits=args[0])
        return pre_tokenizers.Split(Regex(args[0]), args[1].lower(), invert=args[2])

    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([step(*s) for s in steps])
    if normalizer == "NFC":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(t, special=types[i] == CONTROL, normalized=False)
                          for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)])
    tokenizer.save(str(directory / "tokenizer.json"))

    settings: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",  # as hub releases of byte-level BPE models say (AutoTokenizer reads it)
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    for name, gguf_key in SPECIAL_TOKEN_KEYS.items():
        if (token_id := meta.get(gguf_key)) is not None:
            settings[f"{name}_token"] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        settings["chat_template"] = meta["tokenizer.chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
