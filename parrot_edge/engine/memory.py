"""Will this model fit? The memory llama.cpp needs to serve a GGUF, against what this machine has.

The server checks the plan before loading a model, and the batching engine takes its default number of
slots (students served at once) from it. The estimate, in bytes, for the engine's context (see
parrot_edge.engine.context.context_params: flash attention, micro-batches of at most 256 rows):

  weights   = the GGUF's size             llama.cpp maps the file (reads it, when it repacks the weights:
                                          llamacpp.load_model), and every decode step reads all of it
  kv_cache  = n_layer × slots × ctx_per_slot × (k_dim + v_dim) × 2 × scale   every cell; scale 1 for 16-bit
                                          keys and values, 34/64 for q8_0 (kv_cache.py)
  overhead  = activations + attention + logits + margin + shelf
    activations = ubatch × (12·n_embd + 2·n_ff) × 4     what a full micro-batch touches of llama.cpp's
                                                        compute buffer
    attention   = 2 × ubatch × ctx_per_slot × 4         the attention mask, in f32 and f16 (flash
                                                        attention keeps no score matrix)
    logits      = 2 × 4 × slots × n_vocab × 4           the most rows a step asks logits for (OUTPUTS_PER_SLOT
                                                        per student), computed and copied out
    margin      = 16 MB + n_vocab × 512                 tokenizer tables, graph and thread-pool allocations
    shelf       = settings.shelf_mb                     conversations put aside when their slot is reused

llama.cpp sizes its buffers for logits by the most rows a batch may ask for, which the engine sets
(n_outputs_max) to what its steps ask at most.
Measured with the default model, contexts filled (a row of logits per slot and step, as in the test), the
estimate is 6-20% above the real growth of resident memory (8 slots × 256 tokens: 210 MB planned, 176 MB real;
8 × 2048: 544 MB planned, 510 MB real; 4 × 4096: 542 MB planned, 509 MB real); tests/test_memory.py checks this
on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from parrot_edge.engine.context import OUTPUTS_PER_SLOT, UBATCH_ROWS
from parrot_edge.engine.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.store.gguf_check import StringArray, read_header

DEFAULT_SLOTS = 8
DEFAULT_CTX_PER_SLOT = 2048
USABLE_FRACTION = 0.85  # leave the rest to the OS, the server itself and the desktop
CTX_STEP = 256  # llama.cpp rounds context sizes up to this
SMALLER_QUANTS = "Q4_0 or Q4_K_M instead of Q8_0 or F16"


@dataclass(frozen=True)
class ModelShape:
    path: Path
    file_size: int
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    kv_bytes_per_token: int  # f16 keys and values of one token, all layers: n_layer × (k_dim + v_dim) × 2


@dataclass(frozen=True)
class MemoryPlan:
    slots: int
    ctx_per_slot: int
    weights: int
    kv_cache: int
    overhead: int
    total: int
    available: int

    def summary(self) -> str:
        return (f"{_slots(self.slots)} × {self.ctx_per_slot} tokens: weights "
                f"{self.weights / 1e6:,.0f} MB + KV cache {self.kv_cache / 1e6:,.0f} MB + overhead "
                f"{self.overhead / 1e6:,.0f} MB = {self.total / 1e6:,.0f} MB, of {self.available / 1e6:,.0f} MB "
                "available")


def read_model_shape(path: Path) -> ModelShape:
    """The shape of a model, from its GGUF header (no weights are read)."""
    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not arch:
        raise ParrotEdgeError(f"{path}: its metadata has no general.architecture, so its memory cannot be estimated")

    def number(key: str, default: int | list[int] | None = None) -> int | list[int]:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ParrotEdgeError(f"{path}: its metadata has no {arch}.{key}, so its memory cannot be estimated")
        return value

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    n_head = max(n_head) if isinstance(n_head, list) else n_head  # per-layer counts in some architectures
    n_head_kv = number("attention.head_count_kv", n_head)
    heads_kv = n_head_kv if isinstance(n_head_kv, list) else [n_head_kv] * n_layer
    key_length = number("attention.key_length", n_embd // n_head)
    value_length = number("attention.value_length", n_embd // n_head)
    n_ff = number("feed_forward_length", 4 * n_embd)
    tokens = meta.get("tokenizer.ggml.tokens", StringArray(0))
    return ModelShape(
        path=Path(path),
        file_size=header.file_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=max(n_ff) if isinstance(n_ff, list) else n_ff,
        n_vocab=meta.get(f"{arch}.vocab_size") or tokens.length,
        n_ctx_train=number("context_length"),
        kv_bytes_per_token=sum(heads_kv) * (key_length + value_length) * 2,
    )


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes: MemTotal, MemAvailable, …"""
    with open("/proc/meminfo") as lines:
        fields = (line.split(":", 1) for line in lines)
        return {key: int(value.split()[0]) * (1024 if value.strip().endswith("kB") else 1) for key, value in fields}


