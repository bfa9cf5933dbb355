"""Evaluating less: a new request reuses every token some cache already holds.

A student's next turn re-sends the whole conversation. It goes to the free slot sharing the longest prefix
with it, or gets its conversation back from the shelf, and only the rest is evaluated. Before a slot's
conversation is overwritten, it is shelved for whoever continues it. And a prompt that opens like another
slot's conversation (every student's chat starts with the same system prompt) borrows those cells: a copy
of the other sequence's state, cut to the shared part, waiting a step or two if the other slot is still
evaluating it. A burst of students costs one system prompt, not one each.
"""

from __future__ import annotations

from parrot_edge.engine.requests import EngineStats
from parrot_edge.engine.shelf import Shelf, common_prefix
from parrot_edge.engine.slot import Slot

SHELVE_MIN_TOKENS = 32  # shorter conversations cost less to evaluate again than to keep
BORROW_MIN_TOKENS = 16  # fewer shared tokens than this are cheaper to evaluate than to wait for and copy


class Reuse:
    def __init__(self, slots: list[Slot], shelf: Shelf, stats: EngineStats):
        self.slots = slots
        self.shelf = shelf
        self.stats = stats

    def choose_slot(self, free: list[Slot], prompt: list[int]) -> Slot:
        # Longest shared prefix first; among equals, the least recently used, to keep other caches warm.
        return max(free, key=lambda slot: (common_prefix(slot.sequence.tokens, prompt), -slot.last_used))

    def prepare(self, slot: Slot) -> None:
        """Fill a newly assigned slot with the best cache for its prompt (its own, or the shelf's), set what
        remains to evaluate, and note on the generation how much was reused and from whose conversation."""
        generation = slot.generation
        prompt = generation.context_tokens
        sequence = slot.sequence
        shared = common_prefix(sequence.tokens, prompt)
        if len(sequence.tokens) > max(shared, SHELVE_MIN_TOKENS):
            self._shelve(slot)  # what this request would overwrite stays available to whoever continues it
        shelved_id, shelved_shared = self.shelf.best(prompt)
        if shelved_shared > shared and sequence.restore(self.shelf.take(shelved_id)):
            self.stats.unshelved += 1
        # Keep the shared prefix, but evaluate at least the last token: its logits start the answer.
        sequence.keep(min(common_prefix(sequence.tokens, prompt), len(prompt) - 1))
        slot.pending = prompt[len(sequence.tokens):]
        if generation.paused is None:  # a resumed answer's figures are those of its first admission
            generation.reused_tokens = len(sequence.tokens)
            generation.reused_own = sequence.owner == generation.request.client
        sequence.owner = generation.request.client

    def _shelve(self, slot: Slot) -> None:
        state = slot.sequence.save(self.shelf.max_bytes)
        if state is not None:
            self.shelf.put(state)
            self.stats.shelved += 1

    # -- borrowing: a prompt's opening copied from another slot

    def find_lender(self, slot: Slot) -> None:
        prompt = slot.generation.request.prompt
        best, lender = len(slot.sequence.tokens) + BORROW_MIN_TOKENS - 1, None
        for other in self.slots:
            if other is not slot and other.lender is None:  # a borrower never lends: no one waits in a circle
                shared = min(common_prefix(_planned(other), prompt), len(prompt) - 1)
                if shared > best:
                    best, lender = shared, other
        if lender is not None:
            slot.lender = (lender.seq_id, best)
            self.try_borrow(slot)

    def try_borrow(self, slot: Slot) -> None:
        """Copy the promised prefix from the lender once it holds it; give up if it never will."""
        seq_id, promised = slot.lender
        lender = self.slots[seq_id]
        prompt = slot.generation.request.prompt
        if (len(lender.sequence.tokens) < promised and lender.lender is None and lender.prefilling
                and common_prefix(_planned(lender), prompt) >= promised):
            return  # still evaluating it: wait
        slot.lender = None
        held = common_prefix(lender.sequence.tokens, prompt[:promised])
        if held < len(slot.sequence.tokens) + BORROW_MIN_TOKENS:
            return
        state = lender.sequence.save()
        if state is None:
            return
        generation = slot.generation
        if slot.sequence.restore(state):
            slot.sequence.keep(held)
        slot.sequence.owner = generation.request.client  # what it evaluates from here on is this client's
        if len(slot.sequence.tokens) != held:  # the copy or the cut failed: read the prompt from the start
            slot.sequence.forget()
            slot.pending = list(prompt)
            generation.reused_tokens = 0
            return
        slot.pending = prompt[held:]
        generation.reused_tokens = held
        generation.reused_own = state.owner == generation.request.client
        self.stats.borrowed_tokens += held


def _planned(slot: Slot) -> list[int]:
    """What a slot's cells hold, or will hold once it has read its prompt."""
    tokens = slot.sequence.tokens
    return tokens + slot.pending if slot.prefilling and slot.lender is None else tokens
