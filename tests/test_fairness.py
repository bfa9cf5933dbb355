"""A client's standing (parrot_edge/api/fairness.py): what puts it in bad standing, and for how long."""

from __future__ import annotations

import pytest

from parrot_edge.api import fairness
from parrot_edge.api.fairness import LEFT, ClientLimit


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """fairness.py's clock, moved by hand (the clock, not the part under test)."""
    now = [1000.0]
    monkeypatch.setattr(fairness.time, "monotonic", lambda: now[0])
    return now


def test_a_refusal_puts_a_client_in_bad_standing_at_once(clock):
    clients = ClientLimit(per_client=1)
    assert clients.take("a") and not clients.take("a")  # the second is refused: 429
    assert clients.in_bad_standing("a") and not clients.in_bad_standing("b")
    clock[0] += 5
    assert clients.in_bad_standing("a")
    clock[0] += 5  # one refusal is forgotten after about 8 s
    assert not clients.in_bad_standing("a")


def test_an_answer_left_now_and_then_is_a_student_two_at_once_are_not(clock):
    clients = ClientLimit(per_client=4)
    for _ in range(10):  # one a minute, for ten minutes
        clients.misbehaved("kiosk", LEFT)
        assert not clients.in_bad_standing("kiosk"), "a student may stop an answer"
        clock[0] += 60
    for _ in range(2):
        clients.misbehaved("bot", LEFT)
        clock[0] += 1
    assert clients.in_bad_standing("bot")


def test_a_flood_is_forgotten_a_minute_after_it_stops(clock):
    clients = ClientLimit(per_client=4)
    for _ in range(1000):
        clients.misbehaved("flooder")
    clock[0] += 50
    assert clients.in_bad_standing("flooder")
    clock[0] += 15
    assert not clients.in_bad_standing("flooder")


@pytest.mark.parametrize("per_client", [0, 2])
def test_places_are_given_back(per_client):
    clients = ClientLimit(per_client)
    assert all(clients.take("a") for _ in range(2))
    clients.give_back("a")
    assert clients.take("a")
