"""What goes into the engine and what comes out: requests, their events, their refusals, and its counters."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from parrot_edge.engine.sampling import SamplingParams
from parrot_edge.engine.textstream import TextStream
from parrot_edge.errors import ParrotEdgeError


class QueueFull(ParrotEdgeError):
    def __init__(self, retry_after: int):
        super().__init__("every slot is busy and the queue is full; retry shortly")
        self.retry_after = retry_after


class PromptTooLong(ParrotEdgeError):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens but the context holds {limit} per request; "
                         "shorten the conversation")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class Standing(enum.IntEnum):
    """How a request's client behaved lately (parrot_edge.api.fairness keeps the score): better first."""
    GOOD = 0
    NOTICED = 1  # left an answer or was refused lately: among equal claims it yields to a client in good standing
    BAD = 2  # misbehaved again and again: it waits behind the others, from spare room only, and is paused for them


@dataclass
class Request:
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    deadline: float = float("inf")  # time.monotonic() by which the request must be finished
    client: str = ""  # who asks (see parrot_edge.api.fairness): cache hits are reported only on its own cache
    standing: Standing = Standing.GOOD  # its client's, when it was submitted


@dataclass
class Delta:
    """Text the client may now see (may be empty when a token completed no character)."""

    text: str


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "timeout" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens not evaluated that came from this client's own conversations
    reused_tokens: int  # prompt tokens not evaluated, whoever's cache they came from (for /metrics only)
    queued_ms: float
    prompt_ms: float  # admission → first token
    decode_ms: float  # first token → end
    error: str | None = None

    @property
    def decode_tokens_per_second(self) -> float:
        if self.completion_tokens < 2 or not self.decode_ms:
            return 0.0
        return (self.completion_tokens - 1) / (self.decode_ms / 1000)


class Generation:
    """A request in the engine; the asyncio side reads `events` and may `Engine.cancel()` it at any time."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.events: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        self.loop = loop
        self.cancelled = False
        self.submitted = time.monotonic()
        self.admitted = 0.0
        self.first_token = 0.0
        self.reading = True  # no token sampled since it took its slot: reading its prompt (or, resumed, the rest)
        self.paused: list[int] | None = None  # paused for a stronger claim: what its cells held, to go on from
        # (until it samples again)
        self.sampler = None  # its sampler chain while paused: it goes on where it stopped, random state included
        self.completion_tokens = 0
        self.reused_tokens = 0  # prompt tokens taken from a cache instead of evaluated
        self.reused_own = True  # ... and that cache held this client's own conversation
        self.text_stream = TextStream(request.stop)
        self.admitted_event = asyncio.Event()  # set (on the asyncio side) once it has left the queue: admitted
        # (then `admitted` is its time) or ended there (then its Finished is in `events`)

    @property
    def context_tokens(self) -> list[int]:
        """What its slot's cells must hold before it can go on: the prompt, or once paused the answer too."""
        return self.paused if self.paused is not None else self.request.prompt

    @property
    def cached_tokens(self) -> int:
        """Cache hits as the client is told of them: only those on its own conversations, so that nobody can
        learn from a fast answer's figures what another student's conversation holds."""
        return self.reused_tokens if self.reused_own else 0

    def outcome(self, reason: str, error: str | None = None) -> Finished:
        """The Finished event that ends this generation now, with its figures."""
        now = time.monotonic()
        first = self.first_token or now
        admitted = self.admitted or now
        return Finished(reason=reason, prompt_tokens=len(self.request.prompt),
                        completion_tokens=self.completion_tokens, cached_tokens=self.cached_tokens,
                        reused_tokens=self.reused_tokens,
                        queued_ms=(admitted - self.submitted) * 1000, prompt_ms=(first - admitted) * 1000,
                        decode_ms=(now - first) * 1000 if self.first_token else 0.0, error=error)


@dataclass
class EngineStats:
    """Counters since start (shown in /metrics)."""

    steps: int = 0  # llama_decode calls
    decode_errors: int = 0
    isolated_steps: int = 0  # steps of one sequence alone, after a failed step, to find which one failed
    throwaway_rows: int = 0  # rows evaluated only to fill a group of 4 for repacked weights (padding.py)
    cell_mismatches: int = 0  # steps after which a slot's tokens did not match its cells (Engine.verify_cells)
    reevaluated_tokens: int = 0  # cached tokens evaluated again, to the same values (exactness, joined runs)
    bridges: int = 0  # of those, idle slots that joined runs of working sequences
    guessed_rows: int = 0  # companion rows that were a guess of the next token
    guessed_tokens: int = 0  # guesses that were right
    borrowed_tokens: int = 0  # prompt tokens copied from another slot
    shelved: int = 0
    unshelved: int = 0
    paused: int = 0  # answers paused to give their slot to a fairer claim (scheduler.py), then resumed


@dataclass(frozen=True)
class EngineState:
    """The engine at one moment (for /health and /metrics)."""

    slots_total: int
    slots_busy: int
    queue_depth: int
    queue_size: int
    ctx_per_slot: int
    stats: EngineStats
    batch_sizes: dict[int, int]  # rows per llama_decode call → how many calls
    worker_alive: bool
    stalled_seconds: float  # while there is work: time since the worker last made progress (else 0)
