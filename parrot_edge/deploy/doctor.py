"""`parrot-edge doctor`: can this machine serve models, and if not, what to do about it.

Everything a technician setting up a classroom machine needs on one screen: the CPU and the features
llama.cpp's kernels use, memory, disk, the model store, whether this build of llama.cpp runs here (asked
in a child process, see parrot_edge.deploy.cpu_probe) and the memory plan for the model `serve` would load.
Exits non-zero when something needs fixing first.
"""

from __future__ import annotations

import shutil

from parrot_edge.deploy.cpu_probe import cpu_info
from parrot_edge.deploy.preflight import check_all
from parrot_edge.engine.memory import available_memory, meminfo
from parrot_edge.settings import load_settings
from parrot_edge.store.model_store import DEFAULT_MODEL, ModelStore


def _show(label: str, *lines: str) -> None:
    for index, line in enumerate(lines):
        print(f"{label if index == 0 else '':<11}{line}")


def doctor_command(args) -> int:
    settings = load_settings()
    problems: list[str] = []

    cpu = cpu_info()
    _show("CPU", f"{cpu.model} ({cpu.arch}, {cpu.logical_cores} logical cores)", cpu.feature_summary())
    _show("Memory", f"{meminfo()['MemTotal'] / 1e6:,.0f} MB total, {available_memory() / 1e6:,.0f} MB available")
    existing = next(path for path in [settings.data_dir, *settings.data_dir.parents] if path.exists())  # may be new
    _show("Disk", f"{shutil.disk_usage(existing).free / 1e6:,.0f} MB free at {existing}")

    store = ModelStore(settings.models_dir)
    installed = store.list()
    rows = [f"{m.name}{' (default)' if m.name == DEFAULT_MODEL else ''}: {m.size / 1e6:,.1f} MB, {m.quant}, "
            f"{store.state(m)}" for m in installed]
    _show("Models", str(settings.models_dir), *(rows or ["none installed"]))
    problems += [f"model {m.name}: {damage}" for m in installed if (damage := store.damage(m))]

    checks, _ = check_all(settings)  # the very checks `serve` makes before it binds
    for check in checks:
        if check.ok:
            _show(check.label, *check.lines)
        else:
            one_line = "\n" not in check.lines[0]
            _show(check.label, f"FAILED: {check.lines[0]}" if one_line else "FAILED (see below)")
            problems.append(check.lines[0])

    print()
    if problems:
        print(f"{len(problems)} problem(s) to fix before `parrot-edge serve`:")
        for problem in problems:
            print("  - " + problem.replace("\n", "\n    "))
        return 1
    print("Ready: parrot-edge serve")
    return 0
