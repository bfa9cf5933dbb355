"""A slot: one student's place in the engine, a llama.cpp sequence and the request using it, if any."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parrot_edge.engine.sequence import Sequence

if TYPE_CHECKING:
    from parrot_edge.engine.requests import Generation


@dataclass
class Slot:
    sequence: Sequence  # its cells, and what they hold (kept after a request ends: the next turn reuses it)
    generation: Generation | None = None
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next (prompt rest, or the last sample)
    sampler: object = None
    last_used: float = 0.0
    lender: tuple[int, int] | None = None  # (slot, tokens) this prompt will borrow once that slot has them

    @property
    def seq_id(self) -> int:
        return self.sequence.seq_id

    @property
    def prefilling(self) -> bool:
        """Reading its prompt (or a resumed answer's cells that were not kept): no token sampled in this slot."""
        return self.generation is not None and self.generation.reading

    @property
    def answering(self) -> bool:
        return self.generation is not None and not self.generation.reading
