"""Fairness between clients: no one client may hold every slot and every queue place, or keep the others waiting.

A client is the address a request comes from: each computer on the LAN (which shares the school's API key),
and everything on this machine as one (its kiosk and the OS's apps; a benchmark that plays many students
gives each its own loopback address, 127.0.0.2, 127.0.0.3, …). Requests of one client at once, queued or
answering, are capped; one more gets 429 with Retry-After, before its body is even read (guards.py).

A client that misbehaved lately (refused for flooding or an over-large body, gone before its answer ended, or
sending a message with a control token's text: answered, as text, but a try at forging a turn) is in bad
standing for STANDING_SECONDS: its requests wait behind everyone else's, and the engine may pause one of its
answers to give a well-behaved student the slot (engine/scheduler.py). Only touched from the event loop: no
lock.
"""

from __future__ import annotations

import collections
import time

STANDING_SECONDS = 30.0  # how long a misbehaviour counts: a crashed kiosk that comes back is soon equal again


def client_address(scope: dict) -> str:
    """Who sent a request (its ASGI scope): its peer address."""
    return scope["client"][0] if scope.get("client") else "unknown"


class ClientLimit:
    def __init__(self, per_client: int):
        self.per_client = per_client  # 0: no limit
        self._active: collections.Counter[str] = collections.Counter()
        self._misbehaved: dict[str, float] = {}  # client → when it last misbehaved (time.monotonic())

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

    def misbehaved(self, client: str) -> None:
        self._misbehaved[client] = time.monotonic()
        if len(self._misbehaved) > 4096:  # a LAN's worth of addresses: forget the ones long in good standing
            self._misbehaved = {c: t for c, t in self._misbehaved.items() if not self._expired(t)}

    def in_bad_standing(self, client: str) -> bool:
        when = self._misbehaved.get(client)
        return when is not None and not self._expired(when)

    @staticmethod
    def _expired(when: float) -> bool:
        return time.monotonic() - when > STANDING_SECONDS
