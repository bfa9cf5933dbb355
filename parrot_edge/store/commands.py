"""The `parrot-edge models …` commands (list, add, pull, verify, remove) over the store."""

from __future__ import annotations

import sys
from pathlib import Path

from parrot_edge.settings import load_settings
from parrot_edge.store.manifest import ModelManifest, manifest_path_for
from parrot_edge.store.model_store import DEFAULT_MODEL, USB_WHEELHOUSE, ModelStore, catalog


def _store() -> ModelStore:
    return ModelStore(load_settings().models_dir)


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _exactness(manifest: ModelManifest) -> str:
    """Whether the GGUF computes its checkpoint's function exactly, as its converter recorded."""
    if manifest.exact is False:
        return f"APPROXIMATE ({len(manifest.approximations or [])} approximation(s): see {manifest.name}.json)"
    return "exact" if manifest.exact else "exactness not recorded"


def _row(manifest: ModelManifest, last_column: str) -> list[str]:
    return [manifest.name + (" (default)" if manifest.name == DEFAULT_MODEL else ""),
            f"{manifest.size / 1e6:,.1f} MB", manifest.quant, manifest.license or "license unknown",
            _exactness(manifest), last_column]


def list_command(args) -> int:
    store = _store()
    installed = store.list()
    if installed:
        print(f"Installed in {store.models_dir}:")
        _print_table([_row(manifest, store.state(manifest)) for manifest in installed])
    else:
        print(f"No models installed in {store.models_dir}.")
    names = {manifest.name for manifest in installed}
    available = [manifest for name, manifest in catalog().items() if name not in names]
    if available:
        print(f"\nIn the catalog (offline: add --from {USB_WHEELHOUSE}):")
        _print_table([_row(manifest, f"parrot-edge models pull {manifest.name}") for manifest in available])
    return 0


def add_command(args) -> int:
    store = _store()
    manifest = store.add(args.path, args.name)
    checked = "matches its manifest" if manifest_path_for(Path(args.path)).is_file() else "recorded in a new manifest"
    print(f"Added {manifest.name}: {manifest.size / 1e6:,.1f} MB, {manifest.quant}, "
          f"license {manifest.license or 'unknown'}; sha256 {manifest.sha256[:12]}… {checked}.")
    print(f"Serve it with: parrot-edge serve --model {manifest.name}")
    return 0


def pull_command(args) -> int:
    store = _store()
    if args.if_missing and store.get(args.name) is not None:
        print(f"{args.name} is already installed.")
        return 0
    manifest = store.pull(args.name, args.wheelhouse, progress=lambda message: print(message, flush=True))
    print(f"Installed {manifest.name}: sha256 verified, {manifest.size / 1e6:,.1f} MB, {manifest.quant}, "
          f"license {manifest.license or 'unknown'}.")
    return 0


def verify_command(args) -> int:
    store = _store()
    failures = checked = 0
    for result in store.verify(args.name):
        checked += 1
        if result.problem is None:
            print(f"OK      {result.name}", flush=True)
        else:
            failures += 1
            print(f"FAILED  {result.name}: {result.problem}", flush=True)
    if not checked:
        print(f"No models installed in {store.models_dir}.")
    elif failures:
        print(f"{failures} of {checked} model(s) failed verification.", file=sys.stderr)
    return 1 if failures else 0


def remove_command(args) -> int:
    manifest = _store().remove(args.name)
    print(f"Removed {manifest.name} ({manifest.size / 1e6:,.1f} MB freed).")
    return 0
