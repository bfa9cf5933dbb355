"""`parrot-edge inspect FILE.gguf`: architecture, tensors and their types, tokenizer, and all metadata.

The header comes from parrot_edge.store.gguf_check (fast, and refuses damaged files); the vocabulary's strings,
which that reader skips, come from llama.cpp loading the vocabulary alone — which also proves llama.cpp
accepts it.
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from parrot_edge.converters.tokenizer import SPECIAL_TOKEN_KEYS
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.llamacpp import lib, load_model
from parrot_edge.store.gguf_check import StringArray, read_header


def describe(path: Path, all_tensors: bool = False) -> str:
    if not path.is_file():
        raise ParrotEdgeError(f"{path} does not exist")
    header = read_header(path)
    meta, tensors = header.metadata, header.tensors
    arch = meta.get("general.architecture", "?")

    def arch_key(name: str, default: Any = "?") -> Any:
        return meta.get(f"{arch}.{name}", default)

    types = Counter(gguf.GGMLQuantizationType(t.ggml_type).name for t in tensors)
    scaling = arch_key("rope.scaling.type", None)
    lines = [
        f"{path}  ({header.file_size / 1e6:.1f} MB, GGUF v{header.version})",
        f"architecture   {arch}; name {meta.get('general.name', '?')!r}; license {meta.get('general.license', '?')}",
        f"shape          {arch_key('block_count')} blocks, embedding {arch_key('embedding_length')}, "
        f"heads {arch_key('attention.head_count')} (kv {arch_key('attention.head_count_kv', '=')}), "
        f"feed-forward {arch_key('feed_forward_length')}, context {arch_key('context_length')}, "
        f"rope base {arch_key('rope.freq_base', 10000.0):g}"
        + (f", rope scaling {scaling} ×{arch_key('rope.scaling.factor', 1.0):g}" if scaling else ""),
        f"parameters     {sum(t.n_elements for t in tensors) / 1e6:.2f} M in {len(tensors)} tensors; types "
        + ", ".join(f"{name} ×{n}" for name, n in types.most_common()),
        "tokenizer      " + _tokenizer(path, meta),
        "tensors        name, type, shape (GGUF order: row length first)"
        + ("" if all_tensors else "; block 0 stands for every block (--tensors lists all)"),
    ]
    shown = tensors if all_tensors else [t for t in tensors if not re.match(r"blk\.(?!0\.)\d+\.", t.name)]
    lines += [f"  {t.name:<36} {gguf.GGMLQuantizationType(t.ggml_type).name:<6} {list(t.shape)}" for t in shown]
    lines.append("metadata")
    lines += [f"  {key} = {_short(value)}" for key, value in meta.items()]
    return "\n".join(lines)


def _tokenizer(path: Path, meta: dict[str, Any]) -> str:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, StringArray):
        return "none"
    texts = _token_texts(path, {meta.get(key) for key in SPECIAL_TOKEN_KEYS.values()})
    parts = [f"{meta.get('tokenizer.ggml.model')} (pre-tokenizer {meta.get('tokenizer.ggml.pre', 'default')})",
             f"{tokens.length} tokens"]
    if isinstance(meta.get("tokenizer.ggml.merges"), StringArray):
        parts.append(f"{meta['tokenizer.ggml.merges'].length} merges")
    for name, key in SPECIAL_TOKEN_KEYS.items():
        if (token_id := meta.get(key)) is not None:
            parts.append(f"{name} {token_id} {texts.get(token_id, '?')!r}")
    parts.append(f"add_bos {meta.get('tokenizer.ggml.add_bos_token', '?')}, "
                 f"add_eos {meta.get('tokenizer.ggml.add_eos_token', '?')}")
    template = meta.get("tokenizer.chat_template")
    parts.append(f"chat template of {len(template)} characters" if template else "no chat template")
    return "; ".join(parts)


def _token_texts(path: Path, ids: set[int | None]) -> dict[int, str]:
    llama = lib()
    model = load_model(path, vocab_only=True)
    try:
        vocab = llama.llama_model_get_vocab(model)
        n_tokens = llama.llama_vocab_n_tokens(vocab)
        return {i: ctypes.string_at(llama.llama_vocab_get_text(vocab, i)).decode("utf-8", errors="replace")
                for i in ids if i is not None and 0 <= i < n_tokens}
    finally:
        llama.llama_model_free(model)


def _short(value: Any, limit: int = 100) -> str:
    if isinstance(value, StringArray):
        return f"[{value.length} strings]"
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:5])
        return f"[{len(value)} items: {head}{', …' if len(value) > 5 else ''}]"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"
