"""Files a crash must never leave half-written, and the folders parrot-edge keeps its things in.

Everything that replaces a file or folder someone may read (a manifest, a model in the store, a converted
GGUF, a USB stick, a cached build) is written beside its final place and renamed over it only when complete:
a crash, a full disk or Ctrl-C leaves either the old content or the new, never half of it. The temporary
name is `.<name>.<random>.<purpose>`, so what a killed run (SIGKILL, power cut) left can be found again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from parrot_edge.errors import ParrotEdgeError

READABLE = 0o644  # files a service user must read (manifests, models): mkstemp alone makes them owner-only


def xdg_dir(variable: str, fallback: str) -> Path:
    """An XDG base directory: `$variable`, else `~/fallback`."""
    return Path(os.environ.get(variable) or Path.home() / fallback)


def cache_dir(*parts: str) -> Path:
    """parrot-edge's cache (cached builds, benchmark checkpoints): `$XDG_CACHE_HOME/parrot-edge/…`."""
    return xdg_dir("XDG_CACHE_HOME", ".cache").joinpath("parrot-edge", *parts)


@contextlib.contextmanager
def temp_file_beside(target: Path, purpose: str, mode: int | None = None) -> Iterator[Path]:
    """A fresh empty file next to `target`, removed on exit unless the block renamed it away. `mode` None: the
    permissions of an ordinary new file (the umask's)."""
    try:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{purpose}", dir=target.parent)
    except OSError as exc:
        raise ParrotEdgeError(f"cannot write to {target.parent}: {exc.strerror}") from None
    os.fchmod(handle, 0o666 & ~_umask() if mode is None else mode)
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_atomically(target: Path, *, purpose: str = "partial", mode: int | None = READABLE) -> Iterator[Path]:
    """A temporary file beside `target` for the block to write; on success it is synced and renamed over
    `target`, on any failure removed. `mode` None: the permissions of an ordinary new file. The folder must
    exist (a mistyped output path fails instead of growing folders)."""
    with temp_file_beside(target, purpose, mode) as partial:
        yield partial
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(partial, target)


def write_atomically(target: Path, data: bytes) -> None:
    """Write a small file (readable by all, its folder made if need be) so a crash leaves either the old
    content or the new."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(target) as partial:
        partial.write_bytes(data)


@contextlib.contextmanager
def folder_replaced_atomically(target: Path, purpose: str = "partial") -> Iterator[Path]:
    """A temporary folder beside `target` (same disk: renaming is instant) that becomes `target` only if the
    block succeeds; a folder already at `target` is replaced, and a failure leaves it untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=f".{purpose}", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would lock everyone but its maker out
    try:
        yield staging
        if target.exists():
            previous = staging.with_name(f"{staging.name}.previous")
            target.rename(previous)
            staging.rename(target)
            shutil.rmtree(previous)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def leftovers_beside(target: Path, *purposes: str) -> list[Path]:
    """Temporary files an earlier run left beside `target` when it was killed before it could clean up."""
    return [p for purpose in purposes for p in target.parent.glob(f".{target.name}.*.{purpose}")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
