"""Tiny checkpoints and tokenizers for the converter tests, written in their real on-disk formats.

Every builder returns the independent implementation that defines the truth for that checkpoint
(transformers' LlamaForCausalLM, litgpt's GPT, the sentencepiece / tokenizers libraries). The TinyLlama
layout is built here from a litgpt model by slicing and concatenating per group — deliberately without
any converter code, so the converter's split is checked against an independent construction.

Weights are random but shaped like a trained model's: embeddings of std 1 and an output projection of
std 0.1 give peaked next-token distributions (so top-1 agreement under quantisation means something),
the blocks' matrices have std 0.05, and every norm weight is random (a swapped norm cannot hide behind
all-ones).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import yaml

# A small bilingual corpus for training tokenizers: English, Spanish with accents, digits, emoji, code.
CORPUS = [
    "The students read a book about the river and the mountains near their school.",
    "Every morning the teacher writes the date on the board: 2024-03-15, 09:41.",
    "Plants need water, light and air to grow; the children measured 12 cm in 3 weeks.",
    "She asked why the sky is blue, and he answered with a long story about light.",
    "La maestra explicó por qué el año tiene 365 días y cuántas horas tiene un día.",
    "Los niños leyeron un cuento sobre el río, la montaña y el pequeño pájaro azul.",
    "¿Dónde está la biblioteca? Está al lado de la escuela, junto al árbol grande.",
    "Mañana aprenderemos fracciones: un medio, un tercio y tres cuartos. ¡Qué alegría!",
    "El corazón late más rápido cuando corremos; la canción habla de la niñez.",
    "We planted 15 trees 🌳 today and the kids loved it 😊, feliz cumpleaños 🎂🎉 👍",
    "def mean(values):\n    return sum(values) / len(values)\n",
    "for i in range(10):\n    print(i * 2, 'done')  # comment\n",
    "Order #4721 shipped at $1,284.50 for 12 items (3.5 kg); call +34 612 345 678.",
    "Numbers like 1234567890 and 3.14159 appear in math and science classes.",
]
TEXTS = [
    "The library opens at eight. Students borrow books about volcanoes and rivers.",
    "La niña preguntó: ¿por qué la Luna cambia de forma? Él sonrió y dijo que depende del Sol.",
    "Invoice 2024-0042: total $9,876.54 due 31/12; ratio 3:2 and 0.5% fee.",
    "Great job! 🎉🚀 ¡Excelente trabajo! 👏😊 naïve café façade",
    "def area(r):\n    \"\"\"Circle area.\"\"\"\n    return 3.14159 * r ** 2\n\nprint(area(2))\n",
    "  leading spaces, double  spaces and a trailing newline\n",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_sentencepiece(directory: Path, vocab_size: int = 500) -> Path:
    """A Llama-2-style SentencePiece model: BPE, byte fallback, split digits, identity normalisation."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def build_bpe_tokenizer(directory: Path, pre: str = "smollm", vocab_size: int = 600,
                        settings: dict | None = None) -> Path:
    """A byte-level BPE tokenizer.json trained with the pre-tokenizer llama.cpp calls `pre`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    qwen2 = llama3.replace(r"\p{N}{1,3}", r"\p{N}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    plain_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tokenizer.pre_tokenizer = {
        "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), "isolated"), plain_bytes]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2), "isolated"), plain_bytes]),
        "metaspace": pre_tokenizers.Metaspace(),
    }[pre]
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings if settings is not None else config))
    return directory / "tokenizer.json"


def tokenizer_size(path: Path) -> int:
    if path.suffix == ".model":
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size()


def _spread(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norms
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
                continue
            std = 1.0 if ("embed" in name or "wte" in name) else 0.1 if "lm_head" in name else 0.05
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def hf_llama(directory: Path, vocab_size: int, *, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
             head_dim: int | None = None, ff: int = 512, layers: int = 2, rope_scaling: dict | None = None,
             tied: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32, shard_size: str | None = None,
             safetensors: bool = True):
    """An HF Llama directory (config.json + weights); returns the LlamaForCausalLM (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim or hidden // heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                         rope_theta=10000.0, rope_scaling=rope_scaling, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    _spread(model, seed)
    with torch.no_grad():  # the model computes with exactly the values the checkpoint holds
        for param in model.parameters():
            param.copy_(param.to(dtype).float())
    state = {key: value.to(dtype) for key, value in model.state_dict().items()}
    model.save_pretrained(directory, state_dict=state, safe_serialization=safetensors,
                          **({"max_shard_size": shard_size} if shard_size else {}))
    return model


def lit_config(vocab_size: int, *, n_embd: int = 256, n_head: int = 8, n_query_groups: int = 2,
               intermediate_size: int = 768, n_layer: int = 2, condense_ratio: int = 1, padding_multiple: int = 64):
    from litgpt.config import Config

    return Config(name="tiny-test", block_size=512, vocab_size=vocab_size, padding_multiple=padding_multiple,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_query_groups=n_query_groups,
                  intermediate_size=intermediate_size, rotary_percentage=1.0, parallel_residual=False, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", norm_eps=1e-5, rope_base=10000,
                  rope_condense_ratio=condense_ratio)


def lit_model(config, seed: int = 0):
    from litgpt.model import GPT

    model = GPT(config).eval()
    _spread(model, seed)
    return model


def litgpt_checkpoint(directory: Path, config, seed: int = 0):
    """A modern litgpt directory: lit_model.pth ([Q;K;V] fused `attn.qkv`) + model_config.yaml."""
    from litgpt.utils import save_config

    model = lit_model(config, seed)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "lit_model.pth")
    save_config(config, directory)
    return model


