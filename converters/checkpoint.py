"""What every checkpoint family provides: the one interface between source formats and the GGUF side.

A family (converters/families/) recognises its files and opens them as a `Checkpoint`, usually the
checkpoint class of its llama.cpp architecture (converters/architectures/). Everything after that —
tokenizer export, the GGUF writer, llama.cpp's quantiser, verification — only sees this interface, so
another architecture (ParrotLLM → `llama`, `hunyuan-dense`, `plamo3` or `gpt2`, Parakeet → `mpt`) plugs in by
returning its own `arch`, metadata keys, tensors and reference forward; nothing else changes. Where the target
computes something slightly different, `approximations` says what, and the reference forward stays the
checkpoint's own function, so verification measures the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from parrot_edge.converters.reference import Reference

if TYPE_CHECKING:
    from parrot_edge.converters.tokenizer import TokenizerHints


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the target architecture names and lays it out, produced on demand."""

    name: str
    shape: tuple[int, ...]  # torch order [out, in]; GGUF stores it reversed
    source_dtype: torch.dtype  # how the checkpoint stores it: decides the quantiser's input type
    load: Callable[[], torch.Tensor]
    # Its values in order, flat, a few MB at a time, where the checkpoint holds them as they are written (see
    # WeightFiles.stream): the writer then copies nothing
    stream: Callable[[], Iterator[torch.Tensor]] | None = None


@dataclass(frozen=True)
class StateDictSizes:
    """The sizes a state dict whose architecture is not stored gives (from its tensors, names and file name);
    a family's layout adds what else it needs to know."""

    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


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
    tokenizer_hints: TokenizerHints | None = None  # what the family knows about its tokenizer beyond the files


class Checkpoint(Protocol):
    """A source checkpoint opened by its family."""

    arch: str  # llama.cpp architecture written as general.architecture
    source: SourceInfo
    n_vocab: int  # rows of the token embedding: the GGUF must hold exactly this many tokens
    context_length: int
    parameter_count: int
    # What the GGUF computes differently from the checkpoint, one sentence each; empty: an exact conversion
    approximations: list[str]

    def gguf_metadata(self) -> dict[str, Any]:
        """Architecture keys (e.g. `llama.block_count`); Python int → uint32, float → float32, str → string."""
        ...

    def gguf_tensors(self) -> list[GGUFTensor]:
        """Every tensor of the GGUF, in writing order, each loaded only when asked for."""
        ...

    # The checkpoint's own function, layer by layer (converters/reference.py): verification runs it whole,
    # calibration one layer at a time
    reference: Reference

    def reference_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The checkpoint's own function: logits [batch, time, n_vocab] (float32) for token ids [batch, time]."""
        ...



@dataclass
class MappedCheckpoint:
    """A checkpoint already mapped onto its target architecture: tensors and metadata built by its family,
    the reference forward the family's own (the checkpoint's function, whatever the target computes)."""

    arch: str
    source: SourceInfo
    n_vocab: int
    context_length: int
    parameter_count: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    reference: Reference
    approximations: list[str] = field(default_factory=list)

    def gguf_metadata(self) -> dict[str, Any]:
        return self.metadata

    def gguf_tensors(self) -> list[GGUFTensor]:
        return self.tensors

    def reference_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.reference.logits(tokens)
