"""The school's real model size for the benchmarks: ParrotAI-1.1B's exact shape with seeded random weights.

No trained 1.1B checkpoint exists offline, and none is needed: speed and memory do not depend on the weights'
values. For a preset of the TinyLlama family (`tiny_LLaMA_1b`: 22 layers, 32 heads, 4 query groups, 2048/5632,
vocab 32000) this builds, once, under the cache:

  train/iter-000000-ckpt.pth  the TinyLlama training-checkpoint format parrot-edge converts (fused grouped QKV,
                              SwiGLU w1/w2/w3, with optimizer state and hparams, as fabric.save writes it)
  hf/                         an HF Llama twin of the same weights, for llama.cpp's convert_hf_to_gguf.py
  tokenizer.model             Llama 2's SentencePiece tokenizer (TinyLlama's), rebuilt from the vendored
                              llama.cpp's ggml-vocab-llama-spm.gguf test vocabulary (it tokenises all 46 of
                              llama.cpp's test texts for that vocabulary exactly as expected: checked)
  <quant>.gguf                what `parrot-edge convert` makes of the training checkpoint

Weights are N(0, 0.02) from torch's generator seeded with `seed`; norms are 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from parrot_edge.bench.llama_tools import llama_cpp_source
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.files import cache_dir, folder_replaced_atomically

SEED = 0


def shape_dir(shape: str, seed: int = SEED) -> Path:
    """The cached folder of a shape's checkpoint (built if missing)."""
    from parrot_edge.converters.families import presets

    if shape not in presets():
        raise ParrotEdgeError(f"unknown model shape {shape!r}; known: {', '.join(presets())}")
    target = cache_dir("bench", "shapes", f"{shape}-seed{seed}")
    if not (target / "train").is_dir():
        print(f"building a random {shape} checkpoint (seed {seed}, once; several GB)…", file=sys.stderr)
        with folder_replaced_atomically(target) as staging:
            _build(staging, shape, seed)
    return target


