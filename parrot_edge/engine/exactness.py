"""Exactness: an answer is the same alone or in a full classroom, from the cache or evaluated cold.

llama.cpp's CPU flash attention computes every query row on its own, so a token's logits and K/V come out
bit-identical whatever batch, chunk or company it is evaluated in, except on two faster kernels that round
differently (ggml-cpu ops.cpp, measured in tests/test_exactness.py):

  * a tiled one, for SEQ_ROWS + 1 = 64 or more rows of one sequence in a micro-batch: an engine step holds at
    most SEQ_ROWS rows of a sequence (a prompt piece of SEQ_ROWS - 1, plus room for one companion row);
  * a split one, for a micro-batch of a single row over more than SPLIT_KV_CELLS cells. llama.cpp splits a
    batch into micro-batches itself (`lone_long_rows` predicts how), so the engine shapes each step's work:
    a sequence that would be such a lone row is joined to the others through an idle neighbour slot (whose
    last cached token is evaluated again, to the same values), or else gets a second row: a guess of its next
    token, looked up in its own conversation (kept if the first row's logits sample it, which then yields two
    tokens in one step), or its own last cached token, evaluated again.

Both run only where keys and values are both F16 (kv_cache.py): with the default cache (f16 keys, bf16 values)
or a q8_0 one, every row takes the row-by-row kernel in any batch, so neither rule is needed: a student alone
is never given a companion row (`StepShaper(pair_lone_rows=False)`; tests/test_exactness.py checks it), while
the 63-row limit stays (not needed there; a prompt row cost 6.2-7.3 ms in pieces of 16 to 60 rows at 1.1B).

K- and i-quant weights have two more such kernels, kept off by parrot_edge.llamacpp. And because the cells
a slot keeps are bit-identical to a cold evaluation of the same conversation, reusing them never changes
an answer.

Joining runs is the same trick for speed: llama.cpp runs one micro-batch per run of consecutive sequence
ids, each costing about as much as three rows, so short gaps of idle slots between answering students are
filled with those slots' last tokens, evaluated again.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parrot_edge.engine.requests import EngineStats
    from parrot_edge.engine.slot import Slot

SEQ_ROWS = 63  # rows of one sequence in one step, at most: the tiled kernel starts at 64
SPLIT_KV_CELLS = 256  # a lone row over more cells than this takes the split kernel (llama.cpp pads n_kv to 256)
MAX_GAP_FILL = 2  # idle slots worth evaluating again to join two runs of answering students

Work = dict[int, list[int]]  # sequence id → the tokens it evaluates this step


def lone_long_rows(plan: dict[int, tuple[int, int]], ubatch_rows: int) -> list[int]:
    """The sequences llama.cpp would evaluate as a micro-batch of one row over more than SPLIT_KV_CELLS cells.

    `plan` maps each sequence in the batch to (cells it holds before the step, rows it adds). This follows
    llama.cpp's split of a batch for a cache with a stream per sequence (`split_equal`, sequential): each
    micro-batch takes the run of consecutive sequence ids starting at the lowest with rows left, and the
    same number of rows from each, as many as the shortest has left and the micro-batch holds."""
    cells = {seq_id: held for seq_id, (held, _) in plan.items()}
    left = {seq_id: rows for seq_id, (_, rows) in plan.items() if rows}
    lone = []
    while left:
        run: list[int] = []
        for seq_id in sorted(left):
            if run and seq_id != run[-1] + 1:
                break
            run.append(seq_id)
        take = min(min(left[seq_id] for seq_id in run), max(1, ubatch_rows // len(run)))
        for seq_id in run:
            cells[seq_id] += take
            left[seq_id] -= take
            if not left[seq_id]:
                del left[seq_id]
        if len(run) == 1 and take == 1 and cells[run[0]] > SPLIT_KV_CELLS:
            lone.append(run[0])
    return lone


def guess_next(tokens: list[int], last: int) -> int | None:
    """The token that followed the latest earlier occurrence of the pair (tokens[-1], last), if any."""
    if not tokens:
        return None
    before = tokens[-1]
    for i in range(len(tokens) - 1, 0, -1):
        if tokens[i] == last and tokens[i - 1] == before:
            return tokens[i + 1] if i + 1 < len(tokens) else last
    return None


class StepShaper:
    """Shapes one step's work by the rules above, before it goes into the batch."""

    def __init__(self, slots: list[Slot], ubatch_rows: int, ctx_per_slot: int, stats: EngineStats,
                 pair_lone_rows: bool = True):
        self.slots = slots
        self.ubatch_rows = ubatch_rows
        self.ctx_per_slot = ctx_per_slot
        self.stats = stats
        self.pair_lone_rows = pair_lone_rows  # False where no row can take the split kernel

    def shape(self, work: Work) -> dict[int, int]:
        """Join runs and keep attention exact; returns sequence → the token guessed to follow its sampled one."""
        self._join_runs(work)
        guesses: dict[int, int] = {}
        if self.pair_lone_rows:
            self._keep_attention_exact(work, guesses)
        return guesses

    def _join_runs(self, work: Work) -> None:
        """In a step of next tokens only, fill short gaps of idle slots between answering students."""
        if len(work) < 2 or any(len(tokens) != 1 for tokens in work.values()):
            return
        for before, after in itertools.pairwise(sorted(work)):
            gap = self.slots[before + 1:after]
            if 0 < len(gap) <= MAX_GAP_FILL and all(slot.generation is None and slot.sequence.tokens
                                                    for slot in gap):
                for slot in gap:
                    if self._evaluate_again(slot, work):
                        self.stats.bridges += 1

    def _keep_attention_exact(self, work: Work, guesses: dict[int, int]) -> None:
        """Keep any sequence from being a lone row over many cells: joined through an idle neighbour, or given a
        second row (a guess, or its last cached token again). A prompt piece with no room for one more row gives
        its last row back to the next step instead."""
        for _ in range(2 * len(self.slots)):
            lone = lone_long_rows({seq_id: (len(self.slots[seq_id].sequence.tokens), len(tokens))
                                   for seq_id, tokens in work.items()}, self.ubatch_rows)
            if not lone:
                return
            slot = self.slots[lone[0]]
            if len(work[slot.seq_id]) >= SEQ_ROWS:
                slot.pending.insert(0, work[slot.seq_id].pop())
            elif bridge := self._bridge(slot.seq_id, work):
                if not self._evaluate_again(bridge, work):
                    return
                self.stats.bridges += 1
            elif not (self._guess_ahead(slot, work, guesses) or self._evaluate_again(slot, work)):
                return

    def _guess_ahead(self, slot: Slot, work: Work, guesses: dict[int, int]) -> bool:
        """Make a generating sequence's companion row useful: its likely next token. Sampled from the first row's
        logits, the guess is either right, and the second row's logits give the token after it (two tokens for
        one step, sampled in the same order from the same values as one by one), or wrong, and its cell is taken
        back. Either way the step costs what the companion would have."""
        tokens = work[slot.seq_id]
        if (not slot.answering or len(tokens) != 1
                or len(slot.sequence.tokens) + 2 >= self.ctx_per_slot):  # at the context's end, one by one ends sooner
            return False
        guess = guess_next(slot.sequence.tokens, tokens[0])
        if guess is None:
            return False
        tokens.append(guess)
        guesses[slot.seq_id] = guess
        self.stats.guessed_rows += 1
        return True

    def _bridge(self, seq_id: int, work: Work) -> Slot | None:
        """An idle neighbour holding tokens, with a working sequence beyond it."""
        for side in (1, -1):
            neighbour, beyond = seq_id + side, seq_id + 2 * side
            if (0 <= neighbour < len(self.slots) and neighbour not in work and beyond in work
                    and self.slots[neighbour].generation is None and self.slots[neighbour].sequence.tokens):
                return self.slots[neighbour]
        return None

    def _evaluate_again(self, slot: Slot, work: Work) -> bool:
        token = slot.sequence.drop_last()
        if token is None:
            return False
        work[slot.seq_id] = [token, *work.get(slot.seq_id, [])]
        self.stats.reevaluated_tokens += 1
        return True
