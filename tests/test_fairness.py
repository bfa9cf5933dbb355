"""A client's standing (parrot_edge/api/fairness.py): what puts it in bad standing, and for how long."""

from __future__ import annotations

import pytest

from parrot_edge.api import fairness
from parrot_edge.api.fairness import LEFT, ClientLimit
from parrot_edge.engine.requests import Standing


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """fairness.py's clock, moved by hand (the clock, not the part under test)."""
    now = [1000.0]
    monkeypatch.setattr(fairness.time, "monotonic", lambda: now[0])
    return now


def test_a_refusal_puts_a_client_in_bad_standing_at_once(clock):
    clients = ClientLimit(per_client=1)
    assert clients.take("a") and not clients.take("a")  # the second is refused: 429
    assert clients.standing("a") is Standing.BAD and clients.standing("b") is Standing.GOOD
    clock[0] += 5
    assert clients.standing("a") is Standing.BAD
    clock[0] += 5  # one refusal is forgotten after about 8 s
    assert clients.standing("a") is not Standing.BAD


def test_an_answer_left_now_and_then_is_a_student_two_at_once_are_not(clock):
    clients = ClientLimit(per_client=4)
    for _ in range(10):  # one a minute, for ten minutes
        clients.misbehaved("kiosk", LEFT)
        assert clients.standing("kiosk") is not Standing.BAD, "a student may stop an answer"
        clock[0] += 60
    for _ in range(2):
        clients.misbehaved("bot", LEFT)
        clock[0] += 1
    assert clients.standing("bot") is Standing.BAD


def test_a_flood_is_forgotten_a_minute_after_it_stops(clock):
    clients = ClientLimit(per_client=4)
    for _ in range(1000):
        clients.misbehaved("flooder")
    clock[0] += 50
    assert clients.standing("flooder") is Standing.BAD
    clock[0] += 15
    assert clients.standing("flooder") is not Standing.BAD


@pytest.mark.parametrize("per_client", [0, 2])
def test_places_are_given_back(per_client):
    clients = ClientLimit(per_client)
    assert all(clients.take("a") for _ in range(2))
    clients.give_back("a")
    assert clients.take("a")


def test_an_answer_left_puts_a_client_on_notice_for_under_a_minute(clock):
    clients = ClientLimit(per_client=4)
    clients.misbehaved("kiosk", LEFT)
    assert clients.standing("kiosk") is Standing.NOTICED
    clock[0] += 45
    assert clients.standing("kiosk") is Standing.NOTICED
    clock[0] += 5
    assert clients.standing("kiosk") is Standing.GOOD
