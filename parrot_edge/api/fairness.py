"""Fairness between clients: no one client may hold every slot and every queue place, or keep the others waiting.

A client is the address a request comes from: each computer on the LAN (which shares the school's API key),
and everything on this machine as one (its kiosk and the OS's apps; a benchmark that plays many students
gives each its own loopback address, 127.0.0.2, 127.0.0.3, …). Requests of one client at once, queued or
answering, are capped; one more gets 429 with Retry-After, before its body is even read (guards.py).

A client's standing is a score of its misbehaviour: 3 points for each refusal (flooding, an over-large body)
or message with a control token's text (answered, as text, but a try at forging a turn), 1.5 for each answer
it left before its end (a student stopping one now and then stays in good standing; a broken kiosk or a bot,
leaving one every 40 s or more often, does not). The score halves every HALF_LIFE seconds, up to SCORE_CAP;
above BAD_STANDING the client is in bad standing (after one refusal for about 8 s, after a flood for up to a
minute). A request of a client in bad standing waits behind everyone else's, is served from spare room only,
and the engine may pause one of its answers to give a well-behaved student the slot (engine/scheduler.py).
Above NOTICE it is on notice (for 48 s after an answer left, 77 s after a refusal): where its claim to a slot
equals that of a client in good standing, it yields, and may be paused for it.
Only touched from the event loop: no lock.
"""

from __future__ import annotations

import collections
import time

from parrot_edge.engine.requests import Standing

HALF_LIFE = 30.0  # seconds in which a client's misbehaviour score halves
BAD_STANDING = 2.5  # above it: bad standing (one refusal; two answers left within 17 s)
NOTICE = 0.5  # above it: on notice (for 48 s after one answer left, 77 s after one refusal)
SCORE_CAP = 10.0  # however long a flood, it is forgotten a minute after it stops
REFUSAL, LEFT = 3.0, 1.5  # the points of a refusal (or a forged turn) and of an answer left before its end


def client_address(scope: dict) -> str:
    """Who sent a request (its ASGI scope): its peer address."""
    return scope["client"][0] if scope.get("client") else "unknown"


class ClientLimit:
    def __init__(self, per_client: int):
        self.per_client = per_client  # 0: no limit
        self._active: collections.Counter[str] = collections.Counter()
        self._scores: dict[str, tuple[float, float]] = {}  # client → (misbehaviour score, when it was set)

    def take(self, client: str) -> bool:
        """A place for one more request of `client`, or False when it already has its share."""
        if self.per_client and self._active[client] >= self.per_client:
            self.misbehaved(client)
            return False
        self._active[client] += 1
        return True

    def give_back(self, client: str) -> None:
        self._active[client] -= 1
        if self._active[client] <= 0:
            del self._active[client]

    def misbehaved(self, client: str, points: float = REFUSAL) -> None:
        self._scores[client] = (min(SCORE_CAP, self._score(client) + points), time.monotonic())
        if len(self._scores) > 4096:  # a LAN's worth of addresses: forget the ones back to nothing
            self._scores = {c: value for c, value in self._scores.items() if self._score(c) > 0.1}

    def standing(self, client: str) -> Standing:
        score = self._score(client)
        return Standing.BAD if score > BAD_STANDING else Standing.NOTICED if score > NOTICE else Standing.GOOD

    def _score(self, client: str) -> float:
        score, when = self._scores.get(client, (0.0, 0.0))
        return score * 0.5 ** ((time.monotonic() - when) / HALF_LIFE)
