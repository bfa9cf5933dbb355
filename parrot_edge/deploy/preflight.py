"""The checks before serving, in one place: `serve` makes them before it opens a port, `doctor` shows them.

Order matters for a school machine: refuse an unsafe bind, a missing or corrupt model, a CPU this build of
llama.cpp cannot run on, or a plan that does not fit in memory (the shelf counted, as `serve` allocates
it), each with a message saying what to do, before a single port is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from parrot_edge.deploy.cpu_probe import probe_llama_cpp
from parrot_edge.engine.memory import MemoryPlan, plan_memory, read_model_shape
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.settings import Settings, is_loopback
from parrot_edge.store.model_store import ModelStore, ResolvedModel


@dataclass(frozen=True)
class Check:
    label: str
    ok: bool
    lines: tuple[str, ...]  # what it found, or why it failed


@dataclass(frozen=True)
class Ready:
    """Everything `serve` needs once the checks passed."""

    model: ResolvedModel
    plan: MemoryPlan
    shelf_bytes: int


def check_all(settings: Settings, *, stop_at_failure: bool = False) -> tuple[list[Check], Ready | None]:
    """Run the checks in order; (every check made, Ready if all passed)."""
    checks: list[Check] = []

    def attempt(label: str, check: Callable[[], tuple[Any, tuple[str, ...]]]) -> Any:
        if stop_at_failure and checks and not checks[-1].ok:
            return None
        try:
            value, lines = check()
        except ParrotEdgeError as exc:
            checks.append(Check(label, False, (str(exc),)))
            return None
        checks.append(Check(label, True, lines))
        return value

    shelf_bytes = settings.shelf_mb * 2**20
    attempt("Bind", lambda: _bind(settings))
    model = attempt("Model", lambda: _model(settings))
    attempt("llama.cpp", _llama_cpp)
    plan = attempt("Plan", lambda: _plan(settings, model, shelf_bytes)) if model else None
    ready = Ready(model, plan, shelf_bytes) if all(check.ok for check in checks) and plan else None
    return checks, ready


def preflight(settings: Settings) -> Ready:
    """What `serve` runs before binding: Ready, or the first failure as a ParrotEdgeError."""
    checks, ready = check_all(settings, stop_at_failure=True)
    if ready is None:
        raise ParrotEdgeError(next(check for check in checks if not check.ok).lines[0])
    return ready


def _bind(settings: Settings) -> tuple[None, tuple[str, ...]]:
    if is_loopback(settings.host):
        return None, (f"{settings.host}:{settings.port}, this computer only",)
    if not settings.resolved_api_key():
        raise ParrotEdgeError(
            f"refusing to listen on {settings.host} without an API key: anyone on the network could use it. "
            "Set PARROT_EDGE_API_KEY (or api_key_file in the settings), or keep the default 127.0.0.1.")
    return None, (f"{settings.host}:{settings.port}, with an API key",)


def _model(settings: Settings) -> tuple[ResolvedModel, tuple[str, ...]]:
    model = ModelStore(settings.models_dir).resolve(settings.model)
    return model, (f"{model.name}: {model.path} (structure and sha256 checked)",)


def _llama_cpp() -> tuple[None, tuple[str, ...]]:
    probe = probe_llama_cpp()
    if not probe.ok:
        raise ParrotEdgeError(probe.message)
    return None, ("OK: " + probe.message, *filter(None, [probe.system_info]))


def _plan(settings: Settings, model: ResolvedModel, shelf_bytes: int) -> tuple[MemoryPlan, tuple[str, ...]]:
    plan = plan_memory(read_model_shape(model.path), slots=settings.slots, ctx_per_slot=settings.ctx_per_slot,
                       shelf=shelf_bytes, kv_type=settings.kv_cache_type)
    return plan, (f"{model.name}: {plan.summary()}",)
