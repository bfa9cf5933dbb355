"""One llama.cpp sequence and the tokens its KV cells hold.

The engine's cache is only as good as one invariant: a sequence's `tokens` are exactly what its cells hold,
position by position. Every change to the cells goes through this class, which changes the list with them
(or, when llama.cpp refuses, empties both), so the invariant lives here and nowhere else.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass


@dataclass(frozen=True)
class SavedState:
    """A sequence put aside: its tokens and its llama.cpp state (the KV cells, bit for bit)."""

    tokens: list[int]
    data: ctypes.Array
    owner: str  # the client whose conversation it is

    @property
    def nbytes(self) -> int:
        return len(self.data)


class Sequence:
    def __init__(self, llama, ctx, memory, seq_id: int):
        self._llama, self._ctx, self._memory = llama, ctx, memory
        self.seq_id = seq_id
        self._tokens: list[int] = []
        self.owner = ""  # the client whose conversation the cells hold (set by whoever fills them)

    @property
    def tokens(self) -> list[int]:
        """What the cells hold, in order. Read it; change it only through the methods below."""
        return self._tokens

    def evaluating(self, tokens: list[int]) -> int:
        """`tokens` go into this step's batch at the next positions: the cells hold them once it is decoded (a
        failed decode must `forget()`). Returns the position of the first."""
        first = len(self._tokens)
        self._tokens.extend(tokens)
        return first

    def keep(self, n: int) -> None:
        """Keep the first `n` tokens' cells and remove the rest (if llama.cpp refuses, the sequence is emptied)."""
        if n < len(self._tokens):
            if self._llama.llama_memory_seq_rm(self._memory, self.seq_id, n, -1):
                del self._tokens[n:]
            else:
                self.forget()

    def drop_last(self) -> int | None:
        """Remove the last token's cell; that token, or None if llama.cpp could not (nothing changed then)."""
        if not self._tokens or not self._llama.llama_memory_seq_rm(self._memory, self.seq_id,
                                                                    len(self._tokens) - 1, -1):
            return None
        return self._tokens.pop()

    def forget(self) -> None:
        self._llama.llama_memory_seq_rm(self._memory, self.seq_id, -1, -1)
        self._tokens.clear()

    def save(self, max_bytes: int | None = None) -> SavedState | None:
        """A copy of the cells and tokens; None if empty or over `max_bytes`."""
        size = self._llama.llama_state_seq_get_size(self._ctx, self.seq_id)
        if not size or (max_bytes is not None and size > max_bytes):
            return None
        data = (ctypes.c_uint8 * size)()
        if self._llama.llama_state_seq_get_data(self._ctx, data, size, self.seq_id) != size:
            return None
        return SavedState(list(self._tokens), data, self.owner)

    def restore(self, state: SavedState) -> bool:
        """Replace the cells with a saved state (of any sequence); False leaves the sequence empty."""
        self.forget()
        if self._llama.llama_state_seq_set_data(self._ctx, state.data, state.nbytes, self.seq_id) == 0:
            self.forget()
            return False
        self._tokens[:] = state.tokens
        self.owner = state.owner
        return True

    def cells(self) -> int:
        """How many positions llama.cpp itself holds for this sequence (tests compare it with `tokens`)."""
        return self._llama.llama_memory_seq_pos_max(self._memory, self.seq_id) + 1