def shape_gguf(shape: str, quant: str = "q4_k_m", seed: int = SEED) -> Path:
    """The shape converted by parrot-edge to `quant` (built once)."""
    folder = shape_dir(shape, seed)
    gguf = folder / f"{quant}.gguf"
    if not gguf.is_file():
        print(f"converting {shape} to {quant.upper()} with parrot-edge (once)…", file=sys.stderr)
        # random weights: calibrating on text would only cost time
        done = subprocess.run([*convert_argv(shape, folder, gguf, quant), "--no-calibrate"], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise ParrotEdgeError(f"converting the {shape} checkpoint failed: {done.stderr.strip()[-500:]}")
    return gguf


def training_checkpoint(folder: Path) -> Path:
    return folder / "train" / "iter-000000-ckpt.pth"


def convert_argv(shape: str, folder: Path, output: Path, quant: str) -> list[str]:
    """`parrot-edge convert` of the shape's training checkpoint, as a maintainer types it."""
    return [sys.executable, "-m", "parrot_edge", "convert", str(training_checkpoint(folder)), "--config", shape,
            "--tokenizer", str(folder / "tokenizer.model"), "-o", str(output), "--quant", quant]


def _build(folder: Path, shape: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from parrot_edge.converters.families import presets

    config = presets()[shape]
    rebuild_llama_spm_tokenizer(folder / "tokenizer.model")
    generator = torch.Generator().manual_seed(seed)
    lit = _lit_state(config, generator)
    (folder / "train").mkdir()
    (folder / "train" / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    optimizer = {"state": {}, "param_groups": [{"lr": 4e-4, "params": []}]}
    torch.save({"model": lit, "optimizer": optimizer, "hparams": {"model_name": shape}, "iter_num": 0,
                "step_count": 0}, training_checkpoint(folder))
    hf = folder / "hf"
    hf.mkdir()
    save_file(_hf_state(lit, config), hf / "model.safetensors", metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(_hf_config(config), indent=2))
    (hf / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())


def _lit_state(config: dict, generator) -> dict:
    """The TinyLlama fork's state dict: grouped fused QKV (per group: its query heads, its key, its value)."""
    import torch

    n_embd, n_head, groups = config["n_embd"], config["n_head"], config["n_query_groups"]
    ff = config["intermediate_size"]
    head = n_embd // n_head
    vocab = config["vocab_size"]

    def matrix(rows: int, cols: int):
        return torch.empty(rows, cols).normal_(0.0, 0.02, generator=generator)

    state = {"transformer.wte.weight": matrix(vocab, n_embd)}
    for i in range(config["n_layer"]):
        block = f"transformer.h.{i}."
        state |= {block + "norm_1.weight": torch.ones(n_embd),
                  block + "attn.attn.weight": matrix((n_head + 2 * groups) * head, n_embd),
                  block + "attn.proj.weight": matrix(n_embd, n_embd), block + "norm_2.weight": torch.ones(n_embd),
                  block + "mlp.swiglu.w1.weight": matrix(ff, n_embd),
                  block + "mlp.swiglu.w2.weight": matrix(ff, n_embd),
                  block + "mlp.swiglu.w3.weight": matrix(n_embd, ff)}
    state |= {"transformer.ln_f.weight": torch.ones(n_embd), "lm_head.weight": matrix(vocab, n_embd)}
    return state


def _hf_state(lit: dict, config: dict) -> dict:
    """The same weights under HF Llama's names, QKV split (HF keeps rotate-half order, as lit-gpt does)."""
    n_embd, n_head, groups = config["n_embd"], config["n_head"], config["n_query_groups"]
    head, q_per_kv = n_embd // n_head, n_head // groups
    hf = {"model.embed_tokens.weight": lit["transformer.wte.weight"],
          "model.norm.weight": lit["transformer.ln_f.weight"], "lm_head.weight": lit["lm_head.weight"]}
    for i in range(config["n_layer"]):
        block, layer = f"transformer.h.{i}.", f"model.layers.{i}."
        fused = lit[block + "attn.attn.weight"].reshape(groups, q_per_kv + 2, head, n_embd)
        hf |= {layer + "self_attn.q_proj.weight": fused[:, :q_per_kv].reshape(-1, n_embd).contiguous(),
               layer + "self_attn.k_proj.weight": fused[:, q_per_kv].reshape(-1, n_embd).contiguous(),
               layer + "self_attn.v_proj.weight": fused[:, q_per_kv + 1].reshape(-1, n_embd).contiguous(),
               layer + "self_attn.o_proj.weight": lit[block + "attn.proj.weight"],
               layer + "input_layernorm.weight": lit[block + "norm_1.weight"],
               layer + "post_attention_layernorm.weight": lit[block + "norm_2.weight"],
               layer + "mlp.gate_proj.weight": lit[block + "mlp.swiglu.w1.weight"],
               layer + "mlp.up_proj.weight": lit[block + "mlp.swiglu.w2.weight"],
               layer + "mlp.down_proj.weight": lit[block + "mlp.swiglu.w3.weight"]}
    return hf


def _hf_config(config: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config["n_embd"],
            "intermediate_size": config["intermediate_size"], "num_attention_heads": config["n_head"],
            "num_key_value_heads": config["n_query_groups"], "num_hidden_layers": config["n_layer"],
            "vocab_size": config["vocab_size"], "max_position_embeddings": config["block_size"],
            "rms_norm_eps": config["norm_eps"], "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


def rebuild_llama_spm_tokenizer(target: Path) -> Path:
    """Llama 2's tokenizer.model from llama.cpp's test vocabulary (pieces, scores, types: all a SentencePiece
    BPE model holds that tokenising needs), with Llama 2's normaliser settings (dummy prefix, no NFKC)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    reader = gguf.GGUFReader(llama_cpp_source() / "models" / "ggml-vocab-llama-spm.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    proto = sentencepiece_model_pb2.ModelProto()
    for piece, score, kind in zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"],
                                  fields["tokenizer.ggml.token_type"], strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)
    proto.trainer_spec.model_type = proto.trainer_spec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    target.write_bytes(proto.SerializeToString())
    return target
