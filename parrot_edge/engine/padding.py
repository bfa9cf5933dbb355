"""Exact batching with llama.cpp's repacked weights, which are 20-40% faster for Q4_K_M models at 1.1B.

On x86, ggml-cpu repacks Q4_K (and Q2_K) weights into 8-row interleaved blocks (repack.cpp). A matrix
multiplication over a micro-batch of `n` rows then sends rows [0, n - n % 4) through a 4-row gemm kernel and
the last n % 4 rows through a 1-row gemv kernel, and the two sum a 256-value block in a different float order
(gemv: one multiply-add per block; gemm: one per 64-value sub-block). A row's result therefore depends on its
place in its micro-batch: an answer would change with its company. Both kernels compute each row on its own,
neighbours never enter, and threads split only the output columns (measured: a row's gemm result is the
same beside any 3 others, at 1 and 2 threads). So the rule that makes every row take the same path:

  every micro-batch holds a multiple of 4 rows, and so do the rows in it that ask for logits (llama.cpp cuts
  the last layer's feed-forward block down to those rows, which makes it a multiplication of its own).

The steps are shaped for it. A step either gives every answering student its next token, or reads prompt
pieces, never both (alternating while both are wanted):

  * an answering step is one run of consecutive slots, one row each: gaps and the ends are filled with
    throwaway rows of other slots until the run is a multiple of 4 (a throwaway row is a token evaluated at
    the slot's next position and removed right after; it changes no cell before it, since attention is
    causal); where there are no more slots, every row gets throwaway followers instead; every row asks for
    logits;
  * a prompt step gives each chosen prompt a piece of the same length L (a multiple of 4, at most
    MAX_PIECE), its tail padded with throwaway rows; a piece that ends its prompt asks for logits on 4 of its
    rows, its last real one among them (4, not all L: llama.cpp's buffers for logits are sized by the most
    rows a step asks for, OUTPUTS_PER_SLOT per slot). llama.cpp's split (split_equal) then makes
    micro-batches of whole pieces.

Every micro-batch then has at least 4 rows, so the lone-row rule of exactness.py never comes up, and no
guesses are made. The cold reference is the same engine alone, shaped the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parrot_edge.engine.requests import EngineStats
    from parrot_edge.engine.slot import Slot

ROW_GROUP = 4  # the gemm kernel's rows
MAX_PIECE = 60  # prompt rows of one sequence per step: a multiple of ROW_GROUP below the tiled kernel's 64
FILLER_TOKEN = 0  # what a throwaway row evaluates: any token will do, it is removed after the step

Work = dict[int, list[int]]


@dataclass
class Shape:
    """How a step's work is laid out beyond its tokens (the default rules fill only `guesses`)."""

    guesses: dict[int, int] = field(default_factory=dict)  # sequence → the token guessed to follow its sample
    throwaway: dict[int, int] = field(default_factory=dict)  # sequence → trailing rows removed after the step
    logit_rows: dict[int, range] = field(default_factory=dict)  # sequence → its rows (of this step) asking for logits

    def sample_row(self, seq_id: int, rows: int) -> int:
        """The row (within the sequence's rows of this step) whose logits give its next token: its last real
        one, or the one before a guess."""
        return rows - 1 - self.throwaway.get(seq_id, 0) - (seq_id in self.guesses)


class PaddedSteps:
    """Chooses and shapes each step's work by the rule above."""

    def __init__(self, slots: list[Slot], ubatch_rows: int, prefill_chunk: int, stats: EngineStats):
        self.slots = slots
        self.max_rows = min(ubatch_rows, prefill_chunk)
        self.stats = stats
        self._answered_last = False

    def select(self, only: set[int] | None = None) -> tuple[Work, Shape]:
        """This step's work, from the slots in `only` if given (after a failed step: one at a time)."""
        def allowed(slot: Slot) -> bool:
            return only is None or slot.seq_id in only

        answering = [s for s in self.slots if s.answering and s.pending and allowed(s)]
        prompts = sorted((s for s in self.slots if s.prefilling and s.lender is None and s.pending and allowed(s)),
                         key=lambda s: s.generation.admitted)
        if answering and not (prompts and self._answered_last):
            self._answered_last = True
            return self._answers(answering)
        self._answered_last = False
        return self._prompts(prompts) if prompts else ({}, Shape())

    def _answers(self, answering: list[Slot]) -> tuple[Work, Shape]:
        work: Work = {}
        shape = Shape()
        for slot in answering:
            work[slot.seq_id], slot.pending = slot.pending, []
        low, high = min(work), max(work)
        while (high - low + 1) % ROW_GROUP and (high + 1 < len(self.slots) or low > 0):
            if high + 1 < len(self.slots):
                high += 1
            else:
                low -= 1
        for seq_id in range(low, high + 1):
            if seq_id not in work:
                self._throwaway(seq_id, work, shape, 1)
        span = high - low + 1
        followers = ROW_GROUP // math.gcd(span, ROW_GROUP) - 1  # with every slot in the run and still short
        for seq_id in range(low, high + 1):
            if followers:
                self._throwaway(seq_id, work, shape, followers)
            shape.logit_rows[seq_id] = range(len(work[seq_id]))
        return work, shape

    def _prompts(self, prompts: list[Slot]) -> tuple[Work, Shape]:
        first = prompts[0]
        piece = min(MAX_PIECE, _round_up(len(first.pending)), self.max_rows // ROW_GROUP * ROW_GROUP)
        work: Work = {}
        shape = Shape()
        for slot in prompts[:self.max_rows // piece]:
            real = min(piece, len(slot.pending))
            work[slot.seq_id] = slot.pending[:real]
            del slot.pending[:real]
            if real < piece:
                self._throwaway(slot.seq_id, work, shape, piece - real)
            if not slot.pending:  # the prompt's last row: its logits start the answer, asked with 3 neighbours
                start = min(real - 1, piece - ROW_GROUP)
                shape.logit_rows[slot.seq_id] = range(start, start + ROW_GROUP)
        return work, shape

    def _throwaway(self, seq_id: int, work: Work, shape: Shape, rows: int) -> None:
        work.setdefault(seq_id, []).extend([FILLER_TOKEN] * rows)
        shape.throwaway[seq_id] = shape.throwaway.get(seq_id, 0) + rows
        self.stats.throwaway_rows += rows


def _round_up(rows: int) -> int:
    return -(-rows // ROW_GROUP) * ROW_GROUP
