"""Family: Parakeet (bytebreezestudios/ml-parakeet) — a plain state dict, written as llama.cpp's `mpt`.

The published file (parakeet8k-c8192-d1152-fexp4_v100288_h18_l18-alibi+gqa2.pth, ~1.5 GB float32) is
`model.state_dict()`: keys transformer.wte.{weight, norm.weight, norm.bias}, transformer.h.N.{ln_1,
attn.c_query, attn.c_kv, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, transformer.ln_f, lm_head (tied). Its
architecture is not stored: the sizes come from the tensors, the number of heads (and the context) from
the file name as main.py writes it, else main.py's defaults (18 heads, 8192 tokens), with a note.
What it computes and how it maps: families/_parakeet_model.py. Approximate (ALiBi's last heads, GELU).

Tokenizer: cl100k_base in tiktoken's own file (cl100k_base.tiktoken, beside the checkpoint or --tokenizer)
plus Parakeet's tokens: <|padding|> 100277 (control), "\\n\\nSystem: ", "\\n\\nHuman: ", "\\n\\nAssistant: "
100278–100280 (matched in plain text, as its tokenizer allows them), padded to 100288 rows. Its generator
stops at <|endofprompt|> (100276) and <|padding|>: eos and eot, which llama.cpp both ends generation on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.families import Family, register

if TYPE_CHECKING:
    from parrot_edge.converters.checkpoint import MappedCheckpoint

# main.py's transcript: "\n\n{Role}: {content}<|endofprompt|>" per turn, then "\n\nAssistant: " to answer
# (its preamble file is not published; the system message takes its place, in its "System" token)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '\\n\\nSystem: ' }}"
    "{% elif message['role'] == 'user' %}{{ '\\n\\nHuman: ' }}"
    "{% else %}{{ '\\n\\nAssistant: ' }}{% endif %}"
    "{{ message['content'] | trim }}{{ '<|endofprompt|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant: ' }}{% endif %}"
)
END_OF_TEXT, END_OF_PROMPT, PADDING = 100257, 100276, 100277
_MARKERS = ("transformer.wte.norm.weight", "attn.c_query.weight", "attn.c_kv.weight")


def _torch_file(source: Path) -> Path | None:
    if source.is_file():
        return source if source.suffix in (".pth", ".pt", ".bin", ".ckpt") else None
    candidates = [p for p in source.glob("*.pth") if p.is_file()]
    return candidates[0] if len(candidates) == 1 else None


def matches(source: Path) -> bool:
    from parrot_edge.converters.weights import WeightFiles  # torch: not at import (see the registry)

    path = _torch_file(source)
    try:
        keys = WeightFiles([path]).keys() if path else []
    except BadInput:
        return False
    return all(any(key.endswith(marker) for key in keys) for marker in _MARKERS)


def open_checkpoint(source: Path, config_argument: str | None) -> MappedCheckpoint:
    # torch and the architecture load here, not at import: the registry imports this module for --help
    import math

    from parrot_edge.converters.architectures import mpt
    from parrot_edge.converters.architectures.llama import LlamaConfig
    from parrot_edge.converters.checkpoint import MappedCheckpoint, SourceInfo
    from parrot_edge.converters.families import _parakeet_model as model
    from parrot_edge.converters.reference import Reference
    from parrot_edge.converters.weights import WeightFiles

    if config_argument:
        raise BadInput("Parakeet takes no --config: its sizes come from the weights and the file name")
    path = _torch_file(source)
    if path is None:
        raise BadInput(f"no Parakeet checkpoint in {source}: pass the .pth file itself")
    files = WeightFiles([path])
    layout, notes = _layout(files, path)
    expected = _expected_shapes(layout)
    files.check(expected, ignored_suffixes=("lm_head.weight",))
    head = "lm_head.weight" in set(files.keys())
    if head and not files.load("lm_head.weight").equal(files.load("transformer.wte.weight")):
        raise BadInput("lm_head.weight differs from transformer.wte.weight: Parakeet ties them, this file does not")

    config = LlamaConfig(n_layer=layout.n_layer, n_embd=layout.n_embd, n_head=layout.n_head,
                         n_kv_head=layout.n_head, head_dim=layout.head_dim, n_ff=layout.n_ff, n_vocab=layout.n_vocab,
                         context_length=layout.context_length, norm_eps=model.LAYER_NORM_EPS, tied_embeddings=False)
    info = SourceInfo(family="parakeet", path=path, weight_files=[path], tokenizer_dir=path.parent,
                      name=path.stem.split("-")[0], license="GPL", declared_vocab=PADDING + 4, notes=notes,
                      tokenizer_hints=_tokenizer_hints())
    approximations = [a for a in (model.alibi_approximation(layout.n_head), model.GELU_APPROXIMATION) if a]
    shared = _shared_kv(path, layout.n_layer, layout.n_embd)
    return MappedCheckpoint(
        arch=mpt.ARCH, source=info, n_vocab=layout.n_vocab, context_length=layout.context_length,
        parameter_count=sum(math.prod(shape) for shape in expected.values()) - shared,
        metadata=mpt.gguf_metadata(config, model.alibi_bias_for(layout.n_head)),
        tensors=model.mpt_tensors(layout, config, files.load, files.dtype("transformer.wte.weight")),
        reference=Reference(model.ParakeetForward(layout), lambda key: files.load(key).float()),
        approximations=approximations)


def _layout(files, path: Path):
    """The sizes: from the tensors, the heads and context from the file name (else main.py's defaults, noted)."""
    from parrot_edge.converters.families import _parakeet_model as model

    named, notes = model.from_file_name(path), []
    for field, default in model.DEFAULTS.items():
        if field not in named:
            named[field] = default
            notes.append(f"{field} {default} (main.py's default): the file name does not say")
    n_vocab, n_embd = files.shape("transformer.wte.weight")
    keys = files.keys()
    n_layer = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("transformer.h."))
    n_ff = files.shape("transformer.h.0.mlp.c_fc.weight")[0]
    n_head = named["n_head"]
    if n_embd % n_head:
        raise BadInput(f"{n_head} heads do not divide the embedding width {n_embd}: the file name's _h{n_head} "
                       "is wrong")
    return model.Layout(n_layer, n_embd, n_head, n_ff, n_vocab, named["block_size"]), notes


