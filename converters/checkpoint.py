"""What every checkpoint family provides: the one interface between source formats and the GGUF side.

A family (converters/families/) recognises its files and opens them as a `Checkpoint`, usually the
checkpoint class of its llama.cpp architecture (converters/architectures/). Everything after that —
tokenizer export, the GGUF writer, llama.cpp's quantiser, verification — only sees this interface, so
another architecture (ParrotLLM → `llama` or `plamo3`, Parakeet → `mpt`) plugs in by returning its own
`arch`, metadata keys, tensors and reference forward; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the target architecture names and lays it out, produced on demand."""

    name: str
    shape: tuple[int, ...]  # torch order [out, in]; GGUF stores it reversed
    source_dtype: torch.dtype  # how the checkpoint stores it: decides the lossless intermediate type
    load: Callable[[], torch.Tensor]


@dataclass
class SourceInfo:
    """Facts about the source that end up in GGUF metadata and the manifest."""

    family: str
    path: Path
    weight_files: list[Path]  # hashed into the source sha256
    tokenizer_dir: Path | None  # where the tokenizer is expected unless --tokenizer says otherwise
    name: str  # default general.name
    license: str | None = None
    declared_vocab: int | None = None  # vocabulary before the trainer padded the embedding, if the config says
    notes: list[str] = field(default_factory=list)  # things the maintainer should know (printed by the CLI)


class Checkpoint(Protocol):
    """A source checkpoint opened by its family."""

    arch: str  # llama.cpp architecture written as general.architecture
    source: SourceInfo
    n_vocab: int  # rows of the token embedding: the GGUF must hold exactly this many tokens
    context_length: int
    parameter_count: int

    def gguf_metadata(self) -> dict[str, Any]:
        """Architecture keys (e.g. `llama.block_count`); Python int → uint32, float → float32, str → string."""
        ...

    def gguf_tensors(self) -> list[GGUFTensor]:
        """Every tensor of the GGUF, in writing order, each loaded only when asked for."""
        ...

    def reference_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The checkpoint's own function: logits [batch, time, n_vocab] (float32) for token ids [batch, time]."""
        ...

