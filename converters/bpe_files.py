"""Byte-level BPE vocabularies kept in files other than tokenizer.json, as the tokenizer.json they amount to.

- GPT-2's own files: `vocab.json` + `merges.txt` (the hub's names) or `encoder.json` + `vocab.bpe` (OpenAI's),
  with GPT-2's pre-tokenizer (llama.cpp "gpt-2").
- tiktoken's `cl100k_base.tiktoken`: one "base64(token bytes) rank" line per token. tiktoken keeps no merges:
  it merges the adjacent pair whose concatenation has the lowest rank. The merges are recovered (as
  llama.cpp's convert_hf_to_gguf.py does for Qwen's tiktoken files): for a token of rank r, BPE over its bytes
  with only the tokens of rank < r ends in exactly two parts, and those two parts are its merge. Ranks are
  ids; cl100k's special tokens are not in the file and come from tiktoken's definition of cl100k_base; ids
  no token has stay holes (unused [PAD] tokens). cl100k splits text with the Llama 3 regex and looks a whole
  piece up before merging (ignore_merges): llama.cpp's "llama-bpe" pre-tokenizer, which is what this
  tokenizer.json says (see PRE_TOKENIZERS in tokenizer.py).
Tokens are written as GPT-2's byte-to-unicode mapping of their bytes, as every byte-level BPE GGUF holds them.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path
from typing import Any

from parrot_edge.converters.errors import BadInput

# tiktoken's cl100k_base (tiktoken_ext/openai_public.py): pattern and special tokens
CL100K_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CL100K_SPECIALS = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
_MERGES_BESIDE = {"vocab.json": "merges.txt", "encoder.json": "vocab.bpe"}


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map: printable bytes stand for themselves, the others
    take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def tokenizer_json(path: Path) -> dict[str, Any]:
    """The tokenizer.json content of any byte-level BPE tokenizer file parrot-edge reads."""
    if path.suffix == ".tiktoken":
        return _from_tiktoken(path)
    if path.name in _MERGES_BESIDE:
        return _from_gpt2_files(path, path.parent / _MERGES_BESIDE[path.name])
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{path} is not a Hugging Face tokenizer.json: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a Hugging Face tokenizer.json")
    return data


def _skeleton(vocab: dict[str, int], merges: list[str], pre_tokenizer: dict[str, Any], ignore_merges: bool,
              added: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }


def _from_gpt2_files(vocab_path: Path, merges_path: Path) -> dict[str, Any]:
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise BadInput(f"{vocab_path.name} needs {merges_path.name} beside it: {exc.filename} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"cannot read the GPT-2 tokenizer files {vocab_path} / {merges_path}: {exc}") from None
    merges = [line for line in lines if line and not line.startswith("#version")]
    if not isinstance(vocab, dict) or any(len(m.split(" ")) != 2 for m in merges):
        raise BadInput(f"{vocab_path} / {merges_path} are not GPT-2 vocabulary and merges files")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return _skeleton(vocab, merges, byte_level, False, [])


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """tiktoken's file format: one `base64(token) rank` line per token."""
    ranks, number = {}, 0
    try:
        for line in path.read_bytes().splitlines():
            number += 1
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, OSError) as exc:
        raise BadInput(f"{path} is not a tiktoken file (line {number}: {exc})") from None
    return ranks


def _from_tiktoken(path: Path) -> dict[str, Any]:
    if path.stem != "cl100k_base":
        raise BadInput(f"{path.name}: parrot-edge knows the pattern and special tokens of cl100k_base.tiktoken "
                       "only (rename the file if it is cl100k_base)")
    ranks = read_tiktoken(path)
    to_text = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe(ranks, token, rank)
            if len(parts) != 2:
                raise BadInput(f"{path}: token {rank} cannot be made from two lower-ranked tokens: not a BPE "
                               "vocabulary tiktoken could have written")
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    split = {"type": "Split", "pattern": {"Regex": CL100K_PATTERN}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    added = [{"id": i, "content": content, "special": True, "normalized": False, "single_word": False,
              "lstrip": False, "rstrip": False} for content, i in CL100K_SPECIALS.items()]
    return _skeleton({text(t): r for t, r in ranks.items()}, merges,
                     {"type": "Sequence", "pretokenizers": [split, byte_level]}, True, added)


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merging of `token`'s bytes, allowing only tokens ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best:
                best, at = rank, i
        if at < 0:
            return parts
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
