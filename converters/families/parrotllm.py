"""Family: ParrotLLM trainer checkpoints (cyrilgabriele/ParrotLLM) — every generation, told apart by its keys.

The trainer saves {"model": state_dict, "optimizer", "config", "step", "epoch", …} as
runs/run_*/checkpoints/last_epoch_0001_step_0005000.pt, best_loss_*.pt, step_*.pt (older: no extension);
the architecture is in config["model"] (vocab_size, d_model, n_layers, n_heads, d_ff, context_length,
rope_theta). ParrotLLM's own loader uses weights_only=False; parrot-edge loads with weights_only=True,
which a dict of tensors, numbers and strings passes. A bare state dict needs --config: ParrotLLM's own
YAML (configs/default.yaml, its `model:` section).

Which generation (families/_parrotllm_model.py) decides the llama.cpp architecture and how exact it is
(families/_parrotllm_targets.py). Keys: tok_emb, blocks.N.{ln_1, attn.{q,k,v,o}_proj, [attn.q_norm/k_norm],
[ln_1_out], ln_2, mlp.{gate,up,down}_proj, [ln_2_out]}, ln_f, lm_head (tied: the same tensor as tok_emb).
The tokenizer is GPT-2's (vocab.json + merges.txt, or tokenizer.json) plus `<|pad|>` = 50257 when the
embedding has 50258 rows; `<|endoftext|>` 50256 begins and ends texts, no BOS is added.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families import Family, register

if TYPE_CHECKING:
    from parrot_edge.converters.checkpoint import Checkpoint

# ParrotLLM's trainer file names (the newest first); any single torch file is accepted when passed directly
_FILE_NAMES = re.compile(r"(last_epoch_\d+_step_\d+\.pt|best_loss_.*\.pt|step_\d+\.pt|\d+_epoch_\d+_step)$")
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
GPT2_EOT, GPT2_PAD = 50256, 50257


def find_checkpoint(source: Path) -> Path | None:
    if source.is_file():
        return source
    candidates = sorted(p for p in source.iterdir() if p.is_file() and (p.suffix in _TORCH_SUFFIXES
                                                                         or _FILE_NAMES.search(p.name)))
    return candidates[0] if len(candidates) == 1 else None


def matches(source: Path) -> bool:
    from parrot_edge.converters.weights import WeightFiles  # torch: not at import (see the registry)

    path = find_checkpoint(source)
    if path is None or not (path.suffix in _TORCH_SUFFIXES or _FILE_NAMES.search(path.name)):
        return False
    try:
        keys = WeightFiles([path]).keys()
    except BadInput:
        return False
    return "tok_emb.weight" in keys and any(k.startswith("blocks.") for k in keys)


def _model_config(files, config_argument: str | None) -> dict[str, Any]:
    """config["model"] of the checkpoint, or of --config (ParrotLLM's YAML), whichever is given."""
    if config_argument:
        import yaml

        try:
            data = yaml.safe_load(Path(config_argument).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise BadInput(f"--config {config_argument}: not a readable ParrotLLM YAML config ({exc})") from None
        return dict((data or {}).get("model", data or {}))
    config = files.extras.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    return dict(model) if isinstance(model, dict) else {}


def _layout(files, config: dict[str, Any], generation: str, flags: dict[str, bool]):
    from parrot_edge.converters.families._parrotllm_model import Layout

    keys = set(files.keys())
    naming = "first" if generation == "1a" else "current"
    vocab, d_model = files.shape("tok_emb.weight")
    n_layer = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
    mlp_key = "blocks.0.mlp.c_fc.weight" if generation == "5" else (
        "blocks.0.ffn.gate_proj.weight" if naming == "first" else "blocks.0.mlp.gate_proj.weight")
    n_head = config.get("n_heads")
    if n_head is None and flags.get("qk_norm"):  # the per-head q/k norm gains are head_dim wide
        n_head = d_model // files.shape("blocks.0.attn.q_norm.weight")[0]
    if n_head is None:
        raise BadInput("this ParrotLLM state dict does not record its number of heads: pass its training config "
                       "with --config (ParrotLLM's configs/default.yaml)")
    context = config.get("context_length") or (files.shape("pos_emb.weight")[0] if generation == "5" else 1024)
    tied = "lm_head.weight" not in keys or files.load("lm_head.weight").equal(files.load("tok_emb.weight"))
    return Layout(generation=generation, n_layer=n_layer, n_embd=d_model, n_head=int(n_head),
                  n_ff=files.shape(mlp_key)[0], n_vocab=vocab, context_length=int(context),
                  rope_base=float(config.get("rope_theta", 10000.0)), naming=naming, tied=tied, **flags)


def _expected_shapes(layout) -> dict[str, tuple[int, ...]]:
    """Every key the generation has, with its shape, for WeightFiles.check (it names any difference)."""
    d, f = layout.n_embd, layout.n_ff
    shapes = {layout.key("tok_emb"): (layout.n_vocab, d)}
    per_layer = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d)}
    if layout.generation == "5":
        shapes |= {"pos_emb.weight": (layout.context_length, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
        per_layer |= {"c_fc": (f, d), "c_proj": (d, f)}
        norms = {"ln_1": (d,), "ln_2": (d,)}
    else:
        shapes[layout.key("ln_f")] = (d,)
        per_layer |= {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
        norms = {"ln_1": (d,), "ln_2": (d,)} | ({"ln_1_out": (d,), "ln_2_out": (d,)} if layout.peri_ln else {})
        if layout.qk_norm:
            per_layer |= {"q_norm": (layout.head_dim,), "k_norm": (layout.head_dim,)}
    for i in range(layout.n_layer):
        shapes |= {layout.key(part, i): shape for part, shape in (per_layer | norms).items()}
        if layout.generation == "5":
            shapes |= {f"blocks.{i}.{n}.bias": (d,) for n in norms}
    return shapes


def open_checkpoint(source: Path, config_argument: str | None) -> Checkpoint:
    # torch and the architectures load here, not at import: the registry imports this module for --help
    import math

    from parrot_edge.converters.checkpoint import SourceInfo
    from parrot_edge.converters.families import _parrotllm_targets as targets
    from parrot_edge.converters.families._parrotllm_model import identify
    from parrot_edge.converters.tokenizer import CONTROL, TokenizerHints
    from parrot_edge.converters.weights import WeightFiles

    path = find_checkpoint(source)
    if path is None:
        raise BadInput(f"no ParrotLLM checkpoint in {source}: pass the .pt file itself (several or none found)")
    files = WeightFiles([path])
    generation, flags = identify(set(files.keys()))
    layout = _layout(files, _model_config(files, config_argument), generation, flags)
    expected = _expected_shapes(layout)
    files.check(expected, ignored_suffixes=("lm_head.weight", "rope.inv_freq"))
    parameters = sum(math.prod(shape) for shape in expected.values()) + (0 if layout.tied else
                                                                          layout.n_vocab * layout.n_embd)

    hints = TokenizerHints(added={GPT2_EOT: ("<|endoftext|>", CONTROL)}, special={"bos": GPT2_EOT, "eos": GPT2_EOT},
                           add_bos=False)
    if layout.n_vocab > GPT2_PAD:
        hints.added[GPT2_PAD] = ("<|pad|>", CONTROL)
        hints.special["pad"] = GPT2_PAD
    info = SourceInfo(family="parrotllm", path=path, weight_files=[path], tokenizer_dir=path.parent,
                      name=f"parrotllm-{path.stem}", notes=[_note(layout)], tokenizer_hints=hints,
                      declared_vocab=GPT2_PAD if layout.n_vocab > GPT2_PAD else None)
    if generation in ("1", "1a"):
        checkpoint = targets.to_llama(layout, files, info)
        checkpoint.parameter_count = parameters
        return checkpoint
    convert = {"2": targets.to_hunyuan_dense, "3": targets.to_plamo3, "5": targets.to_gpt2}[generation]
    return convert(layout, files, info, parameters)


def _note(layout) -> str:
    arch = {"1": "llama", "1a": "llama", "2": "hunyuan-dense", "3": "plamo3", "5": "gpt2"}[layout.generation]
    padding = (f"; d_ff {layout.n_ff} zero-padded to {-(-layout.n_ff // 32) * 32} (exact) so 32-value blocks fit"
               if layout.n_ff % 32 else "")
    return (f"ParrotLLM generation {layout.generation}: {layout.n_layer} layers, d_model {layout.n_embd}, "
            f"{layout.n_head} heads, d_ff {layout.n_ff}, vocabulary {layout.n_vocab} → llama.cpp `{arch}`{padding}")


register(Family(
    name="parrotllm",
    expects="a ParrotLLM trainer checkpoint (last_epoch_*_step_*.pt, best_loss_*.pt, step_*.pt: 'model' and "
            "'config') or its bare state dict with --config, keys tok_emb.weight and blocks.N.…",
    priority=12,  # its keys are its own; before the lit-gpt families' file-name tests
    matches=matches,
    open=open_checkpoint,
))
