"""From generated token pieces to the text a client may see, with stop strings honoured.

Two things make this more than joining pieces: a character can be split over several tokens (emoji,
accented letters in byte-level vocabularies), and a stop string can start in one token and end in a
later one. So text is decoded incrementally, and whatever could still be the start of a stop string is
held back until the next piece decides it.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: tuple[str, ...] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; returns the text that is now safe to emit (maybe empty)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(piece)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_stop_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """The end of the answer: release what was held back (it did not become a stop string)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        cut = self._first_stop(text)
        return text if cut is None else text[:cut]

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
