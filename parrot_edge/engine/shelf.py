"""The shelf: conversations put aside in RAM when their slot is reused, for whoever continues them.

A class with more students than slots would otherwise evaluate a whole conversation again at every turn of
a student whose slot was taken meanwhile. Bounded in bytes; the oldest shelved goes first.
"""

from __future__ import annotations

import collections
import itertools

from parrot_edge.engine.sequence import SavedState


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Shelf:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._states: collections.OrderedDict[int, SavedState] = collections.OrderedDict()  # oldest first
        self._ids = itertools.count()

    @property
    def bytes_used(self) -> int:
        return sum(state.nbytes for state in self._states.values())

    def put(self, state: SavedState) -> None:
        """Shelve a conversation; an earlier turn of it is dropped (the new state holds it all)."""
        for shelved_id in [i for i, s in self._states.items() if state.tokens[:len(s.tokens)] == s.tokens]:
            del self._states[shelved_id]
        self._states[next(self._ids)] = state
        used = self.bytes_used
        while used > self.max_bytes:
            _, oldest = self._states.popitem(last=False)
            used -= oldest.nbytes

    def best(self, prompt: list[int]) -> tuple[int | None, int]:
        """(id, shared tokens) of the shelved conversation sharing the longest prefix with `prompt`."""
        best_id, best = None, 0
        for shelved_id, state in self._states.items():
            shared = common_prefix(state.tokens, prompt)
            if shared > best:
                best_id, best = shelved_id, shared
        return best_id, best

    def take(self, shelved_id: int) -> SavedState:
        return self._states.pop(shelved_id)
