"""Tokenizer export: a checkpoint's tokenizer as GGUF `tokenizer.*` metadata that llama.cpp reads.

Two kinds, as HF and litgpt directories keep them:
- SentencePiece `tokenizer.model` (Llama 2 style) → `tokenizer.ggml.model = "llama"`: pieces, scores and
  piece types (normal, unknown, control, user-defined, unused, byte) copied from the model itself.
- Hugging Face `tokenizer.json` byte-level BPE → `tokenizer.ggml.model = "gpt2"`: tokens, merges, and
  the llama.cpp pre-tokenizer that splits text exactly as the tokenizer's own pre-tokenizer does.
  Pre-tokenizers are recognised by their definition (table below); an unknown one is refused, because
  llama.cpp would otherwise split text differently and the model would read text it was never trained on.

Special tokens come from tokenizer_config.json when it names them (bos_token, eos_token, …), else from
the tokenizer itself; add_bos/add_eos likewise. The chat template comes from tokenizer_config.json or
chat_template.jinja; base models without one get parrot-edge's DEFAULT_CHAT_TEMPLATE (plain
"User:/Assistant:" text that a base model can follow).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parrot_edge.api.chat_template import DEFAULT_CHAT_TEMPLATE
from parrot_edge.converters.errors import BadInput

# GGUF token types (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PAD_SCORE = -1000.0
# A trainer pads the embedding up to a multiple of 64 or so; a bigger gap means the wrong tokenizer.
MAX_PADDING = 64
# The special tokens a GGUF names, as tokenizer_config.json calls them (`<name>_token`) → their GGUF key
SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "eot": "tokenizer.ggml.eot_token_id",  # llama.cpp ends generation on it too (as on eos)
}
# What find_tokenizer looks for in a directory, in this order (vocab.json / encoder.json: GPT-2's files as the
# hub and OpenAI name them, each with its merges beside it; *.tiktoken files are looked for after these)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "encoder.json")

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer name → (normalizer type, pre-tokenizer steps, ignore_merges) of tokenizer.json
PRE_TOKENIZERS: dict[str, tuple[str | None, list[tuple], bool]] = {
    "gpt-2": (None, [("ByteLevel", True, False)], False),
    "smollm": (None, [("Digits", True), ("ByteLevel", True, False)], False),
    "llama-bpe": (None, [("Split", _LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False, False)], True),
    "qwen2": ("NFC", [("Split", _QWEN2_REGEX, "Isolated", False), ("ByteLevel", False, False)], False),
}


@dataclass
class TokenizerHints:
    """A family's knowledge of its tokenizer that the tokenizer files do not hold (defaults that a
    tokenizer_config.json beside them overrides): tokens its trainer added, which ids are special, the
    chat template its own generator uses."""

    added: dict[int, tuple[str, int]] = field(default_factory=dict)  # id → (text, GGUF token type)
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/pad/eot → id
    add_bos: bool = False
    chat_template: str | None = None


@dataclass
class Vocabulary:
    """A tokenizer ready for the GGUF, and the source tokenizer itself for parity checks."""

    kind: str  # "sentencepiece" or "byte-level-bpe (<pre>)"
    tokens: list[str]
    scores: list[float]
    types: list[int]
    metadata: dict[str, Any]  # the other tokenizer.* keys
    encode: Callable[[str], list[int]]  # the source tokenizer's ids for a text, BOS/EOS as configured
    notes: list[str] = field(default_factory=list)

    def gguf_metadata(self) -> dict[str, Any]:
        arrays = {"tokenizer.ggml.tokens": self.tokens, "tokenizer.ggml.token_type": self.types}
        if self.metadata["tokenizer.ggml.model"] == "llama":  # BPE vocabularies rank by merges, not scores
            arrays["tokenizer.ggml.scores"] = self.scores
        return {**self.metadata, **arrays}


def find_tokenizer(path: Path) -> Path:
    """The tokenizer file for a --tokenizer argument or a checkpoint directory (tokenizer.model preferred)."""
    if path.is_file():
        return path
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            return path / name
    if found := sorted(path.glob("*.tiktoken")):
        return found[0]
    raise BadInput(f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)} and *.tiktoken); "
                   "pass the checkpoint's tokenizer with --tokenizer")


def load_vocabulary(path: Path, n_vocab: int, declared_vocab: int | None = None,
                    hints: TokenizerHints | None = None) -> Vocabulary:
    """Read a tokenizer file and fit it to an embedding of `n_vocab` rows. `hints` (the family's) give the
    tokens its trainer added and its special tokens, where tokenizer_config.json does not say otherwise."""
    from parrot_edge.converters import bpe_files

    settings = _read_json(path.parent / "tokenizer_config.json")
    if path.suffix == ".model":
        vocab = _sentencepiece(path, settings)
    else:
        vocab = byte_level_bpe(bpe_files.tokenizer_json(path), path, _with_hints(settings, hints), hints)
    _pad_to_embedding(vocab, n_vocab, declared_vocab)
    template = _chat_template(path.parent, settings) or (hints.chat_template if hints else None)
    if template is None:
        template = DEFAULT_CHAT_TEMPLATE
        vocab.notes.append("no chat template in tokenizer_config.json: wrote parrot-edge's default "
                           "(plain 'User:' / 'Assistant:' turns)")
    vocab.metadata["tokenizer.chat_template"] = template
    return vocab


def _with_hints(settings: dict[str, Any], hints: TokenizerHints | None) -> dict[str, Any]:
    """tokenizer_config.json's settings, completed by the family's hints (token contents, as it names them)."""
    if hints is None:
        return settings
    contents = dict(hints.added.items())
    merged = dict(settings)
    for name, token_id in hints.special.items():
        if token_id in contents:
            merged.setdefault(f"{name}_token", contents[token_id][0])
        else:
            merged.setdefault(f"_{name}_id", token_id)  # an id of the base vocabulary: resolved by id
    merged.setdefault("add_bos_token", hints.add_bos)
    return merged


def _sentencepiece(path: Path, settings: dict[str, Any]) -> Vocabulary:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as exc:  # protobuf and sentencepiece raise assorted types for a corrupt file
        raise BadInput(f"{path} is not a SentencePiece model: {exc}") from None
    tokens, scores = [p.piece for p in proto.pieces], [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    for token_id, entry in sorted(_added_tokens(path.parent, settings).items()):
        if token_id >= len(tokens):
            _pad_until(tokens, scores, types, token_id)
            tokens.append(entry["content"])
            scores.append(PAD_SCORE)
            types.append(CONTROL if entry.get("special") else USER_DEFINED)

    lookup = {token: i for i, token in enumerate(tokens)}
    defaults = {"bos": processor.bos_id(), "eos": processor.eos_id(), "unk": processor.unk_id(),
                "pad": processor.pad_id()}
    special = _special_ids(settings, lookup, {k: v for k, v in defaults.items() if v >= 0})
    add_bos = bool(settings.get("add_bos_token", True))
    add_eos = bool(settings.get("add_eos_token", False))

    notes = []
    normalizer = proto.normalizer_spec
    if normalizer.name not in ("identity", ""):
        notes.append(f"the SentencePiece model normalises text with '{normalizer.name}', which llama.cpp does not "
                     "apply: text that normalisation changes may tokenise differently")
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        notes.append("this SentencePiece model is not of BPE type; llama.cpp tokenises with BPE-style merges, so some "
                     "text may tokenise differently (the verification's tokenizer check will say)")
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.add_space_prefix": normalizer.add_dummy_prefix,
        "tokenizer.ggml.remove_extra_whitespaces": normalizer.remove_extra_whitespaces,
        **_special_metadata(special, add_bos, add_eos),
    }

    def encode(text: str) -> list[int]:
        return _with_specials(processor.encode(text), special, add_bos, add_eos)

    return Vocabulary("sentencepiece", tokens, scores, types, metadata, encode, notes)


def byte_level_bpe(data: dict[str, Any], path: Path, settings: dict[str, Any],
                   hints: TokenizerHints | None = None) -> Vocabulary:
    """A byte-level BPE tokenizer, as a tokenizer.json's content (`data`, read from or built for `path`)."""
    from tokenizers import Tokenizer

    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')} tokenizer" + (" with byte fallback" if model.get("byte_fallback") else "")
        raise BadInput(f"{path} is a {kind}; parrot-edge exports byte-level BPE tokenizer.json files and "
                       "SentencePiece tokenizer.model files (pass the tokenizer.model with --tokenizer)")
    pre = llama_cpp_pre_tokenizer(data)
    _add_hinted_tokens(data, hints)
    try:
        tokenizer = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise BadInput(f"{path} is not a valid byte-level BPE tokenizer: {exc}") from None

    tokens, scores, types = _bpe_token_table(data)
    lookup = {token: i for i, token in enumerate(tokens)}
    by_id = {name[1:-3]: value for name, value in settings.items() if name.startswith("_") and name.endswith("_id")}
    special = _special_ids(settings, lookup, by_id or _bpe_default_specials(path.parent, lookup))
    if "eos" not in special:
        raise BadInput(f"cannot tell the end-of-text token of {path}: name it as eos_token in "
                       "tokenizer_config.json")
    plain, marked = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    add_bos = bool(settings.get("add_bos_token", marked[:1] == [special.get("bos")] and marked != plain))
    add_eos = bool(settings.get("add_eos_token", marked[-1:] == [special["eos"]] and marked != plain))

    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []],
        **_special_metadata(special, add_bos, add_eos),
    }

    # tokenizers numbers added tokens contiguously after the model's vocabulary: where the file leaves holes
    # (cl100k: 100256, 100261-100275) its ids differ from the file's, which the GGUF keeps
    renumbered = {tokenizer.token_to_id(e["content"]): e["id"] for e in data.get("added_tokens") or []}
    renumbered = {ours: theirs for ours, theirs in renumbered.items() if ours is not None and ours != theirs}

    def encode(text: str) -> list[int]:
        ids = [renumbered.get(i, i) for i in tokenizer.encode(text, add_special_tokens=False).ids]
        return _with_specials(ids, special, add_bos, add_eos)

    return Vocabulary(f"byte-level-bpe ({pre})", tokens, scores, types, metadata, encode)


