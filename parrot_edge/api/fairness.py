"""Fairness between clients: no one client may hold every slot and every queue place.

A client is the address a request comes from: each computer on the LAN (which shares the school's API key),
and everything on this machine as one (its kiosk and the OS's apps; a benchmark that plays many students
gives each its own loopback address, 127.0.0.2, 127.0.0.3, …). Requests of one client at once, queued or
answering, are capped; one more gets 429 with Retry-After, before its body is even read (guards.py). Only
touched from the event loop: no lock.
"""

from __future__ import annotations

import collections


class ClientLimit:
    def __init__(self, per_client: int):
        self.per_client = per_client  # 0: no limit
        self._active: collections.Counter[str] = collections.Counter()

    def take(self, client: str) -> bool:
        """A place for one more request of `client`, or False when it already has its share."""
        if self.per_client and self._active[client] >= self.per_client:
            return False
        self._active[client] += 1
        return True

    def give_back(self, client: str) -> None:
        self._active[client] -= 1
        if self._active[client] <= 0:
            del self._active[client]
