"""Which family a checkpoint belongs to: detected from its files and keys, or named with --family."""

from __future__ import annotations

import contextlib
from pathlib import Path

from parrot_edge.converters import hf_llama, litgpt, tinyllama
from parrot_edge.converters.checkpoint import Checkpoint, Family
from parrot_edge.converters.errors import BadInput
from parrot_edge.converters.weights import WeightFiles

# Most specific first: a litgpt directory may also hold a config.json, so keys decide before file names.
FAMILIES: list[Family] = [tinyllama.FAMILY, litgpt.FAMILY, hf_llama.FAMILY]


def open_checkpoint(source: Path, family: str | None = None, config: str | None = None) -> Checkpoint:
    if not source.exists():
        raise BadInput(f"{source} does not exist")
    if family is not None:
        chosen = next((f for f in FAMILIES if f.name == family), None)
        if chosen is None:
            raise BadInput(f"unknown family {family!r}; known: {', '.join(f.name for f in FAMILIES)}")
        return chosen.open(source, config)
    for candidate in FAMILIES:
        if candidate.matches(source):
            return candidate.open(source, config)
    expectations = "; ".join(f"{f.name}: {f.expects}" for f in FAMILIES)
    raise BadInput(f"{source} matches no checkpoint family. Found: {_describe(source)}. Expected — {expectations}")


def _describe(source: Path) -> str:
    files = sorted(p.name for p in source.iterdir()) if source.is_dir() else [source.name]
    shown = ", ".join(files[:10]) + (f", … ({len(files)} files)" if len(files) > 10 else "")
    keys = []
    if source.is_file():
        with contextlib.suppress(BadInput):  # not a weights file at all: the file name says enough
            keys = WeightFiles([source]).keys()
    return f"files [{shown}]" + (f", keys [{', '.join(keys[:6])}{', …' if len(keys) > 6 else ''}]" if keys else "")
