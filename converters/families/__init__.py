"""The checkpoint families the converter reads: the registry, and which family a checkpoint belongs to.

Every module of this package whose name does not start with "_" is a family, and registers itself when
imported: `register(Family(...))` at the bottom of the module. The registry finds them all (pkgutil), so
adding a family is adding one module here (hf_llama.py is the one to copy) and its tests; nothing else
lists the families. "_"-prefixed modules are helpers shared by families (_lit_checkpoint.py) and are
never imported by the registry.

`parrot-edge --help` reads the registry for the --family choices and the --config presets, and a kiosk-only
machine has no torch, numpy or yaml: a family module imports only the standard library, errors.py and this
registry at the top, and its weights reader, architecture and anything heavy inside the functions that
detect or open a checkpoint. tests/test_convert_cli.py checks that building the parser loads none of them.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parrot_edge.converters.errors import BadInput

if TYPE_CHECKING:
    from parrot_edge.converters.checkpoint import Checkpoint


@dataclass(frozen=True)
class Family:
    """A checkpoint format the converter reads."""

    name: str  # the --family value
    expects: str  # what it looks for, shown when nothing matches
    # Detection order, lowest first: a format whose files would also pass another family's test goes first
    # (a litgpt directory may hold a config.json too, so keys decide before file names).
    priority: int
    matches: Callable[[Path], bool]  # cheap test on file names and tensor keys
    open: Callable[[Path, str | None], Checkpoint]  # (source, --config) → checkpoint
    # --config names this family's upstream defines → its architecture, in litgpt model_config.yaml fields
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_REGISTERED: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; its module calls this when imported. Names, priorities and preset names are unique."""
    for other in _REGISTERED.values():
        if family.name == other.name:
            raise ValueError(f"two checkpoint families are named {family.name!r}")
        if family.priority == other.priority:
            raise ValueError(f"families {other.name!r} and {family.name!r} share priority {family.priority}: "
                             "detection order would depend on import order")
        if clash := sorted(family.presets.keys() & other.presets.keys()):
            raise ValueError(f"families {other.name!r} and {family.name!r} both define the presets {clash}")
    _REGISTERED[family.name] = family
    return family


@cache
def _discover() -> None:
    # Once, on first use rather than at import: family modules import this package to register themselves.
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def registered() -> list[Family]:
    """Every family, in detection order."""
    _discover()
    return sorted(_REGISTERED.values(), key=lambda family: family.priority)


def names() -> list[str]:
    """The --family choices, in detection order."""
    return [family.name for family in registered()]


def presets() -> dict[str, Mapping[str, Any]]:
    """Every family's --config presets, by name (families in detection order)."""
    return {name: config for family in registered() for name, config in family.presets.items()}


def open_checkpoint(source: Path, family: str | None = None, config: str | None = None) -> Checkpoint:
    """Open `source` with the family named, or else the first (in detection order) whose test it passes."""
    if not source.exists():
        raise BadInput(f"{source} does not exist")
    known = registered()
    if family is not None:
        chosen = next((f for f in known if f.name == family), None)
        if chosen is None:
            raise BadInput(f"unknown family {family!r}; known: {', '.join(f.name for f in known)}")
        return chosen.open(source, config)
    for candidate in known:
        if candidate.matches(source):
            return candidate.open(source, config)
    expectations = "; ".join(f"{f.name}: {f.expects}" for f in known)
    raise BadInput(f"{source} matches no checkpoint family. Found: {_describe(source)}. Expected — {expectations}")


def _describe(source: Path) -> str:
    from parrot_edge.converters.weights import WeightFiles  # torch: only once nothing matched

    files = sorted(p.name for p in source.iterdir()) if source.is_dir() else [source.name]
    shown = ", ".join(files[:10]) + (f", … ({len(files)} files)" if len(files) > 10 else "")
    keys = []
    if source.is_file():
        with contextlib.suppress(BadInput):  # not a weights file at all: the file name says enough
            keys = WeightFiles([source]).keys()
    return f"files [{shown}]" + (f", keys [{', '.join(keys[:6])}{', …' if len(keys) > 6 else ''}]" if keys else "")