def _bpe_token_table(data: dict[str, Any]) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types by id: the model's vocabulary and the added tokens (special ones are control)."""
    entries = {int(i): (token, NORMAL) for token, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens") or []:
        entries[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    tokens, scores, types = [], [], []
    for token_id, (token, token_type) in sorted(entries.items()):
        _pad_until(tokens, scores, types, token_id)  # ids no token uses
        tokens.append(token)
        scores.append(0.0)
        types.append(token_type)
    return tokens, scores, types


def _add_hinted_tokens(data: dict[str, Any], hints: TokenizerHints | None) -> None:
    """The family's added tokens into the tokenizer's added tokens (a vocabulary entry the trainer treats as
    special, such as GPT-2's <|endoftext|> in vocab.json, becomes one too); a different token at the same id
    means another tokenizer."""
    if hints is None or not hints.added:
        return
    added = data.setdefault("added_tokens", [])
    in_vocab = {i: token for token, i in (data.get("model") or {}).get("vocab", {}).items() if i in hints.added}
    already = {entry["id"]: entry["content"] for entry in added}
    for token_id, (content, token_type) in sorted(hints.added.items()):
        found = already.get(token_id, in_vocab.get(token_id))
        if found is not None and found != content:
            raise BadInput(f"the tokenizer has {found!r} at id {token_id}, where this checkpoint's trainer put "
                           f"{content!r}: it is not this checkpoint's tokenizer")
        if token_id not in already:
            added.append({"id": token_id, "content": content, "special": token_type == CONTROL,
                          "normalized": False, "single_word": False, "lstrip": False, "rstrip": False})


def llama_cpp_pre_tokenizer(data: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer equivalent to a tokenizer.json's normalizer + pre-tokenizer, or refuse."""
    normalizer = (data.get("normalizer") or {}).get("type")
    steps = _pre_tokenizer_steps(data.get("pre_tokenizer"))
    ignore_merges = bool((data.get("model") or {}).get("ignore_merges"))
    for name, known in PRE_TOKENIZERS.items():
        if known == (normalizer, steps, ignore_merges):
            return name
    found = {"normalizer": normalizer, "pre_tokenizer": steps, "ignore_merges": ignore_merges}
    raise BadInput(f"tokenizer.json uses a pre-tokenizer llama.cpp is not known to reproduce ({found}); known: "
                   f"{', '.join(PRE_TOKENIZERS)}. Converting anyway would split text differently from training")


def _pre_tokenizer_steps(pre: dict[str, Any] | None) -> list[tuple]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [step for inner in pre.get("pretokenizers") or [] for step in _pre_tokenizer_steps(inner)]
    kind = pre.get("type")
    if kind == "ByteLevel":
        return [(kind, pre.get("use_regex", True), pre.get("add_prefix_space", False))]
    if kind == "Digits":
        return [(kind, pre.get("individual_digits", False))]
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        return [(kind, pattern.get("Regex", pattern.get("String")), pre.get("behavior"), pre.get("invert", False))]
    return [(kind,)]


def _bpe_default_specials(directory: Path, lookup: dict[str, int]) -> dict[str, int]:
    """Special ids a BPE tokenizer implies without tokenizer_config.json: config.json, else GPT-2's convention."""
    model_config = _read_json(directory / "config.json")
    found = {name: model_config[f"{name}_token_id"] for name in ("bos", "eos", "pad")
             if isinstance(model_config.get(f"{name}_token_id"), int)}
    if "eos" not in found and "<|endoftext|>" in lookup:
        found = {"bos": lookup["<|endoftext|>"], "eos": lookup["<|endoftext|>"], **found}
    return found


def _special_ids(settings: dict[str, Any], lookup: dict[str, int], defaults: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json's named tokens win over the tokenizer's own defaults."""
    special = dict(defaults)
    for name in SPECIAL_TOKEN_KEYS:
        value = settings.get(f"{name}_token")
        content = value.get("content") if isinstance(value, dict) else value
        if content is None:
            continue
        if content not in lookup:
            raise BadInput(f"tokenizer_config.json names {name}_token {content!r}, which is not in the tokenizer")
        special[name] = lookup[content]
    return special


def _special_metadata(special: dict[str, int], add_bos: bool, add_eos: bool) -> dict[str, Any]:
    metadata: dict[str, Any] = {SPECIAL_TOKEN_KEYS[name]: token_id for name, token_id in special.items()}
    metadata["tokenizer.ggml.add_bos_token"] = add_bos
    metadata["tokenizer.ggml.add_eos_token"] = add_eos
    return metadata


def _with_specials(ids: list[int], special: dict[str, int], add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos and "bos" in special:
        ids = [special["bos"], *ids]
    if add_eos and "eos" in special:
        ids = [*ids, special["eos"]]
    return ids


def _added_tokens(directory: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Tokens added on top of a SentencePiece model (tokenizer_config.json, or older added_tokens.json)."""
    added = {int(i): entry for i, entry in (settings.get("added_tokens_decoder") or {}).items()}
    for content, token_id in _read_json(directory / "added_tokens.json").items():
        added.setdefault(int(token_id), {"content": content, "special": False})
    return added


def _pad_until(tokens: list[str], scores: list[float], types: list[int], length: int) -> None:
    """Fill ids up to `length` with unused [PAD<id>] tokens, as llama.cpp's own converter names them."""
    while len(tokens) < length:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(PAD_SCORE)
        types.append(UNUSED)


def _pad_to_embedding(vocab: Vocabulary, n_vocab: int, declared_vocab: int | None) -> None:
    """llama.cpp needs exactly one token per embedding row: pad with unused tokens where a trainer padded."""
    n_tokens = len(vocab.tokens)
    if n_tokens > n_vocab:
        raise BadInput(f"the tokenizer has {n_tokens} tokens but the model's embedding has {n_vocab} rows: this "
                       "tokenizer does not belong to this checkpoint (pass the right one with --tokenizer)")
    if n_tokens == n_vocab:
        return
    if n_vocab - n_tokens >= MAX_PADDING and n_tokens != declared_vocab:
        raise BadInput(f"the tokenizer has {n_tokens} tokens but the model's embedding has {n_vocab} rows, more "
                       f"than a trainer's padding (< {MAX_PADDING}): this tokenizer does not belong to this "
                       "checkpoint (pass the right one with --tokenizer)")
    _pad_until(vocab.tokens, vocab.scores, vocab.types, n_vocab)
    vocab.notes.append(f"padded the vocabulary with {n_vocab - n_tokens} unused [PAD] tokens to the embedding's "
                       f"{n_vocab} rows")


def _chat_template(directory: Path, settings: dict[str, Any]) -> str | None:
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if template is None:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template or None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise BadInput(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}