def available_memory() -> int:
    """Bytes this process can still take: MemAvailable, lowered by a cgroup v2 memory limit if there is one."""
    available = meminfo()["MemAvailable"]
    headroom = cgroup_headroom(_own_cgroup(), Path("/sys/fs/cgroup"))
    return available if headroom is None else min(available, headroom)


def _own_cgroup() -> Path:
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            if line.startswith("0::"):  # the cgroup v2 entry
                return Path("/sys/fs/cgroup") / line[3:].strip().lstrip("/")
    return Path("/sys/fs/cgroup")


def cgroup_headroom(cgroup: Path, root: Path) -> int | None:
    """Bytes left under the tightest memory.max from `cgroup` up to `root`, or None when nothing is limited."""
    tightest = None
    for directory in [cgroup, *cgroup.parents]:
        try:
            limit = (directory / "memory.max").read_text().strip()
            current = int((directory / "memory.current").read_text())
        except (OSError, ValueError):
            limit = "max"
        if limit != "max":
            headroom = max(0, int(limit) - current)
            tightest = headroom if tightest is None else min(tightest, headroom)
        if directory == root:
            break
    return tightest


def plan_memory(info: ModelShape, slots: int | None = None, ctx_per_slot: int | None = None,
                available: int | None = None, shelf: int = 0, kv_type: str = DEFAULT_KV_TYPE) -> MemoryPlan:
    """The memory plan for serving `info`; unset slots become the most (8 down to 1) that fit.

    Raises a ParrotEdgeError with the numbers and what to change when even the smallest plan does not fit.
    """
    ctx = ctx_per_slot or min(DEFAULT_CTX_PER_SLOT, info.n_ctx_train)
    if ctx > info.n_ctx_train:
        raise ParrotEdgeError(f"a context of {ctx} tokens per slot is more than {info.path.name} was trained "
                              f"for ({info.n_ctx_train}); use --ctx {info.n_ctx_train} or less")
    available = available_memory() if available is None else available
    budget = int(available * USABLE_FRACTION)
    for n in [slots] if slots else range(DEFAULT_SLOTS, 0, -1):
        plan = _plan(info, n, ctx, available, shelf, kv_type)
        if plan.total <= budget:
            return plan
    raise ParrotEdgeError(_does_not_fit(info, plan, budget, shelf, kv_type))


def _plan(info: ModelShape, slots: int, ctx: int, available: int, shelf: int, kv_type: str) -> MemoryPlan:
    kv_cache = round(slots * ctx * info.kv_bytes_per_token * KV_TYPES[kv_type].scale)
    activations = UBATCH_ROWS * (12 * info.n_embd + 2 * info.n_ff) * 4
    attention = 2 * UBATCH_ROWS * ctx * 4
    logits = 2 * OUTPUTS_PER_SLOT * slots * info.n_vocab * 4
    margin = 16_000_000 + info.n_vocab * 512
    overhead = activations + attention + logits + margin + shelf
    return MemoryPlan(slots, ctx, info.file_size, kv_cache, overhead, info.file_size + kv_cache + overhead,
                      available)


def _does_not_fit(info: ModelShape, plan: MemoryPlan, budget: int, shelf: int, kv_type: str) -> str:
    message = (f"not enough memory for {info.path.name}: {_slots(plan.slots)} × {plan.ctx_per_slot} tokens "
               f"need {plan.total / 1e6:,.0f} MB (weights {plan.weights / 1e6:,.0f} MB + KV cache "
               f"{plan.kv_cache / 1e6:,.0f} MB + overhead {plan.overhead / 1e6:,.0f} MB), but only "
               f"{budget / 1e6:,.0f} MB may be used ({USABLE_FRACTION:.0%} of {plan.available / 1e6:,.0f} MB "
               "available)")

    def fits(slots: int, ctx: int) -> bool:
        return _plan(info, slots, ctx, plan.available, shelf, kv_type).total <= budget

    if not fits(1, CTX_STEP):
        return (message + ". The model alone does not fit: close other programs, or use a smaller "
                f"quantisation of it (e.g. {SMALLER_QUANTS}).")
    fitting_ctx = max((c for c in range(CTX_STEP, plan.ctx_per_slot, CTX_STEP) if fits(plan.slots, c)), default=0)
    fitting_slots = max((n for n in range(1, plan.slots) if fits(n, plan.ctx_per_slot)), default=0)
    tips = [f"a smaller context (--ctx {fitting_ctx} fits {_slots(plan.slots)})"] if fitting_ctx >= CTX_STEP else []
    if fitting_slots:
        tips.append(f"fewer slots (--slots {fitting_slots})")
    tips.append(f"a smaller quantisation of the model (e.g. {SMALLER_QUANTS})")
    return message + ". Try " + "; ".join(tips[:-1]) + ("; or " if len(tips) > 1 else "") + tips[-1] + "."


def _slots(n: int) -> str:
    return f"{n} slot" if n == 1 else f"{n} slots"