def tinyllama_checkpoint(directory: Path, config, seed: int = 0, *, write_config: bool = True,
                         model_name: str | None = None, prefix: str = ""):
    """A TinyLlama-fork pretraining checkpoint (iter-000100-ckpt.pth) made from a litgpt model's weights.

    The grouped fused QKV is assembled here by hand: for each key/value group, its query heads, then its
    key head, then its value head.
    """
    model = lit_model(config, seed)
    hs, n_kv = config.head_size, config.n_query_groups
    q_per_kv = config.n_head // n_kv
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("attn.qkv.weight"):
            q, k, v = value.split([config.n_head * hs, n_kv * hs, n_kv * hs])
            groups = []
            for g in range(n_kv):
                groups += [q[g * q_per_kv * hs:(g + 1) * q_per_kv * hs], k[g * hs:(g + 1) * hs], v[g * hs:(g + 1) * hs]]
            state[key.replace("attn.qkv", "attn.attn")] = torch.cat(groups).clone()
        else:
            renamed = key.replace("mlp.fc_1", "mlp.swiglu.w1").replace("mlp.fc_2", "mlp.swiglu.w2")
            state[renamed.replace("mlp.proj", "mlp.swiglu.w3")] = value.clone()
    state = {prefix + k: v for k, v in state.items()}
    optimizer = {"state": {i: {"exp_avg": torch.zeros_like(v), "step": torch.tensor(10.0)}
                           for i, v in enumerate(state.values())},
                 "param_groups": [{"lr": 4e-4, "betas": (0.9, 0.95), "params": list(range(len(state)))}]}
    hparams = {"name": "tinyllama_test", "learning_rate": 4e-4, "micro_batch_size": 8}
    if model_name:
        hparams["model_name"] = model_name
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "optimizer": optimizer, "hparams": hparams, "iter_num": 100, "step_count": 10},
               directory / "iter-000100-ckpt.pth")
    if write_config:  # the fork's spelling of the litgpt fields
        fork = {"name": config.name, "block_size": config.block_size, "vocab_size": config.vocab_size,
                "padding_multiple": config.padding_multiple, "n_layer": config.n_layer, "n_head": config.n_head,
                "n_embd": config.n_embd, "rotary_percentage": 1.0, "parallel_residual": False, "bias": False,
                "_norm_class": "FusedRMSNorm", "norm_eps": config.norm_eps, "_mlp_class": "LLaMAMLP",
                "intermediate_size": config.intermediate_size, "n_query_groups": n_kv,
                "condense_ratio": config.rope_condense_ratio}
        (directory / "model_config.yaml").write_text(yaml.safe_dump(fork))
    return model


def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def lit_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].float()