def _expected_shapes(layout) -> dict[str, tuple[int, ...]]:
    n_embd, n_ff = layout.n_embd, layout.n_ff
    expected = {"transformer.wte.weight": (layout.n_vocab, n_embd), "transformer.wte.norm.weight": (n_embd,),
                "transformer.wte.norm.bias": (n_embd,), "transformer.ln_f.weight": (n_embd,)}
    for i in range(layout.n_layer):
        expected |= {f"transformer.h.{i}.{part}.weight": shape for part, shape in {
            "ln_1": (n_embd,), "attn.c_query": (n_embd, n_embd), "attn.c_kv": (2 * n_embd, n_embd),
            "attn.c_proj": (n_embd, n_embd), "ln_2": (n_embd,), "mlp.c_fc": (n_ff, n_embd),
            "mlp.c_proj": (n_embd, n_ff)}.items()}
    return expected


def _tokenizer_hints():
    from parrot_edge.converters.tokenizer import CONTROL, USER_DEFINED, TokenizerHints

    return TokenizerHints(
        added={PADDING: ("<|padding|>", CONTROL), 100278: ("\n\nSystem: ", USER_DEFINED),
               100279: ("\n\nHuman: ", USER_DEFINED), 100280: ("\n\nAssistant: ", USER_DEFINED)},
        special={"bos": END_OF_TEXT, "eos": END_OF_PROMPT, "pad": PADDING, "eot": PADDING},
        add_bos=False, chat_template=CHAT_TEMPLATE)


def _shared_kv(path: Path, n_layer: int, n_embd: int) -> int:
    """Parameters counted twice above: c_kv is one tensor per group of layers ("+gqa2": pairs)."""
    import re

    group = re.search(r"gqa(\d+)", path.name)
    per_group = int(group[1]) if group else 1
    return (n_layer - -(-n_layer // per_group)) * 2 * n_embd * n_embd


register(Family(
    name="parakeet",
    expects="a Parakeet state dict (.pth) with keys transformer.wte.norm.weight, transformer.h.N.attn.c_query / "
            "c_kv, sizes in its file name (…_h18_l18…)",
    priority=14,
    matches=matches,
    open=open_checkpoint,
))
